"""The generation worker: one thread owns the :class:`decodekit.engine.Engine` and steps it over the queued requests,
one continuous batch.

Between steps the worker submits waiting requests (first come, first served) while the engine has free rows, stops
those whose client left, then runs one :meth:`Engine.step` and hands each request its chunk. A strategy's request
(which decides its output by its own rule, outside the batch) runs whole when its turn comes, the batch waiting.
Requests arrive checked and tokenized (``Engine.request``, in the HTTP handler), so the worker never spends time on
text.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass

from decodekit.engine import Chunk, Decoding, Engine, Generation, Request
from decodekit.errors import DecodekitError
from decodekit.server.metrics import Metrics

DRAIN_POLL_S = 0.05  # how often a drain checks whether its requests have finished
log = logging.getLogger("decodekit.server")


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

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop, arrived: float) -> None:
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
        """Drop the request (its client left): the worker checks before starting it and before every step."""
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
    """A bounded queue of requests in front of one worker thread that owns ``engine`` and steps it."""

    def __init__(self, engine: Engine, metrics: Metrics, queue_size: int = 16) -> None:
        """At most ``queue_size`` requests wait for a row of the engine's batch; more get QueueFull."""
        self.engine, self.metrics, self.queue_size = engine, metrics, queue_size
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

    def submit(self, request: Request, arrived: float | None = None) -> Job:
        """Queue a checked request (from the event loop) that reached the server at ``arrived``
        (``time.perf_counter()``, default now). Raises QueueFull when ``queue_size`` requests already wait,
        ShuttingDown once a drain or close has begun."""
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
        while not self._closed:
            self._admit(wait=not self.engine.busy)
            if self.engine.busy and not self._closed:
                self._step()
        for decoding, job in list(self._jobs.items()):
            job.send(Failed(503, "the server is shutting down"))
            self._drop(decoding)
        while True:  # fail whatever still waits
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.send(Failed(503, "the server is shutting down"))

    def _admit(self, wait: bool) -> None:
        """Start waiting requests while the engine has room (``wait``: block for the first one)."""
        while not self.engine.full:
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
                self._start(job)

    def _start(self, job: Job) -> None:
        if job.request.strategy is not None:
            self._run_whole(job)
            return
        try:
            decoding = self.engine.submit(job.request)
        except DecodekitError as err:
            job.send(Failed(400, str(err)))
            return
        except Exception as err:  # a drafter that fails to build fails its own request only
            job.send(Failed(500, _failure(err)))
            return
        self._jobs[decoding] = job
        self.metrics.running.inc()
        self.metrics.prompt_tokens.inc(len(job.request.prompt_ids))
        job.send(Started(len(job.request.prompt_ids)))

    def _run_whole(self, job: Job) -> None:
        """Run a strategy's request to its end now (the batch waits), and send its events."""
        self.metrics.running.inc()
        try:
            job.send(Started(len(job.request.prompt_ids)))
            generation = self.engine.run(job.request)
        except DecodekitError as err:
            job.send(Failed(400, str(err)))
        except Exception as err:  # a strategy that fails fails its own request only
            job.send(Failed(500, _failure(err)))
        else:
            self.metrics.prompt_tokens.inc(len(job.request.prompt_ids))
            self.metrics.ttft.observe(time.perf_counter() - job.arrived)
            self.metrics.generation_tokens.inc(generation.stats.new_tokens)
            job.send(Chunk(generation.token_ids, generation.text))
            job.send(Finished(generation))
        finally:
            self.metrics.running.dec()

    def _step(self) -> None:
        for decoding, job in list(self._jobs.items()):  # a client that left frees its row, joining or live
            if job.cancelled:
                self._drop(decoding)
        results = self.engine.step()
        self.metrics.batch_width.set(self.engine.batch.last_width)
        for decoding, result in results:
            job = self._jobs[decoding]
            if isinstance(result, Exception):
                job.send(Failed(500, _failure(result)))
                self._drop(decoding)
                continue
            if decoding.stats.steps == 1:
                self.metrics.ttft.observe(time.perf_counter() - job.arrived)
            self.metrics.generation_tokens.inc(len(result.token_ids))
            job.send(result)
            if decoding.done:
                generation = decoding.result()
                self.metrics.observe_generation(generation.stats)
                self.metrics.observe_learning(self.engine.learners)
                job.send(Finished(generation))
                self._drop(decoding)
        self.metrics.pool_bytes.set(self.engine.pool.nbytes)

    def _drop(self, decoding: Decoding) -> None:
        """Forget ``decoding``'s job, stopping it in the engine if it has not left already."""
        self.engine.cancel(decoding)
        del self._jobs[decoding]
        self.metrics.running.dec()


def internal_error(err: BaseException) -> str:
    """Log ``err`` with its traceback under a fresh request id; the client's message: that id, nothing of ``err``."""
    request_id = uuid.uuid4().hex
    log.error("internal error (request id %s)", request_id, exc_info=err)
    return f"internal error (request id {request_id})"


def _failure(err: Exception) -> str:
    return f"the generation failed: {internal_error(err)}"
