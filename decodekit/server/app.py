"""The OpenAI-compatible HTTP API: ``/v1/completions`` and ``/v1/chat/completions`` (whole or streamed as server-sent
events), ``/v1/models``, ``/health`` and ``/metrics``.

Where it differs from OpenAI: the server has one model and answers whatever ``model`` a request names; extra body
fields ``top_k``, ``min_p``, ``repetition_penalty``, ``method`` (a decodekit method spec) and ``strategy`` (a
decoding strategy's spec, where the operator allows strategies: it changes the output by design, so its replies say
``"decodekit": {"strategy": ..., "lossless": false}``; it runs whole while the batch waits, and a strategy with
several completions answers ``n`` of them as choices); ``usage`` adds ``mean_accepted_tokens``. ``temperature``
defaults to 1 as in OpenAI: send 0 for greedy output, which every method reproduces exactly. Parameters it cannot
honour (``n`` > 1, ``logprobs``, ``tools``, penalties, ...) are refused with 400; other unknown fields are ignored;
numbers and booleans must come as JSON numbers and booleans.

A request's ``method`` is checked under the operator's policy (by default: a method by name, no options); the handler
tokenizes the prompt off the event loop and checks it before it is queued.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from decodekit import LoadedModel, SamplingParams, __version__
from decodekit.engine import (
    POOL_BYTES,
    PREFILL_CHUNK,
    Chunk,
    Engine,
    Generation,
    GenerationStats,
    client_policy,
    strategy_policy,
)
from decodekit.errors import InvalidParameter, clip
from decodekit.server.guard import MAX_BODY_BYTES, Guard, error_body, error_response
from decodekit.server.metrics import Metrics, MetricsMiddleware
from decodekit.server.scheduler import (
    Failed,
    Finished,
    Job,
    QueueFull,
    Scheduler,
    ShuttingDown,
    Started,
    internal_error,
)

DISCONNECT_POLL_S = 0.5  # how often a waiting non-streamed request checks that its client is still there
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context

# OpenAI parameters this server cannot honour, with the values that ask for nothing (null is always accepted)
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "suffix": ("",),
    "logit_bias": ({},),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)  # a number or a boolean is one in JSON: no "3", no true for 1

    include_usage: bool = False


class GenerationBody(BaseModel):
    """Fields both endpoints share; unknown fields are kept in ``model_extra``. Strict: a float field takes a JSON
    integer too, nothing else converts."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    top_k: int | None = None  # decodekit extras from here on
    min_p: float | None = None
    repetition_penalty: float | None = None
    method: str | None = None
    strategy: str | None = None


class CompletionBody(GenerationBody):
    prompt: str | list[int]  # text, sent without the chat template, or token ids


class ChatBody(GenerationBody):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = Field(None, ge=1)


