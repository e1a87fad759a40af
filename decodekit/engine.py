"""The engine: one model, its drafters and the requests decoding on it. The library, the CLI, the bench and the
server all go through it; nothing above it reaches below it.

    engine = Engine(model, "recycling")
    engine.generate("Why is the sky blue?")                  # one request, start to end
    request = engine.request(prompt, max_new_tokens=64)      # checked and tokenized; safe from any thread
    decoding = engine.submit(request)                        # joins the batch
    while not decoding.done:
        for decoding_, chunk in engine.step(): ...           # every request in the batch moves one step
    engine.run_all(requests)                                 # many requests, as many at once as rows allow

Every request parameter is checked in :meth:`Engine.request` and nowhere else. The engine keeps one drafter per
live request, taken from a pool of idle ones by method spec, so what a drafter learnt (Token Recycling's matrix,
say) carries over to later requests of its spec; greedy output never depends on it. A sampled request with a seed
gets a fresh drafter and always drafts its whole tree, so its output depends on nothing but the request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence

from decodekit.batch import Batch
from decodekit.decoding import (
    PREFILL_CHUNK,
    Chunk,
    Completion,
    Decoding,
    Generation,
    GenerationStats,
    Request,
    target_info,
)
from decodekit.drafters import (
    METHODS,
    OPERATOR,
    MethodPolicy,
    client_policy,
    make_drafter,
    method_options,
    parse_method,
    resolved_options,
)
from decodekit.drafters.online import OnlineLearner
from decodekit.drafters.speculative_config import method_from_speculative_config
from decodekit.errors import DecodekitError, InvalidParameter, PromptTooLong, clip
from decodekit.pool import POOL_BYTES, DrafterPool
from decodekit.protocol import MAX_DRAFT_NODES, Drafter
from decodekit.runtime.loader import LoadedModel
from decodekit.runtime.sparse_attention import attention_spec, calibrated_channels, parse_attention
from decodekit.sampling import GREEDY, SamplingParams
from decodekit.strategies import STRATEGIES, Strategy, make_strategy, parse_strategy, strategy_options
from decodekit.text import TextStream, check_text, encode_chat, stop_strings

log = logging.getLogger("decodekit")

__all__ = [
    "POOL_BYTES",
    "PREFILL_CHUNK",
    "Chunk",
    "Completion",
    "Decoding",
    "Engine",
    "EngineFull",
    "Generation",
    "GenerationStats",
    "GenerationStream",
    "MethodPolicy",
    "Request",
    "check_attention",
    "check_method",
    "check_strategy",
    "client_policy",
    "describe_methods",
    "describe_strategies",
    "method_from_speculative_config",
    "resolved_options",
    "strategy_policy",
]

Prompt = str | list[int] | list[dict[str, str]]  # text, token ids, or an OpenAI-style conversation


class EngineFull(DecodekitError):
    """Every row of the engine's batch is taken: step until a request finishes, or build it with more rows."""


class GenerationStream:
    """An iterator of :class:`Chunk`; ``result`` holds the :class:`Generation` once iteration ends. Leaving the
    loop early (or dropping the stream) stops the request and frees its row."""

    def __init__(self, steps: Iterator[Chunk]) -> None:
        self._steps = steps
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[Chunk]:
        self.result = yield from self._steps


