"""The drafter protocol: the only thing the engine knows about a speculative method.

Per request the engine calls ``begin`` once, then repeats ``propose`` -> (one forward + verification) ->
``observe``. Drafters see token ids and target logits only; they never touch the model or the KV cache.
Under load the server may verify only a prefix of a draft (``Draft.prefix``), or skip ``propose`` for a step:
``observe`` then gets a draft of the root alone, which the drafter did not propose (``StepOutcome.drafted``).
So a drafter lists its most promising nodes first (parents still before children): a cut then keeps the best
subtree of its size. A drafter whose ``observe`` never reads ``StepOutcome.logits`` may say so with a class
attribute ``wants_step_logits = False``: a hybrid then hands it ``[n, 0]`` logits instead of copying its rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from decodekit.runtime.tree import Tree
from decodekit.sampling import Sampler
from decodekit.verify import greedy_choice

MAX_DRAFT_NODES = 256  # the largest tree (root included) a drafter may propose; the engine reserves cache for it


@dataclass(frozen=True)
class TargetInfo:
    """What a drafter may know about the target model when it is built."""

    vocab_size: int
    device_type: str = "cpu"
    dtype: str = "float32"


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
    target's bonus token), already cut at EOS, a stop string or the token budget. ``sampler``: the request's
    sampling state (parameters, random generator, the target distribution of any node), None in unit tests.
    ``drafted``: False when the engine skipped ``propose`` this step (plain decoding under load; the draft is
    the root alone): a drafter may then skip learning that costs, since its drafts are not wanted for now.
    ``greedy_choices`` int64 ``[n]``: the token greedy decoding picks after every node, the first maximum of its
    logits row after any repetition penalty (what greedy verification compared the drafts with); the engine
    hands it on, and when left out it is taken from ``logits``. Cheaper to read than an argmax over ``logits``.
    """

    draft: Draft
    logits: torch.Tensor
    accepted: torch.Tensor
    committed: list[int]
    sampler: Sampler | None = None
    drafted: bool = True
    greedy_choices: torch.Tensor = None  # type: ignore[assignment]  # filled in by __post_init__

    def __post_init__(self) -> None:
        if self.greedy_choices is None:
            object.__setattr__(self, "greedy_choices", greedy_choice(self.logits))


@runtime_checkable
class Drafter(Protocol):
    #: ask the engine for the prompt's logits at ``begin`` (costs an lm_head pass over the prompt)
    wants_prompt_logits: bool

    def begin(self, prompt: torch.Tensor, prompt_logits: torch.Tensor | None) -> None:
        """Start a request. ``prompt`` int64 ``[p]``; ``prompt_logits`` float ``[m, vocab]`` over the last prompt
        positions, ``m <= p - 1`` (row i predicts token ``p - m + i``; the engine hands at most
        ``decodekit.engine.PREFILL_CHUNK`` rows) when ``wants_prompt_logits``, else None."""

    def propose(self, sequence: torch.Tensor) -> Draft:
        """Draft from ``sequence`` int64 ``[t]`` (prompt and committed output; ``sequence[-1]`` is the root)."""

    def observe(self, outcome: StepOutcome) -> None:
        """Learn from the verified step."""

    def memory_bytes(self) -> int:
        """About how many bytes of state the drafter holds now (what keeping it idle costs); cheap to call."""


class Autoregressive:
    """Plain decoding (method ``ar``): a tree of the root alone, so each step commits exactly one token."""

    wants_prompt_logits = False
    _tree = Tree.chain(1)

    def __init__(self, target: TargetInfo) -> None:
        pass

    def begin(self, prompt: torch.Tensor, prompt_logits: torch.Tensor | None) -> None:
        pass

    def propose(self, sequence: torch.Tensor) -> Draft:
        return Draft(sequence[-1:], self._tree)

    def observe(self, outcome: StepOutcome) -> None:
        pass

    def memory_bytes(self) -> int:
        return 0
