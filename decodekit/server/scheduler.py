"""The generation worker: one thread owns the model and decodes the queued requests as one continuous batch.

Between steps the worker admits waiting requests (first come, first served) while the batch has free rows, then
runs one step of :class:`decodekit.batch.Batch` (a chunk of the joining requests' prompts, then one decode step
over every live request) and hands each its chunk; requests that finished, failed or whose client left leave the
batch, a joining one too. Each request drafts with its own drafter, taken from an idle pool per method spec so
that learnt state (Token Recycling's adjacency matrix, say) carries over to later requests; greedy output never
depends on it. A sampled request with a seed gets a fresh drafter and always drafts its whole tree, so that its
output depends on nothing but the request.

Requests arrive tokenized and checked (:meth:`Scheduler.submit`), so the worker never spends time on text.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass

from decodekit.batch import Batch
from decodekit.drafters import Drafter, make_drafter
from decodekit.drafters.base import MAX_DRAFT_NODES
from decodekit.engine import PREFILL_CHUNK, Chunk, Decoding, Generation, target_info, validate_request
from decodekit.errors import DecodekitError, PromptTooLong
from decodekit.runtime.loader import LoadedModel
from decodekit.sampling import SamplingParams
from decodekit.server.metrics import Metrics
from decodekit.server.pool import POOL_BYTES, DrafterPool

DRAIN_POLL_S = 0.05  # how often a drain checks whether its requests have finished
log = logging.getLogger("decodekit.server")


@dataclass(frozen=True)
class GenerationRequest:
    prompt: list[int]  # token ids, chat template applied
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


class ShuttingDown(DecodekitError):
    """The server is draining or closed: it takes no new requests."""


class Job:
    """One request on its way through the worker. The worker sends Started or Failed first, then Chunks and
    Finished (or Failed); the events arrive on the event loop that submitted the job."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, arrived: float) -> None:
        self.request = request
        self.arrived = arrived  # time.perf_counter() when the request reached the server
        self.cancelled = False
        self._ended = False  # Finished or Failed was sent
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    @property
    def over(self) -> bool:
        """The worker has sent its last event, or its client left."""
        return self._ended or self.cancelled

    def cancel(self) -> None:
        """Drop the request (its client left): the worker checks before starting it and after every chunk."""
        self.cancelled = True

    async def next(self) -> Event:
        return await self._events.get()

    def send(self, event: Event) -> None:
        """Called by the worker thread."""
        self._ended |= isinstance(event, Finished | Failed)
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
        prefill_chunk: int = PREFILL_CHUNK,
        pool_bytes: int = POOL_BYTES,
    ) -> None:
        """``max_batch`` requests decode together; each row of the batch's cache holds ``max_prompt_tokens +
        max_tokens_cap`` tokens (at most the context window). ``adaptive``: load-aware speculation.
        ``prefill_chunk``: prompt tokens of joining requests prefilled per step (``decodekit.batch.Batch``).
        ``pool_bytes``: what idle drafters kept for reuse may hold (:class:`decodekit.server.pool.DrafterPool`)."""
        self.model, self.metrics = model, metrics
        self.queue_size, self.max_prompt_tokens = queue_size, max_prompt_tokens
        window = model.cfg.context_window
        self.row_tokens = min(window, (max_prompt_tokens or window) + (max_tokens_cap or window))
        self.max_batch, self.adaptive, self.prefill_chunk = max_batch, adaptive, prefill_chunk
        self._pool = DrafterPool(pool_bytes)
        self._jobs: dict[Decoding, Job] = {}
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._waiting = 0
        self._open: set[Job] = set()  # submitted jobs, some perhaps over (pruned at each submit)
        self._accepting = True
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="decodekit-worker", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        """False once a drain or close has begun."""
        return self._accepting

    def submit(self, request: GenerationRequest, arrived: float | None = None) -> Job:
        """Queue a request (from the event loop) that reached the server at ``arrived`` (``time.perf_counter()``,
        default now). Raises PromptTooLong or InvalidParameter for a prompt or ``max_tokens`` this server cannot
        take, QueueFull when ``queue_size`` requests already wait, ShuttingDown once a drain or close has begun."""
        ids, limit = request.prompt, self.max_prompt_tokens
        if limit is not None and len(ids) > limit:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens; this server accepts at most {limit}")
        validate_request(self.model, ids, request.max_tokens)
        job = Job(request, asyncio.get_running_loop(), time.perf_counter() if arrived is None else arrived)
        with self._lock:  # one lock with _stop: no job is queued after the worker's last look at the queue
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if self._waiting >= self.queue_size:
                raise QueueFull(f"the server is busy: {self._waiting} requests are already waiting; retry later")
            self._waiting += 1
            self._open = {other for other in self._open if not other.over} | {job}
            self.metrics.waiting.inc()
            self._queue.put(job)
        return job

    async def drain(self, timeout: float) -> int:
        """Stop admitting (``submit`` raises ShuttingDown), give the queued and live requests up to ``timeout``
        seconds to finish, then stop the worker: what is left fails with 503. Returns how many were left."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + timeout
        while (left := sum(not job.over for job in self._open)) and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if left:
            log.warning("drain timeout: %d request(s) cut short", left)
        self._stop()
        while self.alive:
            await asyncio.sleep(DRAIN_POLL_S)
        return left

    def close(self) -> None:
        """Stop admitting, and stop the worker after its current step: live and waiting requests fail with 503."""
        self._stop()
        self._thread.join()

    def _stop(self) -> None:
        with self._lock:
            self._accepting, self._closed = False, True
            self._queue.put(None)

    def _work(self) -> None:
        capacity = self.row_tokens + MAX_DRAFT_NODES
        batch = Batch(self.model, self.max_batch, capacity, self.adaptive, self.prefill_chunk)
        while not self._closed:
            self._admit(batch, wait=not batch.size)
            if batch.size and not self._closed:
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
            ids = request.prompt  # checked by submit
            drafter = self._drafter(request.method, fresh=seeded)
            decoding = Decoding(
                self.model, drafter, request.method, ids, request.max_tokens, request.stop, request.sampling
            )
            batch.join(decoding, pinned=seeded)
        except DecodekitError as err:
            job.send(Failed(400, str(err)))
            return
        except Exception as err:  # a drafter that fails to build fails its own request only
            job.send(Failed(500, _failure(err)))
            return
        self._jobs[decoding] = job
        self.metrics.running.inc()
        self.metrics.prompt_tokens.inc(len(ids))
        job.send(Started(len(ids)))

    def _step(self, batch: Batch) -> None:
        for row in list(batch.joining):  # a client that left before its prompt was in frees its row
            if self._jobs[row.decoding].cancelled:
                self._leave(batch, row.decoding)
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
            self._pool.give(decoding.method, decoding.drafter)
            self.metrics.pool_bytes.set(self._pool.nbytes)

    def _drafter(self, spec: str, fresh: bool) -> Drafter:
        """An idle drafter of a method spec, or a new one (raises InvalidParameter for a bad spec)."""
        idle = None if fresh else self._pool.take(spec)
        self.metrics.pool_bytes.set(self._pool.nbytes)
        return idle if idle is not None else make_drafter(spec, target_info(self.model))


def internal_error(err: BaseException) -> str:
    """Log ``err`` with its traceback under a fresh request id; the client's message: that id, nothing of ``err``."""
    request_id = uuid.uuid4().hex
    log.error("internal error (request id %s)", request_id, exc_info=err)
    return f"internal error (request id {request_id})"


def _failure(err: Exception) -> str:
    return f"the generation failed: {internal_error(err)}"
