"""The generation worker: one thread owns the model and serves the queued requests.

v1 serves one request at a time, first come first served. The worker advances a request's stream one chunk
(one verification step) at a time and checks between chunks whether the client has gone, so a later version can
step several requests in turn, or batch them, from the same loop. Each method spec has one :class:`Engine` (its
drafter's state, such as Token Recycling's adjacency matrix, lives across requests; greedy output never depends
on it). A sampled request with a seed gets a fresh engine, so that its output is reproducible.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

from decodekit.engine import Chunk, Engine, Generation
from decodekit.errors import DecodekitError, PromptTooLong
from decodekit.runtime.loader import LoadedModel
from decodekit.sampling import SamplingParams
from decodekit.server.metrics import Metrics

MAX_ENGINES = 4  # engines kept for the most recently used method specs (each holds a KV cache)
log = logging.getLogger("decodekit.server")


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str | list[int] | list[dict[str, str]]  # raw text, token ids, or a chat conversation
    chat: bool  # wrap a text prompt in the chat template
    method: str
    max_tokens: int
    stop: list[str]
    sampling: SamplingParams


@dataclass
class Started:
    prompt_tokens: int


@dataclass
class Finished:
    generation: Generation


@dataclass
class Failed:
    status: int  # 400: the request was invalid; 500: the generation failed; 503: the server is shutting down
    message: str


Event = Started | Chunk | Finished | Failed


class QueueFull(DecodekitError):
    """Every place in the queue is taken."""


class Job:
    """One request on its way through the worker. The worker sends Started or Failed first, then Chunks and
    Finished (or Failed); the events arrive on the event loop that submitted the job."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.arrived = time.perf_counter()
        self.cancelled = False
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    def cancel(self) -> None:
        """Drop the request (its client left): the worker checks before starting it and after every chunk."""
        self.cancelled = True

    async def next(self) -> Event:
        return await self._events.get()

    def send(self, event: Event) -> None:
        """Called by the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody listens any more
            self.cancelled = True


class Scheduler:
    """A bounded queue of requests in front of one worker thread that owns the model."""

    def __init__(
        self,
        model: LoadedModel,
        metrics: Metrics,
        queue_size: int = 16,
        max_prompt_tokens: int | None = None,
    ) -> None:
        self.model, self.metrics = model, metrics
        self.queue_size, self.max_prompt_tokens = queue_size, max_prompt_tokens
        self._engines: dict[str, Engine] = {}
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._waiting = 0
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="decodekit-worker", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request: GenerationRequest) -> Job:
        """Queue a request (from the event loop); raises QueueFull when ``queue_size`` requests already wait."""
        job = Job(request, asyncio.get_running_loop())
        with self._lock:
            if self._waiting >= self.queue_size:
                raise QueueFull(f"the server is busy: {self._waiting} requests are already waiting; retry later")
            self._waiting += 1
        self.metrics.waiting.inc()
        self._queue.put(job)
        return job

    def close(self) -> None:
        """Stop the worker: the running request ends after its current chunk, the waiting ones fail with 503."""
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                self._waiting -= 1
            self.metrics.waiting.dec()
            if self._closed:
                job.send(Failed(503, "the server is shutting down"))
            elif not job.cancelled:
                self.metrics.running.inc()
                try:
                    self._run(job)
                except Exception as err:  # a failing generation fails its own request only
                    log.exception("generation failed")
                    lines = str(err).strip().splitlines()
                    detail = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
                    job.send(Failed(500, f"the generation failed: {detail}"))
                finally:
                    self.metrics.running.dec()

    def _run(self, job: Job) -> None:
        request = job.request
        try:
            # a seeded sample must not depend on earlier requests: a drafter's state shapes its drafts, and the
            # drafts decide which random draws verification makes (the distribution is the same either way)
            seeded = request.sampling.seed is not None and not request.sampling.greedy
            engine = Engine(self.model, request.method) if seeded else self._engine(request.method)
            ids = engine.encode(request.prompt, request.chat)
            if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
                limit = self.max_prompt_tokens
                raise PromptTooLong(f"the prompt has {len(ids)} tokens; this server accepts at most {limit}")
            stream = engine.stream(ids, request.max_tokens, request.stop, sampling=request.sampling)
        except DecodekitError as err:
            job.send(Failed(400, str(err)))
            return
        job.send(Started(len(ids)))
        self.metrics.prompt_tokens.inc(len(ids))
        for i, chunk in enumerate(stream):
            if i == 0:
                self.metrics.ttft.observe(time.perf_counter() - job.arrived)
            self.metrics.generation_tokens.inc(len(chunk.token_ids))
            job.send(chunk)
            if job.cancelled or self._closed:
                return
        assert stream.result is not None
        self.metrics.observe_generation(stream.result.stats)
        job.send(Finished(stream.result))

    def _engine(self, spec: str) -> Engine:
        """The engine of a method spec, created on first use (raises InvalidParameter for a bad spec)."""
        engine = self._engines.pop(spec, None) or Engine(self.model, spec)
        self._engines[spec] = engine  # the most recently used last
        if len(self._engines) > MAX_ENGINES:
            del self._engines[next(iter(self._engines))]
        return engine