class Engine:
    """Decodes requests with one model and speculative methods, up to ``max_batch`` of them at once.

    ``method``: the spec of requests that name none (``"recycling:tree=16"``), or a :class:`Drafter` instance
    (then one request at a time). ``adaptive``: choose each step's tree width by goodput (load-aware
    speculation, for a server: it times forwards when it starts). ``preallocate``: allocate the KV cache for
    ``max_batch`` whole rows now (a server's memory known at start; implied by ``adaptive``), else grow it as
    requests need. A row holds ``max_prompt_tokens`` + ``max_new_tokens_cap`` tokens (each None: the context
    window), and :meth:`request` refuses more. ``prefill_chunk``: prompt tokens a step may prefill (None: whole
    prompts). ``pool_bytes``: what idle drafters may hold. ``policy``: what a request's own ``method`` may name
    and set (the engine's ``method`` is always allowed). ``attention``: None or ``"full"`` (full attention), or
    ``"double_sparsity[:key=value,...]"``: APPROXIMATE sparse attention (runtime/sparse_attention.py; the model
    calibrated for it once), the output lossless relative to it only; engines sharing a model each decode with
    their own (strategies run with full attention only).
    """

    def __init__(
        self,
        model: LoadedModel,
        method: str | Drafter = "recycling",
        *,
        max_batch: int = 1,
        adaptive: bool = False,
        preallocate: bool = False,
        max_prompt_tokens: int | None = None,
        max_new_tokens_cap: int | None = None,
        prefill_chunk: int | None = None,
        pool_bytes: int = POOL_BYTES,
        policy: MethodPolicy = OPERATOR,
        strategy_policy: MethodPolicy = OPERATOR,
        attention: str | None = None,
    ) -> None:
        _check_count("max_batch", max_batch)
        for name, value in (("max_prompt_tokens", max_prompt_tokens), ("max_new_tokens_cap", max_new_tokens_cap)):
            _check_count(name, value, none_ok=True)
        _check_count("prefill_chunk", prefill_chunk, none_ok=True)
        _check_count("pool_bytes", pool_bytes, zero_ok=True)
        self.model, self.policy, self.strategy_policy = model, policy, strategy_policy
        self.max_prompt_tokens, self.max_new_tokens_cap = max_prompt_tokens, max_new_tokens_cap
        if isinstance(method, str):
            parse_method(method)
            self.method, self._own = method, None
        elif isinstance(method, Drafter):
            if max_batch != 1:
                raise InvalidParameter("an engine built with a drafter instance decodes one request at a time")
            self.method, self._own = type(method).__name__, method
        else:
            raise InvalidParameter(f"method must be a method spec such as 'recycling' or a Drafter, got {clip(method)}")
        self.sparse_attention = parse_attention(attention)
        self.attention = attention_spec(self.sparse_attention)  # as results record it
        self._channels = None
        if self.sparse_attention is not None:
            self._channels = calibrated_channels(model, self.sparse_attention.channels)
        self._use_attention()
        window = model.cfg.context_window
        row_tokens = min(window, (max_prompt_tokens or window) + (max_new_tokens_cap or window))
        capacity = row_tokens + MAX_DRAFT_NODES if adaptive or preallocate else None
        self.batch = Batch(model, max_batch, capacity, adaptive, prefill_chunk)
        self.pool = DrafterPool(pool_bytes)
        self._target = target_info(model)
        self._strategies: dict[str, Strategy] = {}  # built on first use, kept (a second checkpoint loads once)

    @property
    def full(self) -> bool:
        """Every row is taken: :meth:`submit` would raise EngineFull."""
        return self.batch.full

    @property
    def busy(self) -> bool:
        """Requests are decoding (or joining)."""
        return self.batch.size > 0

    @property
    def methods(self) -> list[str]:
        """The methods a request may name (besides the engine's own)."""
        return [name for name in METHODS if self.policy.methods is None or name in self.policy.methods]

    @property
    def strategies(self) -> list[str]:
        """The strategies a request may name."""
        allowed = self.strategy_policy.methods
        return [name for name in STRATEGIES if allowed is None or name in allowed]

    @property
    def learners(self) -> list[OnlineLearner]:
        """The online learners of this engine's drafters (methods with ``learn=``), one per trained file and rate."""
        return [shared for shared in self._target.model.shared_objects() if isinstance(shared, OnlineLearner)]

    def completions(self, strategy: str) -> int:
        """How many completions a request of ``strategy`` (a checked spec) returns."""
        return self._strategy(strategy).count

    def request(
        self,
        prompt: Prompt,
        max_new_tokens: int | None = 256,
        stop: str | Sequence[str] = (),
        chat: bool = True,
        sampling: SamplingParams = GREEDY,
        method: str | None = None,
        strategy: str | None = None,
    ) -> Request:
        """Check a request and tokenize its prompt; raises InvalidParameter (``param`` names the argument) or
        PromptTooLong. Safe from any thread: it reads the engine, never changes it.

        ``prompt``: a user message, token ids, or a conversation (OpenAI-style ``[{"role", "content"}]`` ending
        with a user turn), wrapped in the checkpoint's chat template when ``chat``. ``max_new_tokens`` None: as
        many as fit. ``stop``: a stop string or several. ``method``: a spec allowed by the engine's policy (None:
        the engine's). ``strategy``: a decoding strategy's spec (decodekit.strategies): it decides the output by
        its own rule, so the output differs from plain decoding; greedy only, and no method beside it."""
        if strategy is not None:
            check_strategy(strategy, method, sampling, self.strategy_policy)
            if self.sparse_attention is not None:
                raise InvalidParameter("strategies run with full attention only: not on this engine", "strategy")
        if method is not None and method != self.method:
            try:
                parse_method(method, self.policy)
            except InvalidParameter as err:
                raise InvalidParameter(str(err), "method") from None
        if not isinstance(sampling, SamplingParams):
            raise InvalidParameter("sampling must be a SamplingParams", "sampling")
        stops = tuple(stop_strings(stop))
        ids = encode_prompt(self.model, prompt, chat)
        window, limit, cap = self.model.cfg.context_window, self.max_prompt_tokens, self.max_new_tokens_cap
        if limit is not None and len(ids) > limit:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens; this engine takes at most {limit}", "prompt")
        if len(ids) >= window:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens; the context window holds {window}", "prompt")
        if max_new_tokens is None:
            max_new_tokens = min(window - len(ids), cap or window)
        _check_count("max_new_tokens", max_new_tokens)
        if max_new_tokens > (cap or window):
            bound = f"this engine's cap of {cap}" if cap else f"the context window of {window} tokens"
            raise InvalidParameter(f"max_new_tokens {max_new_tokens} exceeds {bound}", "max_new_tokens")
        return Request(ids, max_new_tokens, stops, sampling, method, strategy)

    def submit(self, request: Request) -> Decoding:
        """Start decoding a checked request: it joins the batch, and the coming steps score its prompt and decode
        it. Raises EngineFull when every row is taken; a strategy's request runs whole, through :meth:`run`."""
        if request.strategy is not None:
            raise InvalidParameter("a strategy's request decodes whole and alone: Engine.run it", "strategy")
        if self.full:
            rows = self.batch.cache.batch
            raise EngineFull(
                f"all {rows} rows are decoding: step until one finishes (or build with max_batch > {rows})"
            )
        seeded = request.sampling.seed is not None and not request.sampling.greedy
        spec = request.method or self.method
        self._use_attention()  # a drafter makes its caches as it is built
        drafter = self._own if self._own is not None and request.method is None else self._drafter(spec, seeded)
        decoding = Decoding(self.model, drafter, spec, request)
        self.batch.join(decoding, pinned=seeded)
        return decoding

    def step(self) -> list[tuple[Decoding, Chunk | Exception]]:
        """One step of every request: a share of the joining prompts, then one forward over the live requests.
        Returns each live request's committed chunk, or the error that failed a request; a request that is done
        or failed has left the engine (its drafter back in the pool) when this returns."""
        self._use_attention()
        results = self.batch.step()
        for decoding, result in results:
            if isinstance(result, Exception) or decoding.done:
                self.cancel(decoding)
        return results

    def cancel(self, decoding: Decoding) -> None:
        """Stop ``decoding`` (if it has not left already), end its drafter's request and keep the drafter for later
        requests."""
        if not self.batch.leave(decoding):
            return
        try:
            decoding.drafter.end()
        except Exception:  # a drafter's bug: the request is over either way, and the drafter is not kept
            log.exception("method %s failed to end a request", decoding.method)
            return
        seeded = decoding.request.sampling.seed is not None and not decoding.request.sampling.greedy
        if decoding.drafter is not self._own and not seeded:
            self.pool.give(decoding.method, decoding.drafter)

    def run(self, request: Request, on_chunk: Callable[[Chunk], None] | None = None) -> Generation:
        """Decode a checked request to its end (stepping any other requests in the batch along with it; a
        strategy's request runs alone, its completions handed to ``on_chunk`` whole)."""
        if request.strategy is not None:
            generation = self._run_strategy(request)
            if on_chunk is not None:
                on_chunk(Chunk(generation.token_ids, generation.text))
            return generation
        stream = GenerationStream(self._decode(request))
        for chunk in stream:
            if on_chunk is not None:
                on_chunk(chunk)
        assert stream.result is not None
        return stream.result

    def run_all(
        self, requests: Sequence[Request], on_done: Callable[[int, Generation], None] | None = None
    ) -> list[Generation]:
        """Decode checked requests together, as many at a time as the batch has rows (the next joins as a row
        frees up), and return each one's Generation in order; ``on_done(index, generation)`` as each finishes. A
        request's error is raised, after the others still decoding are cancelled (a strategy's request is refused
        by :meth:`submit`)."""
        waiting, live = list(enumerate(requests)), {}
        results: list[Generation | None] = [None] * len(requests)
        try:
            while waiting or live:
                while waiting and not self.full:
                    index, request = waiting.pop(0)
                    live[self.submit(request)] = index
                for decoding, result in self.step():
                    if isinstance(result, Exception):
                        raise result
                    if decoding.done:
                        index = live.pop(decoding)
                        results[index] = decoding.result()
                        if on_done is not None:
                            on_done(index, results[index])
        finally:
            for decoding in live:
                self.cancel(decoding)
        return results  # type: ignore[return-value]  # every one is set when the loop ends

    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int | None = 256,
        stop: str | Sequence[str] = (),
        chat: bool = True,
        on_chunk: Callable[[Chunk], None] | None = None,
        sampling: SamplingParams = GREEDY,
        method: str | None = None,
        strategy: str | None = None,
    ) -> Generation:
        """Generate greedily, or by ``sampling``; the method never changes the output's distribution (a
        ``strategy`` does, by design)."""
        return self.run(self.request(prompt, max_new_tokens, stop, chat, sampling, method, strategy), on_chunk)

    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int | None = 256,
        stop: str | Sequence[str] = (),
        chat: bool = True,
        sampling: SamplingParams = GREEDY,
        method: str | None = None,
    ) -> GenerationStream:
        """Generate lazily: iterate the returned stream for chunks, then read ``.result``. The request is checked
        now, and joins the batch when iteration starts."""
        return GenerationStream(self._decode(self.request(prompt, max_new_tokens, stop, chat, sampling, method)))

    def _decode(self, request: Request) -> Iterator[Chunk]:
        decoding = self.submit(request)
        try:
            while not decoding.done:
                for other, result in self.step():
                    if other is decoding:
                        if isinstance(result, Exception):
                            raise result
                        yield result
        finally:
            self.cancel(decoding)  # a stream left early, or a failure: free the row
        return decoding.result()

    def _run_strategy(self, request: Request) -> Generation:
        assert request.strategy is not None
        self._use_attention()
        start = time.perf_counter()
        strategy = self._strategy(request.strategy)
        budget = min(request.max_new_tokens, self.model.cfg.context_window - len(request.prompt_ids))
        outputs = [self._completion(ids, request) for ids in strategy.decode(request.prompt_ids, budget)]
        best = outputs[0]
        spec = request.strategy
        stats = GenerationStats(spec, len(request.prompt_ids), len(best.token_ids), strategy=spec)
        stats.finish_reason, stats.wall_s = best.finish_reason, time.perf_counter() - start
        return Generation(best.text, best.token_ids, request.prompt_ids, stats, outputs if len(outputs) > 1 else [])

    def _strategy(self, spec: str) -> Strategy:
        """The strategy of ``spec`` (checked), built on first use."""
        if spec not in self._strategies:
            self._strategies[spec] = make_strategy(spec, self.model)
        return self._strategies[spec]

    def _completion(self, ids: list[int], request: Request) -> Completion:
        """A strategy's output ``ids`` cut at a stop string, as text."""
        text = TextStream(self.model.tokenizer, request.stop)
        delta, keep = text.push(ids)
        ended = bool(ids) and ids[-1] in self.model.eos_token_ids
        if keep is not None:
            return Completion(delta, ids[:keep], "stop")
        return Completion(delta + text.finish(), ids, "stop" if ended else "length")

    def _use_attention(self) -> None:
        """Set this engine's attention on the model (which other engines may share, with theirs)."""
        transformer = self.model.transformer
        if transformer.sparse_attention != self.sparse_attention:
            transformer.use_sparse_attention(self.sparse_attention, self._channels)

    def _drafter(self, spec: str, fresh: bool) -> Drafter:
        """An idle drafter of ``spec`` (a checked spec), or a new one."""
        idle = None if fresh else self.pool.take(spec)
        return idle if idle is not None else make_drafter(spec, self._target)


