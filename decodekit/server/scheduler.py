"""The generation worker: one thread owns the model and decodes the queued requests as one continuous batch.

Between steps the worker admits waiting requests (first come, first served) while the batch has free rows, then
runs one step of :class:`decodekit.batch.Batch` over every live request and hands each its chunk; requests that
finished, failed or whose client left leave the batch. Each request drafts with its own drafter, taken from an
idle pool per method spec so that learnt state (Token Recycling's adjacency matrix, say) carries over to later
requests; greedy output never depends on it. A sampled request with a seed gets a fresh drafter and always
drafts its whole tree, so that its output depends on nothing but the request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

from decodekit.batch import Batch
from decodekit.drafters import Drafter, make_drafter
from decodekit.drafters.base import MAX_DRAFT_NODES
from decodekit.engine import Chunk, Decoding, Generation, encode_prompt, target_info, validate_request
from decodekit.errors import DecodekitError, PromptTooLong
from decodekit.runtime.loader import LoadedModel
from decodekit.sampling import SamplingParams
from decodekit.server.metrics import Metrics

MAX_POOLS = 4  # idle drafters are kept for the most recently used method specs
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
    """A bounded queue of requests in front of one worker thread that owns the model and its batch."""

    def __init__(
        self,
        model: LoadedModel,
        metrics: Metrics,
        queue_size: int = 16,
        max_prompt_tokens: int | None = None,
        max_batch: int = 8,
        max_tokens_cap: int | None = None,
        adaptive: bool = True,
    ) -> None:
        """``max_batch`` requests decode together; each row of the batch's cache holds ``max_prompt_tokens +
        max_tokens_cap`` tokens (at most the context window). ``adaptive``: load-aware speculation."""
        self.model, self.metrics = model, metrics
        self.queue_size, self.max_prompt_tokens = queue_size, max_prompt_tokens
        window = model.cfg.context_window
        self.row_tokens = min(window, (max_prompt_tokens or window) + (max_tokens_cap or window))
        self.max_batch, self.adaptive = max_batch, adaptive
        self._idle: dict[str, list[Drafter]] = {}  # method spec -> idle drafters, most recently used spec last
        self._jobs: dict[Decoding, Job] = {}
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
        """Stop the worker after its current step: live and waiting requests fail with 503."""
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    def _work(self) -> None:
        batch = Batch(self.model, self.max_batch, self.row_tokens + MAX_DRAFT_NODES, self.adaptive)
        while not self._closed:
            self._admit(batch, wait=not batch.rows)
            if batch.rows and not self._closed:
                self._step(batch)
        for decoding, job in list(self._jobs.items()):
            job.send(Failed(503, "the server is shutting down"))
            self._leave(batch, decoding)
        while True:  # fail whatever still waits
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.send(Failed(503, "the server is shutting down"))

    def _admit(self, batch: Batch, wait: bool) -> None:
        """Start waiting requests while the batch has room (``wait``: block for the first one)."""
        while not batch.full:
            try:
                job = self._queue.get(block=wait)
            except queue.Empty:
                return
            wait = False
            if job is None:
                return  # close() was called
            with self._lock:
                self._waiting -= 1
            self.metrics.waiting.dec()
            if self._closed:
                job.send(Failed(503, "the server is shutting down"))
            elif not job.cancelled:
                self._start(batch, job)

    def _start(self, batch: Batch, job: Job) -> None:
        request = job.request
        # a seeded sample must not depend on earlier requests: a drafter's state shapes its drafts, and the
        # drafts decide which random draws verification makes (the distribution is the same either way)
        seeded = request.sampling.seed is not None and not request.sampling.greedy
        try:
            ids = encode_prompt(self.model, request.prompt, request.chat)
            if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
                limit = self.max_prompt_tokens
                raise PromptTooLong(f"the prompt has {len(ids)} tokens; this server accepts at most {limit}")
            validate_request(self.model, ids, request.max_tokens)
            drafter = self._drafter(request.method, fresh=seeded)
            decoding = Decoding(
                self.model, drafter, request.method, ids, request.max_tokens, request.stop, request.sampling
            )
            batch.join(decoding, pinned=seeded)
        except DecodekitError as err:
            job.send(Failed(400, str(err)))
            return
        except Exception as err:  # a failing prefill fails its own request only
            job.send(Failed(500, _failure(err)))
            return
        self._jobs[decoding] = job
        self.metrics.running.inc()
        self.metrics.prompt_tokens.inc(len(ids))
        job.send(Started(len(ids)))

    def _step(self, batch: Batch) -> None:
        try:
            results = batch.step()
        except Exception as err:  # the shared forward failed: every live request fails, the server lives on
            for decoding, job in list(self._jobs.items()):
                job.send(Failed(500, _failure(err)))
                self._leave(batch, decoding)
            return
        self.metrics.batch_width.set(batch.last_width)
        for decoding, result in results:
            job = self._jobs[decoding]
            if isinstance(result, Exception):
                job.send(Failed(500, _failure(result)))
                self._leave(batch, decoding)
                continue
            if decoding.stats.steps == 1:
                self.metrics.ttft.observe(time.perf_counter() - job.arrived)
            self.metrics.generation_tokens.inc(len(result.token_ids))
            job.send(result)
            if decoding.done:
                generation = decoding.result()
                self.metrics.observe_generation(generation.stats)
                job.send(Finished(generation))
                self._leave(batch, decoding)
            elif job.cancelled:
                self._leave(batch, decoding)

    def _leave(self, batch: Batch, decoding: Decoding) -> None:
        batch.leave(decoding)
        job = self._jobs.pop(decoding)
        self.metrics.running.dec()
        seeded = job.request.sampling.seed is not None and not job.request.sampling.greedy
        if not seeded:
            self._idle.setdefault(decoding.method, []).append(decoding.drafter)

    def _drafter(self, spec: str, fresh: bool) -> Drafter:
        """An idle drafter of a method spec, or a new one (raises InvalidParameter for a bad spec)."""
        pool = self._idle.pop(spec, [])
        self._idle[spec] = pool  # the most recently used last
        if len(self._idle) > MAX_POOLS:
            del self._idle[next(iter(self._idle))]
        if pool and not fresh:
            return pool.pop()
        return make_drafter(spec, target_info(self.model))


def _failure(err: Exception) -> str:
    log.error("generation failed", exc_info=err)
    lines = str(err).strip().splitlines()
    return (
        f"the generation failed: {type(err).__name__}: {lines[0]}"
        if lines
        else f"the generation failed: {type(err).__name__}"
    )
