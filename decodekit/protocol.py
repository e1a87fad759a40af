"""The drafter protocol: the types a drafter and the engine exchange, and the base class of every drafter.

The engine knows a speculative method only through :class:`Drafter`. Per request it calls ``begin`` once, then
repeats ``propose`` -> (one forward + verification) -> ``observe``. Drafters see token ids, the target's logits
and greedy choices, and under sampling the target distribution of a node; they never touch the target's forward
or its KV cache (a drafter that runs a model gets one with a cache of its own: :class:`ModelAccess`). Under load
the server may verify only a prefix of a draft (``Draft.prefix``), or skip ``propose`` for a
step: ``observe`` then gets a draft of the root alone, which the drafter did not propose (``StepOutcome.drafted``).
So a drafter lists its most promising nodes first (parents still before children): a cut then keeps the best
subtree of its size.

This is the bottom of the package: it imports torch and decodekit's errors, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import torch

from decodekit.errors import InvalidParameter

S = TypeVar("S")

MAX_DRAFT_NODES = 256  # the largest tree (root included) a drafter may propose; the engine reserves cache for it


@dataclass(frozen=True, eq=False)
class Tree:
    """A rooted tree over ``n`` nodes. ``parents``: int64 ``[n]``, ``parents[0] == -1``, ``parents[i] < i``."""

    parents: torch.Tensor

    @staticmethod
    def from_parents(parents: list[int] | torch.Tensor) -> Tree:
        """Validate parent pointers and wrap them. Raises InvalidParameter on a malformed tree."""
        p = torch.as_tensor(parents, dtype=torch.int64).flatten()
        if p.numel() == 0 or p[0].item() != -1:
            raise InvalidParameter("a draft tree needs a root: parents[0] must be -1")
        if p.numel() > 1 and not bool(((p[1:] >= 0) & (p[1:] < torch.arange(1, p.numel()))).all()):
            raise InvalidParameter("draft tree parents must satisfy 0 <= parents[i] < i for i > 0")
        return Tree(p)

    @staticmethod
    def chain(n: int) -> Tree:
        """A path of ``n`` nodes (root included): what autoregressive or single-sequence drafts use."""
        return Tree(torch.arange(-1, n - 1, dtype=torch.int64))

    @property
    def size(self) -> int:
        return self.parents.numel()

    @cached_property
    def depth(self) -> torch.Tensor:
        """int64 ``[n]``: distance from the root (root = 0)."""
        return torch.arange(self.size) if self.is_chain else node_depths(self.parents)

    @cached_property
    def ancestors(self) -> torch.Tensor:
        """bool ``[n, n]``: ``[i, j]`` is True when j is i or an ancestor of i."""
        if self.is_chain:
            return torch.ones(self.size, self.size, dtype=torch.bool).tril_()
        return ancestor_mask(self.parents)

    @cached_property
    def is_chain(self) -> bool:
        return bool((self.parents == torch.arange(-1, self.size - 1)).all())

    def padded(self, n: int) -> Tree:
        """This tree grown to ``n`` nodes by leaves under the root (so that trees of a batch share one size);
        no original node sees them."""
        if n <= self.size:
            return self
        return Tree(torch.cat([self.parents, torch.zeros(n - self.size, dtype=torch.int64)]))

    def prefix(self, n: int) -> Tree:
        """The tree of the first ``n`` nodes (topological order keeps it a tree)."""
        return self if n >= self.size else Tree(self.parents[:n])


def node_depths(parents: torch.Tensor) -> torch.Tensor:
    """Depth of every node of a topologically ordered tree. ``parents`` int64 ``[n]`` -> int64 ``[n]``."""
    parent_list = parents.tolist()
    depth = [0] * len(parent_list)
    for i in range(1, len(parent_list)):
        depth[i] = depth[parent_list[i]] + 1
    return torch.tensor(depth, dtype=torch.int64)


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """bool ``[n, n]`` with ``[i, j]`` True iff node j is node i or one of its ancestors."""
    n = parents.numel()
    mask = torch.eye(n, dtype=torch.bool)
    parent_list = parents.tolist()
    for i in range(1, n):
        mask[i] |= mask[parent_list[i]]
    return mask


def greedy_choice(logits: torch.Tensor) -> torch.Tensor:
    """int64 ``[...]``: the first maximum of every row of ``logits`` ``[..., V]``, exactly ``argmax``'s choice
    (ties and NaN alike); on the CPU ``max`` finds it ~3x faster than ``argmax`` over a 49k vocabulary."""
    return logits.max(dim=-1).indices


class DraftModel:
    """A model a drafter runs, a draft checkpoint or a slice of the target's layers, with a KV cache of its own
    that follows the sequences it is handed (made by :class:`ModelAccess`; the runtime implements it)."""

    def logits(self, sequence: torch.Tensor) -> torch.Tensor:
        """float ``[V]``: the logits after ``sequence`` int64 ``[t]``. Its cache keeps the longest
        prefix of ``sequence`` it held and scores the rest, so consecutive calls along one sequence (drafting
        token by token, then the next step's committed text) cost a forward of the new tokens only."""
        raise NotImplementedError

    def greedy(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 ``[n]``: the model's greedy choice after each prefix of ``tokens`` int64 ``[n]``, scored alone
        (teacher-forced; its cache is left as it is)."""
        raise NotImplementedError

    def memory_bytes(self) -> int:
        """Bytes its cache holds (the weights are shared and not counted)."""
        raise NotImplementedError


class EarlyExit:
    """What a drafter puts on a slice of the target in place of the layers above it (Kangaroo's adapter): a
    function of the residual stream leaving the slice at every position, with a cache of its own over the positions
    before (which the runner that holds it keeps in step with its own), and logits on top."""

    def new_cache(self, capacity: int) -> torch.Tensor:
        """An empty cache for ``capacity`` positions: a tensor whose first dimension is the position."""
        raise NotImplementedError

    def states(self, hidden: torch.Tensor, start: int, cache: torch.Tensor) -> torch.Tensor:
        """``hidden [n, H]`` (the slice's output at positions ``start .. start + n - 1``) -> ``[n, H]``; writes
        those positions into ``cache``, whose positions before ``start`` hold the sequence's earlier ones."""
        raise NotImplementedError

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """float ``[..., V]``: the logits of ``states [..., H]``."""
        raise NotImplementedError


class ModelAccess:
    """The target model as drafters may use it (``TargetInfo.model``): its shape, slices of it, draft checkpoints.
    A drafter never reaches the target's own cache: every :class:`DraftModel` brings its own."""

    layers: int
    hidden_size: int
    vocab_size: int
    identity: str  # names the target's weights: trained parts (heads) record it and are refused by other targets
    norm_eps: float  # the final norm's epsilon (see output_map)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """float ``[..., vocab]``: the target's final norm and LM head on residual-stream vectors ``hidden``
        ``[..., hidden_size]`` (what ``StepOutcome.hidden[layers]`` holds), as the target turns its own into logits."""
        raise NotImplementedError

    def head_over(self, vocab: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`head` restricted to the tokens ``vocab`` int64 ``[S]``: a function from ``[..., hidden_size]`` to
        float ``[..., S]``, the output layer read once into one matrix in :meth:`linear`'s form (for drafters that
        choose among few tokens: a fraction of the full head's cost, within :meth:`linear`'s rounding)."""
        raise NotImplementedError

    def output_map(self, vocab: torch.Tensor) -> torch.Tensor:
        """float32 ``[hidden_size, S]``: the target's final norm scale and LM head over the tokens ``vocab`` int64
        ``[S]`` as one frozen matrix: the logits of ``x`` are ``x / sqrt(mean(x**2) + norm_eps) @ output_map``
        (for drafters that learn, which need them differentiable)."""
        raise NotImplementedError

    def shared(self, key: Hashable, make: Callable[[], S]) -> S:
        """The object ``make()`` built for ``key`` on the first call, the same one on every later call: what all
        the drafters of this engine share (an online learner every request feeds)."""
        raise NotImplementedError

    def linear(self, weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x -> x @ weight.T`` (float32 ``[..., K]`` -> ``[..., N]``) for a drafter's own float weight ``[N, K]``,
        in the runtime's fastest form for one or a few rows (on a CPU with the kernels: 8-bit blocks, within the
        activations' rounding); for inference only."""
        raise NotImplementedError

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[..., hidden_size]``: the target's input embeddings of ``tokens`` int64 ``[...]`` (as its first block
        sees them)."""
        raise NotImplementedError

    def trained_file(self, kind: str) -> Path:
        """Where ``decodekit train KIND`` keeps what it trains for this target by default (it may not exist)."""
        raise NotImplementedError

    def slice(self, layers: Sequence[int], exit: EarlyExit | None = None) -> DraftModel:
        """The target run through ``layers`` only (increasing block indices), with ``exit`` on top (None: the
        target's final norm and LM head). Raises InvalidParameter on a bad layer list."""
        raise NotImplementedError

    def checkpoint(self, path: str) -> DraftModel:
        """A draft model loaded from ``path`` (a checkpoint directory or a GGUF file) on the target's device and
        dtype, loaded once however many drafters ask. Raises InvalidParameter unless it shares the target's
        tokenizer, ModelFileError when it cannot be read."""
        raise NotImplementedError


@dataclass(frozen=True)
class TargetInfo:
    """What a drafter may know about the target model when it is built; ``model``: the target itself, for
    drafters that run (part of) a model (None where no engine built the drafter)."""

    vocab_size: int
    device_type: str = "cpu"
    dtype: str = "float32"  # the weights': float32, bfloat16, float16, or gguf (a GGUF file's own quantized ones)
    model: ModelAccess | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Draft:
    """A token tree to verify. ``tokens`` int64 ``[n]`` laid out as ``tree``; ``tokens[0]`` is the root, the last
    committed token (the engine checks this).

    ``candidates`` bool ``[n]`` (None: every node): the nodes that may be accepted. The others are side tokens
    that ride in the same forward (a Jacobi window, say): their logits come back in ``observe``, and neither
    they nor their descendants are ever committed. The root is always a candidate.

    ``draft_probs`` float ``[n, V]`` (None: a deterministic draft): under sampling, row i is the distribution
    node i's token was drawn from (given its earlier siblings; row 0 unused); verification then accepts with
    min(1, p/q). A deterministic draft is accepted with probability p. Greedy verification ignores it.

    ``estimates`` float ``[n]`` (None: no estimate): the drafter's own chance that each node gets accepted, its
    whole path with it (root 1, never growing along a path). Only a hybrid reads it, to rank nodes across parts.
    """

    tokens: torch.Tensor
    tree: Tree
    candidates: torch.Tensor | None = None
    draft_probs: torch.Tensor | None = None
    estimates: torch.Tensor | None = None

    def prefix(self, n: int) -> Draft:
        """The draft cut to its first ``n`` nodes (still a tree: parents come first)."""
        if n >= self.tree.size:
            return self
        cut = lambda values: None if values is None else values[:n]  # noqa: E731
        return Draft(
            self.tokens[:n], self.tree.prefix(n), cut(self.candidates), cut(self.draft_probs), cut(self.estimates)
        )

    @property
    def num_candidates(self) -> int:
        """Draft nodes that may be accepted, the root excluded."""
        return (self.tree.size if self.candidates is None else int(self.candidates.sum())) - 1


@dataclass(frozen=True)
class StepOutcome:
    """What one verification step found, handed to ``Drafter.observe``.

    ``logits`` float ``[n, vocab]``: the target's logits after every draft node, rejected ones included
    (row i predicts the token that follows node i); ``[n, 0]`` inside a hybrid for a drafter whose
    ``wants_step_logits`` is False. ``accepted`` int64 ``[m]``: node indices of the accepted
    path, root first. ``committed``: the tokens appended to the sequence this step (accepted drafts then the
    target's bonus token), already cut at EOS, a stop string or the token budget. ``target_probs``: under
    sampling, the target distribution p (float64 ``[vocab]``, the request's sampling applied) of the token after
    a draft node, by node index; None for a greedy request. ``drafted``: False when the engine skipped
    ``propose`` this step (plain decoding under load; the draft is the root alone): a drafter may then skip
    learning that costs, since its drafts are not wanted for now.
    ``greedy_choices`` int64 ``[n]``: the token greedy decoding picks after every node, the first maximum of its
    logits row after any repetition penalty (what greedy verification compared the drafts with); the engine
    hands it on, and when left out it is taken from ``logits``. Cheaper to read than an argmax over ``logits``.
    ``hidden``: for a drafter with ``wants_hidden``, the target's residual stream entering each layer it names
    (``layers``: leaving the last block, before the final norm), float ``[n, hidden]`` by node; else None.
    """

    draft: Draft
    logits: torch.Tensor
    accepted: torch.Tensor
    committed: list[int]
    target_probs: Callable[[int], torch.Tensor] | None = None
    drafted: bool = True
    greedy_choices: torch.Tensor = None  # type: ignore[assignment]  # filled in by __post_init__
    hidden: dict[int, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.greedy_choices is None:
            object.__setattr__(self, "greedy_choices", greedy_choice(self.logits))


class Drafter:
    """The base of every drafter. A subclass implements ``propose`` (and usually ``begin`` and ``observe``), is
    built as ``cls(target: TargetInfo, **options)``, and declares what it needs and does by class attributes:

    ``wants_prompt_logits``: ``begin`` gets the logits over the prompt's last positions (they cost a
    vocabulary-wide projection per position). ``wants_step_logits``: ``observe`` reads ``StepOutcome.logits``
    (when False, a hybrid hands it ``[n, 0]`` instead of copying its rows). ``side_tokens``: its drafts carry
    nodes that are never accepted (``Draft.candidates``). ``samples_drafts``: its drafts carry the distributions
    their tokens were drawn from (``Draft.draft_probs``), drawn with ``self.generator``, a ``torch.Generator`` it
    owns, which the engine seeds from the request's seed before each sampled request, so that a seeded request
    drafts the same every time and the draws of different requests are independent. ``wants_hidden``: the
    layers whose hidden states (``StepOutcome.hidden``) ``observe`` reads. ``drafts_in_parallel``: it drafts on a
    thread of its own while the target verifies (PEARL), so the engine runs the target on one thread fewer.
    """

    wants_prompt_logits: bool = False
    wants_step_logits: bool = True
    side_tokens: bool = False
    samples_drafts: bool = False
    wants_hidden: tuple[int, ...] = ()
    drafts_in_parallel: bool = False

    def begin(self, prompt: torch.Tensor, prompt_logits: torch.Tensor | None) -> None:
        """Start a request. ``prompt`` int64 ``[p]``; ``prompt_logits`` float ``[m, vocab]`` over the last prompt
        positions, ``m <= p - 1`` (row i predicts token ``p - m + i``; the engine hands at most
        ``decodekit.decoding.PREFILL_CHUNK`` rows) when ``wants_prompt_logits``, else None."""

    def propose(self, sequence: torch.Tensor) -> Draft:
        """Draft from ``sequence`` int64 ``[t]`` (prompt and committed output; ``sequence[-1]`` is the root)."""
        raise NotImplementedError

    def observe(self, outcome: StepOutcome) -> None:
        """Learn from the verified step."""

    def end(self) -> None:
        """The request has ended (finished, failed or cancelled): stop any work for it. The drafter may start a
        later request (``begin``)."""

    def memory_bytes(self) -> int:
        """About how many bytes of state the drafter holds now (what keeping it idle costs); cheap to call."""
        return 0