def check_method(spec: str) -> None:
    """Raise InvalidParameter unless ``spec`` names a method with valid options (before a model is loaded)."""
    parse_method(spec)


def check_attention(spec: str | None) -> str:
    """The attention setting ``spec`` names, as results record it (``"full"`` or the Double Sparsity spec with
    every option); InvalidParameter for a bad one, before a model is loaded."""
    return attention_spec(parse_attention(spec))


def check_strategy(
    spec: str, method: str | None = None, sampling: SamplingParams = GREEDY, policy: MethodPolicy = OPERATOR
) -> None:
    """Raise InvalidParameter (``param`` "strategy") unless ``spec`` names a strategy with valid options that can
    run with the request's other choices: a strategy decides every token by its own rule, so it takes no
    speculative method and no sampling."""
    try:
        parse_strategy(spec, policy)
    except InvalidParameter as err:
        raise InvalidParameter(str(err), "strategy") from None
    if method is not None:
        raise InvalidParameter("a strategy decides the output by its own rule: no method beside it", "strategy")
    if not sampling.greedy:
        raise InvalidParameter("a strategy decides every token by its own rule: it takes no sampling", "strategy")


def strategy_policy(names: list[str] | None = None, options: bool = False) -> MethodPolicy:
    """What a server's clients may choose as a strategy: one of ``names`` (None: any; [] none), with its numeric
    and boolean options only when ``options`` (never those that name checkpoints)."""
    unknown = [name for name in names or [] if name not in STRATEGIES]
    if unknown:
        raise InvalidParameter(f"the allowed strategies must be some of {', '.join(STRATEGIES)}; got {clip(unknown)}")
    return MethodPolicy(None if names is None else frozenset(names), options=options, operator=False)


