"""One request's decoding, step by step: the part of the decode loop that is the same for every method.

prefill the prompt (all but its last token) -> repeat: the drafter proposes a tree rooted at the last committed
token -> one forward scores every node (the caller's, over many requests at once) -> verification picks the
accepted path -> the cache keeps that path's entries -> the drafter observes the outcome -> the committed tokens
are cut at EOS, a stop string or the token budget and handed out. Plain decoding (``ar``) is the same loop with a
one-node tree.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from functools import partial

import torch

from decodekit.errors import DecodekitError
from decodekit.protocol import MAX_DRAFT_NODES, Draft, Drafter, StepOutcome, TargetInfo, Tree
from decodekit.runtime.kv_cache import KVCache
from decodekit.runtime.loader import LoadedModel
from decodekit.runtime.runner import TargetModel
from decodekit.sampling import GREEDY, Sampler, SamplingParams
from decodekit.text import TextStream, find_stop

# Prompt tokens per prefill forward (a batch prefills a joining request a few chunks a step: decodekit.batch), and
# the most prompt positions whose logits a drafter gets at ``Drafter.begin``.
PREFILL_CHUNK = 256


@dataclass(frozen=True)
class Request:
    """A checked request, ready to decode (``decodekit.engine.Engine.request`` makes them): prompt token ids,
    at most ``max_new_tokens`` new ones, stop strings, the sampling, and the method spec (None: the engine's)."""

    prompt_ids: list[int]
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    sampling: SamplingParams = GREEDY
    method: str | None = None
    strategy: str | None = None  # a decoding strategy's spec: it decides the output (decodekit.strategies)


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
    strategy: str | None = None  # set where a strategy decided the output: then it differs from plain decoding

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
            "lossless": self.strategy is None,
        }
        return asdict(self) | derived


@dataclass
class Completion:
    """One of several outputs of a strategy that returns more than one (diverse beams, superposed drafts)."""

    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class Generation:
    """The output; ``completions``: every output, best first, where a strategy returned several (the first is
    ``text``/``token_ids``), else empty."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    stats: GenerationStats
    completions: list[Completion] = field(default_factory=list)


@dataclass
class Chunk:
    """What one step adds: the committed token ids and the text that became certain."""

    token_ids: list[int]
    text: str


class Decoding:
    """One request between decode steps: its drafter and sampler, the sequence so far, the text handed out and
    the stats. :class:`decodekit.batch.Batch` drives it: ``prefill`` until ``prefilled`` (in one call, or a chunk
    at a time between other requests' steps), then ``propose`` -> one forward over the draft -> ``accept`` until
    ``done``."""

    def __init__(self, model: LoadedModel, drafter: Drafter, method: str, request: Request) -> None:
        """``method``: the spec (or drafter class) that ``drafter`` was built by, for stats and messages."""
        self.model, self.drafter, self.method, self.request = model, drafter, method, request
        self.prompt_ids = prompt_ids = request.prompt_ids
        self.budget = min(request.max_new_tokens, model.cfg.context_window - len(prompt_ids))
        sampling = request.sampling
        self.sampler = Sampler(sampling, model.cfg.vocab_size, prompt_ids)
        self.stats = GenerationStats(method, len(prompt_ids), seed=None if sampling.greedy else self.sampler.seed)
        self.sequence = torch.empty(len(prompt_ids) + self.budget + 1, dtype=torch.int64)
        self.sequence[: len(prompt_ids)] = torch.tensor(prompt_ids)
        self.length = len(prompt_ids)
        self.stop = list(request.stop)
        if drafter.samples_drafts and not sampling.greedy:  # its draws: a stream of their own, from the seed
            drafter.generator.manual_seed(draft_seed(self.sampler.seed))
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

    def accept(
        self,
        draft: Draft,
        logits: torch.Tensor,
        cache: KVCache,
        row: int,
        forward_s: float,
        hidden: dict[int, torch.Tensor] | None = None,
    ) -> Chunk:
        """Verify ``draft`` against its ``logits`` ``[n, vocab]`` (row ``row`` of ``cache`` holds its entries),
        commit the accepted path there, let the drafter observe (with the ``hidden`` states it wants, ``[n,
        hidden]`` by layer) and hand out the committed tokens. Sets ``done`` after the last step."""
        start = time.perf_counter()
        greedy_choices = self.sampler.greedy_choices(draft.tokens, draft.tree, logits)
        path, bonus = self.sampler.verify(
            draft.tokens, draft.tree, logits, greedy_choices, draft.candidates, draft.draft_probs
        )
        cache.commit(row, path)
        self.last_path = path
        self.stats.forward_s += forward_s + time.perf_counter() - start
        committed = [*draft.tokens[path[1:]].tolist(), bonus]
        committed, finish = cut_committed(committed, self.model.eos_token_ids, self.budget - len(self.out))
        delta, keep = self.text.push(committed)
        if keep is not None:
            committed, finish = committed[:keep], "stop"
        start = time.perf_counter()
        sampled = not self.sampler.params.greedy
        probs = partial(self.sampler.node_probs, logits, draft.tokens, draft.tree) if sampled else None
        outcome = StepOutcome(draft, logits, path, committed, probs, self._proposed, greedy_choices, hidden)
        self.drafter.observe(outcome)
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


def draft_seed(seed: int) -> int:
    """The seed of a sampling drafter's generator for a request seeded ``seed``: a stream other than the
    verifier's (torch's generator reads only the low 32 bits of a seed, so those must differ)."""
    derived = random.Random(seed).getrandbits(32)
    return derived ^ 1 if derived == seed & 0xFFFFFFFF else derived


def target_info(model: LoadedModel) -> TargetInfo:
    """What drafters may know about ``model``, and the model itself for those that run (part of) one (one
    :class:`TargetModel` per call: its draft checkpoints load once per engine)."""
    return TargetInfo(model.cfg.vocab_size, model.device.type, model.dtype_option, TargetModel(model))


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


def cut_committed(tokens: list[int], eos: frozenset[int] | set[int], room: int) -> tuple[list[int], str | None]:
    """Cut committed tokens after the first EOS (kept) or at the remaining budget ``room``."""
    for i, token in enumerate(tokens[:room]):
        if token in eos:
            return tokens[: i + 1], "stop"
    if len(tokens) >= room:
        return tokens[:room], "length"
    return tokens, None
