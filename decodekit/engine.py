"""The decode loop every method shares.

prefill the prompt (all but its last token) -> repeat: the drafter proposes a tree rooted at the last committed
token -> one forward scores every node -> greedy verification picks the accepted path -> the cache keeps that
path's entries -> the drafter observes the outcome -> the committed tokens are cut at EOS, a stop string or the
token budget and handed out. Plain decoding (``ar``) is the same loop with a one-node tree.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from decodekit.drafters import Drafter, StepOutcome, TargetInfo, make_drafter
from decodekit.drafters.base import MAX_DRAFT_NODES, Draft
from decodekit.errors import DecodekitError, InvalidParameter, PromptTooLong, clip
from decodekit.runtime.kv_cache import KVCache
from decodekit.runtime.loader import LoadedModel
from decodekit.runtime.tree import Tree
from decodekit.sampling import GREEDY, Sampler, SamplingParams
from decodekit.text import TextStream, check_text, encode_chat, find_stop, stop_strings

# Prompt tokens per prefill forward (a batch prefills a joining request a few chunks a step: decodekit.batch), and
# the most prompt positions whose logits a drafter gets at ``Drafter.begin``.
PREFILL_CHUNK = 256


@dataclass
class GenerationStats:
    method: str
    prompt_tokens: int
    new_tokens: int = 0
    accepted_lengths: list[int] = field(default_factory=list)  # tokens committed by each verification step
    draft_sizes: list[int] = field(default_factory=list)  # draft nodes proposed by each step (root excluded)
    accepted_drafts: list[int] = field(default_factory=list)  # depth of each step's accepted path, before cuts
    seed: int | None = None  # the random seed a sampled request used (None: greedy)
    prefill_s: float = 0.0
    draft_s: float = 0.0  # in the drafter (propose and observe)
    forward_s: float = 0.0  # in the model's forward over the drafts and their verification
    wall_s: float = 0.0  # prefill included
    finish_reason: str = "length"  # "stop" (EOS or a stop string) or "length" (token budget or context window)

    @property
    def steps(self) -> int:
        return len(self.accepted_lengths)

    @property
    def mean_accepted(self) -> float:
        """MAT: tokens committed per verification step, the bonus token included (plain decoding = 1.0)."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens over proposed draft tokens (0 for plain decoding)."""
        proposed = sum(self.draft_sizes)
        return sum(self.accepted_drafts) / proposed if proposed else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        derived = {
            "steps": self.steps,
            "mean_accepted": self.mean_accepted,
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_s": self.tokens_per_s,
        }
        return asdict(self) | derived


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    stats: GenerationStats


@dataclass
class Chunk:
    """What one step adds: the committed token ids and the text that became certain."""

    token_ids: list[int]
    text: str


class GenerationStream:
    """An iterator of :class:`Chunk`; ``result`` holds the :class:`Generation` once iteration ends."""

    def __init__(self, steps: Iterator[Chunk]) -> None:
        self._steps = steps
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[Chunk]:
        self.result = yield from self._steps