class ClientGone(Exception):
    """The client disconnected before its reply was ready."""


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def create_app(
    model: LoadedModel,
    method: str = "hybrid",
    queue_size: int = 16,
    max_prompt_tokens: int | None = None,
    max_tokens_cap: int | None = None,
    max_batch: int = 8,
    adaptive: bool = True,
    allow_methods: list[str] | None = None,
    allow_method_options: bool = False,
    allow_strategies: list[str] | None = (),
    max_body_bytes: int = MAX_BODY_BYTES,
    api_key: str | None = None,
    loopback_only: bool = True,
    prefill_chunk: int = PREFILL_CHUNK,
    drafter_pool_bytes: int = POOL_BYTES,
) -> FastAPI:
    """The server's app: requests generate with ``model``, by the method spec a request names or ``method``.

        Up to ``max_batch`` requests decode together, with load-aware speculation when ``adaptive``; ``queue_size``
        more may wait (more get 429); prompts over ``max_prompt_tokens`` tokens and ``max_tokens`` over
        ``max_tokens_cap`` get 400. ``method`` is the operator's (any option); a request may name a method of
        ``allow_methods`` (None: all), with options only if ``allow_method_options``, or a strategy of
    ``allow_strategies`` (None: all; default none), its options under the same flag. Bodies over ``max_body_bytes``
        get 413; with ``api_key`` every endpoint but ``/health`` wants ``Authorization: Bearer <api_key>``; with
        ``loopback_only`` (set it False when the server listens beyond this machine) a ``Host`` that is not a loopback
        name gets 400. Each step prefills up to ``prefill_chunk`` prompt tokens of joining requests (whole chunks of
        ``decodekit.decoding.PREFILL_CHUNK``, at least one), between the live requests' decode steps. Idle drafters kept
        for reuse hold at most ``drafter_pool_bytes``. ``app.state.scheduler.drain`` shuts down gracefully. Its metrics
        live in ``app.state.metrics.registry``.
    """
    if api_key == "":
        raise InvalidParameter("the API key is empty")
    engine = Engine(
        model,
        method,
        max_batch=max_batch,
        adaptive=adaptive,
        preallocate=True,
        max_prompt_tokens=max_prompt_tokens,
        max_new_tokens_cap=max_tokens_cap,
        prefill_chunk=prefill_chunk,
        pool_bytes=drafter_pool_bytes,
        policy=client_policy(allow_methods, allow_method_options),
        strategy_policy=strategy_policy(
            None if allow_strategies is None else list(allow_strategies), allow_method_options
        ),
    )
    metrics = Metrics()
    scheduler = Scheduler(engine, metrics, queue_size)
    started_at = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.close()

    app = FastAPI(title="decodekit", version=__version__, lifespan=lifespan)
    app.state.metrics, app.state.scheduler = metrics, scheduler
    app.add_middleware(Guard, max_body_bytes=max_body_bytes, api_key=api_key, loopback_only=loopback_only)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts refusals too

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return error_response(err.status, err.message, err.param)

    @app.exception_handler(InvalidParameter)
    async def invalid_parameter(_: Request, err: InvalidParameter) -> JSONResponse:
        if err.param == "max_new_tokens":  # the engine's name for OpenAI's field
            return error_response(400, str(err).replace("max_new_tokens", "max_tokens"), "max_tokens")
        return error_response(400, str(err), err.param)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        where = [str(part) for part in first["loc"] if part != "body"]
        param = where[0] if where else None
        return error_response(400, f"{'.'.join(where) or 'body'}: {first['msg']}", param)

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, err: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; the status is what metrics record

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> Response:
        return error_response(500, internal_error(err))

    async def prepare(
        body: GenerationBody, prompt: Any, chat: bool, max_tokens: int | None, default: int | None
    ) -> Job:
        """Check the request's parameters, tokenize its prompt (in a thread: ``Engine.request``) and queue it.
        ``default``: the ``max_tokens`` of a request that sets none (None: as many as fit)."""
        arrived = time.perf_counter()
        extra = dict(body.model_extra or {})
        if body.strategy is not None:
            if not engine.strategies:
                raise APIError(400, "this server takes no strategies (its operator allows none)", "strategy")
            if body.stream:
                raise APIError(400, "a strategy's reply comes whole: it cannot stream", "stream")
        n = extra.pop("n", None) if body.strategy is not None else None  # a strategy's own count, checked below
        for name, value in extra.items():
            if name in UNSUPPORTED and value is not None and value not in UNSUPPORTED[name]:
                allowed = json.dumps(UNSUPPORTED[name][0])
                raise APIError(400, f"{name}={clip(value)} is not supported (only {allowed})", name)
        if max_tokens is None and default is not None:
            max_tokens = min(default, max_tokens_cap or default)
        sampling = SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=0 if body.top_k in (None, -1) else body.top_k,  # -1: off, as in vLLM
            top_p=1.0 if body.top_p is None else body.top_p,
            min_p=body.min_p or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            seed=body.seed,
        )
        request = await run_in_threadpool(
            engine.request, prompt, max_tokens, body.stop, chat, sampling, body.method, body.strategy
        )
        if request.strategy is not None and n is not None:
            count = await run_in_threadpool(engine.completions, request.strategy)
            if n != count:
                raise APIError(400, f"n={clip(n)}: strategy {request.strategy.partition(':')[0]} returns {count}", "n")
        try:
            return scheduler.submit(request, arrived)
        except QueueFull as err:
            raise APIError(429, str(err)) from None
        except ShuttingDown as err:
            raise APIError(503, str(err)) from None

    async def respond(job: Job, body: GenerationBody, chat: bool, request: Request) -> Response:
        """The whole reply, or a stream of chunks once the worker has accepted the request."""
        reply = Reply(model.name, chat)
        try:
            event = await next_unless_gone(job, request)
            if isinstance(event, Failed):
                raise APIError(event.status, event.message)
            if not body.stream:
                while isinstance(event, Started | Chunk):
                    event = await next_unless_gone(job, request)
                if isinstance(event, Failed):
                    raise APIError(event.status, event.message)
                return JSONResponse(reply.whole(event.generation))
        except BaseException:
            job.cancel()
            raise
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(stream(job, reply, include_usage), media_type="text/event-stream")

    async def next_unless_gone(job: Job, request: Request) -> Started | Chunk | Finished | Failed:
        """The job's next event; cancels the job (and raises) once the client has disconnected."""
        event = asyncio.ensure_future(job.next())
        while not (await asyncio.wait({event}, timeout=DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected():
                event.cancel()
                raise ClientGone
        return event.result()

    async def stream(job: Job, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: the text as it is committed, the finish reason, [DONE]; leaving cancels the job."""
        try:
            chat = reply.chat
            if chat:
                yield sse(reply.chunk({"role": "assistant", "content": ""}))
            while isinstance(event := await job.next(), Chunk):
                if event.text:
                    yield sse(reply.chunk({"content": event.text} if chat else event.text))
            if isinstance(event, Failed):
                yield sse(error_body(event.status, event.message))
            else:
                stats = event.generation.stats
                yield sse(reply.chunk({} if chat else "", stats.finish_reason))
                if include_usage:
                    yield sse(reply.envelope(reply.chunk_object, choices=[], usage=usage(stats)))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        if not body.prompt:
            raise APIError(400, "the prompt is empty", "prompt")
        job = await prepare(body, body.prompt, False, body.max_tokens, COMPLETION_MAX_TOKENS)
        return await respond(job, body, False, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request) -> Response:
        messages = [_text_message(i, m) for i, m in enumerate(body.messages)]
        max_tokens = body.max_completion_tokens or body.max_tokens
        job = await prepare(body, messages, True, max_tokens, None)  # None: the rest of the context
        return await respond(job, body, True, request)

    methods = {
        "methods": engine.methods,
        "default_method": method,
        "method_options": allow_method_options,
        "strategies": engine.strategies,
        "strategies_note": "a strategy changes the output by design (not lossless); it runs whole, the batch waits",
    }

    @app.get("/v1/models")
    async def models() -> dict:
        entry = {"id": model.name, "object": "model", "created": started_at, "owned_by": "decodekit"}
        return {"object": "list", "data": [{**entry, "decodekit": methods}]}

    @app.get("/health")
    async def health() -> Response:
        if not scheduler.accepting:
            return error_response(503, "the server is shutting down")
        if not scheduler.alive:
            return error_response(503, "the generation worker has stopped")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def scrape() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class Reply:
    """The JSON shapes of one reply: a completion or a chat completion, whole or in chunks."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model, self.chat = model, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def envelope(self, kind: str, **fields: Any) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, **fields}

    def whole(self, generation: Generation) -> dict:
        """The reply to a whole generation: one choice, or one per completion of a strategy that returns several."""
        stats = generation.stats
        outputs = [(c.text, c.finish_reason) for c in generation.completions] or [
            (generation.text, stats.finish_reason)
        ]
        kind = "chat.completion" if self.chat else "text_completion"
        choices = [
            {
                "index": i,
                **({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}),
                "logprobs": None,
                "finish_reason": finish,
            }
            for i, (text, finish) in enumerate(outputs)
        ]
        extra = {} if stats.strategy is None else {"decodekit": {"strategy": stats.strategy, "lossless": False}}
        tokens = sum(len(c.token_ids) for c in generation.completions) or None
        return self.envelope(kind, choices=choices, usage=usage(stats, tokens), **extra)

    def chunk(self, content: dict | str, finish: str | None = None) -> dict:
        """A streamed piece: a chat ``delta`` (a dict) or completion ``text`` (a str)."""
        choice = {"index": 0, "delta" if self.chat else "text": content, "logprobs": None, "finish_reason": finish}
        return self.envelope(self.chunk_object, choices=[choice])


def usage(stats: GenerationStats, completion_tokens: int | None = None) -> dict:
    """OpenAI's usage, plus the request's mean accepted tokens per verification step (MAT). ``completion_tokens``:
    those of every choice (None: the one generation's)."""
    completion_tokens = stats.new_tokens if completion_tokens is None else completion_tokens
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": stats.prompt_tokens + completion_tokens,
        "mean_accepted_tokens": stats.mean_accepted,
    }


def sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _text_message(i: int, message: dict[str, Any]) -> dict[str, Any]:
    """A message with its text content parts joined; OpenAI's ``developer`` role read as ``system``."""
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise APIError(400, f"message {i}: only text content parts are supported", "messages")
        content = "".join(part["text"] for part in content)
    role = "system" if message.get("role") == "developer" else message.get("role")
    return {"role": role, "content": content}
