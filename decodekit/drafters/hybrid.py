"""Hybrid: several drafters propose at once; their trees merge into one under a node budget.

Every part drafts its own tree from the same sequence, and each node gets an estimated chance of being accepted.
A part that estimates its own nodes (``Draft.estimates``: aded, suffix) is calibrated by those estimates: the
share of its nodes with an estimate in the same tenth of [0, 1] that matched the committed text (a running count
that starts at the tenth's middle). For any other part a node's chance is the product, along its path, of how
often the part's node at that index matched the committed text when its parent did (a running estimate per part
and node index, from a neutral prior): static trees (recycling) are calibrated node by node, chains (lookup,
copy) depth by depth. The committed tokens say what every node would have met, so nodes cut from the merged tree
are scored too, and a part that starts badly is not shut out for good. The merged trie keeps the ``budget``
best-scored nodes at or above ``min_score``; nodes two parts agree on are verified once. Each part then observes
its own kept nodes as if it had drafted alone (its rows of the target logits, its part of the accepted path).
"""

from __future__ import annotations

import torch

from decodekit.drafters.base import MAX_DRAFT_NODES, Draft, StepOutcome, TargetInfo
from decodekit.drafters.trie import DraftTrie
from decodekit.errors import InvalidParameter
from decodekit.runtime.tree import Tree
from decodekit.verify import continuation_matches

PRIOR_HITS, PRIOR_TRIALS = 1.0, 2.0  # a node nobody has seen yet is taken as a coin flip
BINS, BIN_PRIOR = 10, 4.0  # a part's own estimates, in tenths; each tenth starts as 4 nodes at its middle