class Engine:
    """Generates with one model and one speculative method; the drafter's state lives as long as the engine."""

    def __init__(self, model: LoadedModel, method: str | Drafter = "recycling") -> None:
        """``method``: a spec such as ``"recycling:tree=16"``, or any object implementing the Drafter protocol."""
        self.model = model
        if isinstance(method, str):
            self.method = method
            self.drafter: Drafter = make_drafter(method, target_info(model))
        elif all(hasattr(method, name) for name in ("begin", "propose", "observe", "wants_prompt_logits")):
            self.method, self.drafter = type(method).__name__, method
        else:
            raise InvalidParameter(f"method must be a method spec such as 'recycling' or a drafter, got {clip(method)}")
        self._cache: KVCache | None = None

    def encode(self, prompt: str | list[int] | list[dict[str, str]], chat: bool = True) -> list[int]:
        """Token ids of ``prompt`` (see :func:`encode_prompt`)."""
        return encode_prompt(self.model, prompt, chat)

    def stream(
        self,
        prompt: str | list[int] | list[dict[str, str]],
        max_new_tokens: int = 256,
        stop: str | Sequence[str] = (),
        chat: bool = True,
        sampling: SamplingParams = GREEDY,
    ) -> GenerationStream:
        """Generate lazily: iterate the returned stream for chunks, then read ``.result``."""
        prompt_ids = self.encode(prompt, chat)
        self.validate(prompt_ids, max_new_tokens)
        if not isinstance(sampling, SamplingParams):
            raise InvalidParameter("sampling must be a SamplingParams")
        return GenerationStream(self._decode(prompt_ids, max_new_tokens, stop_strings(stop), sampling))

    def generate(
        self,
        prompt: str | list[int] | list[dict[str, str]],
        max_new_tokens: int = 256,
        stop: str | Sequence[str] = (),
        chat: bool = True,
        on_chunk: Callable[[Chunk], None] | None = None,
        sampling: SamplingParams = GREEDY,
    ) -> Generation:
        """Generate greedily, or by ``sampling``; the method never changes the output's distribution."""
        stream = self.stream(prompt, max_new_tokens, stop, chat, sampling)
        for chunk in stream:
            if on_chunk is not None:
                on_chunk(chunk)
        assert stream.result is not None
        return stream.result

    def validate(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        validate_request(self.model, prompt_ids, max_new_tokens)

    def _cache_for(self, capacity: int) -> KVCache:
        if self._cache is None or self._cache.capacity < capacity:
            self._cache = self.model.transformer.new_cache(capacity)
        self._cache.reset()
        return self._cache

    def _decode(
        self, prompt_ids: list[int], max_new_tokens: int, stop: list[str], sampling: SamplingParams
    ) -> Iterator[Chunk]:
        decoding = Decoding(self.model, self.drafter, self.method, prompt_ids, max_new_tokens, stop, sampling)
        cache = self._cache_for(decoding.capacity)
        decoding.prefill(cache)
        while not decoding.done:
            draft = decoding.propose()
            start = time.perf_counter()
            logits = self.model.transformer(draft.tokens[None].to(self.model.device), cache, draft.tree)[0]
            yield decoding.accept(draft, logits, cache, 0, time.perf_counter() - start)
        return decoding.result()


class Decoding:
    """One request between decode steps: its drafter and sampler, the sequence so far, the text handed out and
    the stats. A decode loop (:class:`Engine` for one request, ``decodekit.batch.Batch`` for many) drives it:
    ``prefill`` until ``prefilled`` (in one call, or a chunk at a time between other requests' steps), then
    ``propose`` -> one forward over the draft -> ``accept`` until ``done``."""

    def __init__(
        self,
        model: LoadedModel,
        drafter: Drafter,
        method: str,
        prompt_ids: list[int],
        max_new_tokens: int,
        stop: list[str],
        sampling: SamplingParams,
    ) -> None:
        self.model, self.drafter, self.method = model, drafter, method
        self.prompt_ids = prompt_ids
        self.budget = min(max_new_tokens, model.cfg.context_window - len(prompt_ids))
        self.sampler = Sampler(sampling, model.cfg.vocab_size, prompt_ids)
        self.stats = GenerationStats(method, len(prompt_ids), seed=None if sampling.greedy else self.sampler.seed)
        self.sequence = torch.empty(len(prompt_ids) + self.budget + 1, dtype=torch.int64)
        self.sequence[: len(prompt_ids)] = torch.tensor(prompt_ids)
        self.length = len(prompt_ids)
        self.stop = stop_strings(stop)
        self.text = TextStream(model.tokenizer, self.stop)
        self.out: list[int] = []
        self.done = False
        self.last_path = torch.zeros(1, dtype=torch.int64)  # node indices the last step accepted, root first
        self.prompt_scored = 0  # prompt tokens in the cache
        self.prefilled = False  # the whole prompt is in and the drafter has begun
        self._proposed = False  # the drafter proposed since the last step
        self._start = time.perf_counter()

    @property
    def capacity(self) -> int:
        """Cache slots the request may need: prompt, output and the largest draft."""
        return len(self.prompt_ids) + self.budget + MAX_DRAFT_NODES

    @property
    def prompt_left(self) -> int:
        """Prompt tokens still to prefill."""
        return len(self.prompt_ids) - 1 - self.prompt_scored

    def prefill(self, cache: KVCache, budget: int | None = None, prompt_logits: bool = True) -> int:
        """Score more of the prompt (all but its last token, the first root) into ``cache``, a one-row cache, and
        commit it: whole chunks while their tokens fit in ``budget`` (None: every chunk left), at least one.
        Chunks hold PREFILL_CHUNK tokens counted back from the prompt's end (the first may be shorter), so the
        last one holds the last ``m = min(p - 1, PREFILL_CHUNK)`` positions: their logits ``[m, vocab]`` go to a
        drafter that wants prompt logits, unless ``prompt_logits`` is False (they cost a vocabulary-wide
        projection per token). After the last chunk the drafter begins and ``prefilled`` is set. Returns the
        tokens scored."""
        assert not self.prefilled
        start = time.perf_counter()
        if self.prompt_scored == 0:
            self._start = start
        scored, seeds = 0, None
        while self.prompt_left:
            first, n = self.prompt_scored, (self.prompt_left - 1) % PREFILL_CHUNK + 1
            if scored and budget is not None and scored + n > budget:
                break
            want = n == self.prompt_left and prompt_logits and self.drafter.wants_prompt_logits
            tokens = self.sequence[None, first : first + n].to(self.model.device)
            logits = self.model.transformer(tokens, cache, logits_at=None if want else slice(0, 0))
            cache.commit(0, n)
            self.prompt_scored += n
            scored += n
            seeds = logits[0] if want else None
        if not self.prompt_left:
            self.drafter.begin(self.sequence[: self.length], seeds)
            self.prefilled = True
        self.stats.prefill_s += time.perf_counter() - start
        return scored

    def propose(self) -> Draft:
        """The drafter's tree for the next step, checked."""
        start = time.perf_counter()
        draft = self.drafter.propose(self.sequence[: self.length])
        _check(draft, int(self.sequence[self.length - 1]), self.method)
        self.stats.draft_s += time.perf_counter() - start
        self._proposed = True
        return draft

    def root_draft(self) -> Draft:
        """A step that skips ``propose``: the root alone (one token, as plain decoding)."""
        return Draft(self.sequence[self.length - 1 : self.length], ROOT)

    def accept(self, draft: Draft, logits: torch.Tensor, cache: KVCache, row: int, forward_s: float) -> Chunk:
        """Verify ``draft`` against its ``logits`` ``[n, vocab]`` (row ``row`` of ``cache`` holds its entries),
        commit the accepted path there, let the drafter observe and hand out the committed tokens. Sets ``done``
        after the last step."""
        start = time.perf_counter()
        greedy_choices = self.sampler.greedy_choices(draft.tokens, draft.tree, logits)
        path, bonus = self.sampler.verify(
            draft.tokens, draft.tree, logits, greedy_choices, draft.candidates, draft.draft_probs
        )
        cache.commit(row, path)
        self.last_path = path
        self.stats.forward_s += forward_s + time.perf_counter() - start
        committed = [*draft.tokens[path[1:]].tolist(), bonus]
        committed, finish = _cut(committed, self.model.eos_token_ids, self.budget - len(self.out))
        delta, keep = self.text.push(committed)
        if keep is not None:
            committed, finish = committed[:keep], "stop"
        start = time.perf_counter()
        self.drafter.observe(StepOutcome(draft, logits, path, committed, self.sampler, self._proposed, greedy_choices))
        self._proposed = False
        self.stats.draft_s += time.perf_counter() - start
        self.sampler.advance(committed)
        self.out.extend(committed)
        self.sequence[self.length : self.length + len(committed)] = torch.tensor(committed)
        self.length += len(committed)
        self.stats.accepted_lengths.append(len(committed))
        self.stats.draft_sizes.append(draft.num_candidates)
        self.stats.accepted_drafts.append(len(path) - 1)
        if finish is not None:
            self.stats.finish_reason, self.done = finish, True
            return Chunk(committed, delta + self.text.finish())
        return Chunk(committed, delta)

    def result(self) -> Generation:
        """The whole generation, once ``done``."""
        self.stats.new_tokens = len(self.out)
        self.stats.wall_s = time.perf_counter() - self._start
        final = self.text.decode(self.out)
        if self.text.stopped:
            final = final[: find_stop(final, self.stop)]
        return Generation(final, self.out, self.prompt_ids, self.stats)


ROOT = Tree.chain(1)


def target_info(model: LoadedModel) -> TargetInfo:
    """What drafters may know about ``model``."""
    return TargetInfo(model.cfg.vocab_size, model.device.type, str(model.dtype).removeprefix("torch."))


def encode_prompt(model: LoadedModel, prompt: str | list[int] | list[dict[str, str]], chat: bool = True) -> list[int]:
    """Token ids of ``prompt``: a user message, or a conversation (OpenAI-style ``[{"role", "content"}]`` ending
    with a user turn), wrapped in the checkpoint's chat template when ``chat`` and it has one; token ids are
    returned as they are."""
    if _is_token_ids(prompt):
        return list(prompt)
    if isinstance(prompt, list):
        return encode_chat(model.tokenizer, check_messages(prompt))
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidParameter("the prompt is empty")
    check_text(prompt, "the prompt")
    if chat:
        return encode_chat(model.tokenizer, [{"role": "user", "content": prompt}])
    return model.tokenizer(prompt)["input_ids"]


def validate_request(model: LoadedModel, prompt_ids: list[int], max_new_tokens: int) -> None:
    """Raise InvalidParameter or PromptTooLong unless ``model`` can generate ``max_new_tokens`` after
    ``prompt_ids``."""
    window = model.cfg.context_window
    if not prompt_ids:
        raise InvalidParameter("the prompt is empty")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidParameter(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if max_new_tokens > window:
        raise InvalidParameter(f"max_new_tokens {max_new_tokens} exceeds the context window of {window} tokens")
    if len(prompt_ids) >= window:
        raise PromptTooLong(f"the prompt has {len(prompt_ids)} tokens; the context window holds {window}")
    if not all(isinstance(t, int) and 0 <= t < model.cfg.vocab_size for t in prompt_ids):
        raise InvalidParameter("prompt token ids must be integers in [0, vocab_size)")


ROLES = ("system", "user", "assistant")


def check_messages(messages: list) -> list[dict[str, str]]:
    """Validate an OpenAI-style conversation: roles from ROLES, text contents, the last turn the user's."""
    if not messages:
        raise InvalidParameter("the conversation is empty")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise InvalidParameter(f"message {i} needs a role among {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise InvalidParameter(f"message {i} needs a text content")
        check_text(message["content"], f"message {i}")
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise InvalidParameter("the conversation must end with a non-empty user message")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _check(draft: Draft, root: int, method: str) -> None:
    """A drafter bug must not corrupt the output: refuse a malformed draft."""
    if draft.tree.size > MAX_DRAFT_NODES or draft.tokens.shape != (draft.tree.size,):
        raise DecodekitError(f"{method} proposed a draft of {draft.tokens.shape} tokens (at most {MAX_DRAFT_NODES})")
    if int(draft.tokens[0]) != root:
        raise DecodekitError(f"{method} proposed a tree whose root is not the last committed token")
    if draft.candidates is not None and (draft.candidates.shape != draft.tokens.shape or not draft.candidates[0]):
        raise DecodekitError(f"{method} proposed a candidate mask of the wrong shape or without the root")
    if draft.draft_probs is not None and draft.draft_probs.shape[0] != draft.tree.size:
        raise DecodekitError(f"{method} proposed draft probabilities for {draft.draft_probs.shape[0]} nodes")


def _is_token_ids(prompt: object) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)


def _cut(tokens: list[int], eos: frozenset[int], room: int) -> tuple[list[int], str | None]:
    """Cut committed tokens after the first EOS (kept) or at the remaining budget ``room``."""
    for i, token in enumerate(tokens[:room]):
        if token in eos:
            return tokens[: i + 1], "stop"
    if len(tokens) >= room:
        return tokens[:room], "length"
    return tokens, None