def describe_strategies() -> dict[str, tuple[str, list[tuple[str, object, str]]]]:
    """Every strategy's paper and options: (name, default, allowed values), for ``decodekit methods``."""
    return {
        name: (cls.paper, [(o.name, o.default, o.describe()) for o in strategy_options(name).values()])
        for name, cls in STRATEGIES.items()
    }


def describe_methods() -> dict[str, list[tuple[str, object, str]]]:
    """Every method's options: (name, default, allowed values), for ``decodekit methods``."""
    return {name: [(o.name, o.default, o.describe()) for o in method_options(name).values()] for name in METHODS}


def encode_prompt(model: LoadedModel, prompt: Prompt, chat: bool = True) -> list[int]:
    """Token ids of ``prompt`` (see :meth:`Engine.request`); token ids are checked and returned as they are."""
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        if not all(0 <= t < model.cfg.vocab_size for t in prompt):
            raise InvalidParameter("prompt token ids must be integers in [0, vocab_size)", "prompt")
        return list(prompt)
    if isinstance(prompt, list):
        return encode_chat(model.tokenizer, check_messages(prompt))
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidParameter("the prompt is empty", "prompt")
    check_text(prompt, "the prompt", "prompt")
    if chat:
        return encode_chat(model.tokenizer, [{"role": "user", "content": prompt}])
    return model.tokenizer.encode(prompt)


ROLES = ("system", "user", "assistant")


def check_messages(messages: list) -> list[dict[str, str]]:
    """Validate an OpenAI-style conversation: roles from ROLES, text contents, the last turn the user's."""
    if not messages:
        raise InvalidParameter("the conversation is empty", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise InvalidParameter(f"message {i} needs a role among {', '.join(ROLES)}", "messages")
        if not isinstance(message.get("content"), str):
            raise InvalidParameter(f"message {i} needs a text content", "messages")
        check_text(message["content"], f"message {i}", "messages")
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise InvalidParameter("the conversation must end with a non-empty user message", "messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _check_count(name: str, value: object, none_ok: bool = False, zero_ok: bool = False) -> None:
    """Raise InvalidParameter unless ``value`` is a positive integer (or 0, or None, where allowed)."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
        kind = "a non-negative" if zero_ok else "a positive"
        raise InvalidParameter(f"{name} must be {kind} integer, got {clip(value)}", name)