class Hybrid:
    """Method ``hybrid``. ``parts``: method specs joined by ``+`` (default options each; build a Hybrid in code
    for others; the default pairs the two best single drafters on Spec-Bench here). ``budget``: draft nodes per
    step. ``min_score``: the least estimated chance of reaching a node for it to be verified. A node pays when
    that chance exceeds MAT x (node cost / step cost): on the 2-core test CPU, Spec-Bench prompts, ~2.7 ms per
    node against an ~88 ms step at MAT ~2.7, so ~0.08; 0.1 measured best (12 questions: 1.91x ar at 0.1, 1.82x
    at 0.05). Memory: the parts' own, plus four float arrays per part."""

    def __init__(
        self, target: TargetInfo, parts: str = "aded+lookup", budget: int = 16, min_score: float = 0.1
    ) -> None:
        from decodekit.drafters import make_drafter  # the registry imports this module

        names = [name for name in parts.split("+") if name]
        if len(names) < 2 or "hybrid" in {name.partition(":")[0] for name in names}:
            raise InvalidParameter(f"hybrid needs two or more other methods joined by '+', got {parts!r}")
        if budget < 1:
            raise InvalidParameter(f"hybrid budget must be >= 1, got {budget}")
        self.parts = [make_drafter(name, target) for name in names]
        if any(getattr(part, "side_tokens", False) or getattr(part, "samples_drafts", False) for part in self.parts):
            raise InvalidParameter("hybrid merges deterministic drafts only: not lookahead's side tokens or sjd")
        self.budget, self.min_score = budget, min_score
        self.wants_prompt_logits = any(part.wants_prompt_logits for part in self.parts)
        self._hits = torch.full((len(self.parts), MAX_DRAFT_NODES), PRIOR_HITS, dtype=torch.float64)
        self._trials = torch.full((len(self.parts), MAX_DRAFT_NODES), PRIOR_TRIALS, dtype=torch.float64)
        middles = (torch.arange(BINS, dtype=torch.float64) + 0.5) / BINS
        self._bin_hits = (BIN_PRIOR * middles).repeat(len(self.parts), 1)
        self._bin_trials = torch.full((len(self.parts), BINS), BIN_PRIOR, dtype=torch.float64)
        self._drafts: list[Draft] = []
        self._kept: list[list[int]] = []  # per part: merged-draft index of each of its nodes, -1 if cut

    def begin(self, prompt: torch.Tensor, prompt_logits: torch.Tensor | None) -> None:
        for part in self.parts:
            part.begin(prompt, prompt_logits if part.wants_prompt_logits else None)

    def propose(self, sequence: torch.Tensor) -> Draft:
        trie = DraftTrie()
        self._drafts, trie_nodes = [], []
        for p, part in enumerate(self.parts):
            draft = part.propose(sequence)
            parents, tokens = draft.tree.parents.tolist(), draft.tokens.tolist()
            if draft.estimates is not None:
                bins = _bins(draft.estimates)
                reach = (self._bin_hits[p, bins] / self._bin_trials[p, bins]).tolist()
            else:
                rate = (self._hits[p, : draft.tree.size] / self._trials[p, : draft.tree.size]).tolist()
                reach = [1.0] * len(tokens)
                for i in range(1, len(tokens)):
                    reach[i] = reach[parents[i]] * rate[i]
            nodes = [0] * len(tokens)
            for i in range(1, len(tokens)):
                nodes[i] = trie.insert(nodes[parents[i]], tokens[i], reach[i])
            self._drafts.append(draft)
            trie_nodes.append(nodes)
        merged = trie.build(int(sequence[-1]), self.budget, self.min_score)
        self._kept = [[trie.draft_index.get(node, -1) for node in nodes] for nodes in trie_nodes]
        return merged

    def observe(self, outcome: StepOutcome) -> None:
        if outcome.draft.tree.size == 1:  # a step without drafting: the root alone is every part's draft too
            for part in self.parts:
                part.observe(outcome)
            return
        on_path = torch.zeros(outcome.draft.tree.size, dtype=torch.bool)
        on_path[outcome.accepted] = True
        for p, (part, draft, kept) in enumerate(zip(self.parts, self._drafts, self._kept, strict=True)):
            tried, matched = continuation_matches(draft.tokens, draft.tree, outcome.committed)
            if draft.estimates is not None:  # known: reached, or below a node that missed
                known = tried | ~matched[draft.tree.parents.clamp(min=0)]
                bins = _bins(draft.estimates[1:])
                self._bin_trials[p].index_add_(0, bins, known[1:].double())
                self._bin_hits[p].index_add_(0, bins, matched[1:].double())
            else:
                tried[0] = matched[0] = False  # the root is no guess
                self._trials[p, : draft.tree.size] += tried
                self._hits[p, : draft.tree.size] += matched
            index = torch.tensor(kept)
            index[index >= outcome.draft.tree.size] = -1  # the engine may verify a prefix of the merged draft
            part.observe(_restrict(outcome, on_path, draft, index))


def _bins(estimates: torch.Tensor) -> torch.Tensor:
    """The tenth of [0, 1] each estimate falls in (int64, same shape)."""
    return (estimates * BINS).long().clamp(0, BINS - 1)


def _restrict(outcome: StepOutcome, on_path: torch.Tensor, draft: Draft, index: torch.Tensor) -> StepOutcome:
    """The outcome as one part sees it: its nodes that made it into the merged draft (``index``: merged index of
    each part node, -1 if cut), renumbered, with their logits and its share of the accepted path (``on_path``:
    bool over the merged draft)."""
    own = (index >= 0).nonzero().flatten()  # closed under parents: a kept trie node's parent is kept
    renumber = torch.full((draft.tree.size,), -1, dtype=torch.int64)
    renumber[own] = torch.arange(own.numel())
    parents = torch.where(own == 0, -1, renumber[draft.tree.parents[own].clamp(min=0)])
    merged_rows = index[own]
    return StepOutcome(
        Draft(draft.tokens[own], Tree(parents)),
        outcome.logits[merged_rows],
        on_path[merged_rows].nonzero().flatten(),
        outcome.committed,
        outcome.sampler,
    )
