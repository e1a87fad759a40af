"""Hybrid: several drafters propose at once; their trees merge into one under a node budget.

Every part drafts its own tree from the same sequence, and each node gets an estimated chance of being accepted.
A part that estimates its own nodes (``Draft.estimates``: aded, suffix) is calibrated by those estimates: the
share of its nodes with an estimate in the same tenth of [0, 1] that matched the committed text (a running count
that starts at the tenth's middle). For any other part a node's chance is the product, along its path, of how
often the part's node at that index matched the committed text when its parent did (a running estimate per part
and node index, from a neutral prior): static trees (recycling) are calibrated node by node, chains (lookup,
copy) depth by depth. The committed tokens say what every node would have met, so nodes cut from the merged tree
are scored too, and a part that starts badly is not shut out for good. The merged trie keeps the ``max_nodes``
best-scored nodes at or above ``min_prob``; nodes two parts agree on are verified once. Each part then observes
its own kept nodes as if it had drafted alone (its rows of the target's greedy choices and, unless it declares
``wants_step_logits = False``, of the logits; its part of the accepted path).
"""

from __future__ import annotations

from typing import Annotated

import torch

from decodekit.drafters.options import Methods, Range, Renamed, checked_options
from decodekit.drafters.trie import DraftTrie
from decodekit.errors import InvalidParameter, clip
from decodekit.protocol import MAX_DRAFT_NODES, Draft, Drafter, StepOutcome, TargetInfo, Tree
from decodekit.verify import continuation_matches

MAX_PARTS = 8  # methods one hybrid merges
PART_BYTES = 20_000  # CPython 3.11: a part's four lists of running counts (~530 floats)
PRIOR_HITS, PRIOR_TRIALS = 1.0, 2.0  # a node nobody has seen yet is taken as a coin flip
BINS, BIN_PRIOR = 10, 4.0  # a part's own estimates, in tenths; each tenth starts as 4 nodes at its middle


@checked_options
class Hybrid(Drafter):
    """Method ``hybrid``. ``parts``: method specs joined by ``+`` (default options each; build a Hybrid in code
    for others). ``max_nodes``: draft nodes per step. ``min_prob``: the least estimated chance of reaching a node
    for it to be verified; a node pays when that chance exceeds MAT x (row cost / step cost). The defaults,
    aded + copyspec at 0.07 with 24 nodes, measured best of the mixes tried on the 2-vCPU AMX test machine in
    bfloat16 (192 Spec-Bench first turns: 4.42x transformers' greedy against 4.25x for aded alone, the best single
    drafter there; a row there costs 0.5-1 ms of a ~25 ms step, more with longer contexts, at MAT ~2.2: break-even
    0.04-0.09). Memory: the parts' own, plus four float arrays per part."""

    def __init__(
        self,
        target: TargetInfo,
        parts: Annotated[str, Methods(MAX_PARTS)] = "aded+copyspec",
        max_nodes: Annotated[int, Range(1, MAX_DRAFT_NODES - 1), Renamed("budget")] = 24,
        min_prob: Annotated[float, Range(0, 1), Renamed("min_score")] = 0.07,
    ) -> None:
        from decodekit.drafters import make_drafter  # the registry imports this module

        names = [name for name in parts.split("+") if name]
        if len(names) < 2 or "hybrid" in {name.partition(":")[0] for name in names}:
            raise InvalidParameter(f"hybrid needs two or more other methods joined by '+', got {clip(parts)}")
        self.parts = [make_drafter(name, target) for name in names]
        if any(part.side_tokens or part.samples_drafts for part in self.parts):
            raise InvalidParameter("hybrid merges deterministic drafts only: not lookahead's side tokens or sjd")
        self.max_nodes, self.min_prob = max_nodes, min_prob
        self.wants_prompt_logits = any(part.wants_prompt_logits for part in self.parts)
        self.wants_hidden = tuple(sorted({layer for part in self.parts for layer in part.wants_hidden}))
        self.drafts_in_parallel = any(part.drafts_in_parallel for part in self.parts)
        # running counts per part, kept as Python floats: a step reads and updates a few of them at a time
        self._hits = [[PRIOR_HITS] * MAX_DRAFT_NODES for _ in self.parts]
        self._trials = [[PRIOR_TRIALS] * MAX_DRAFT_NODES for _ in self.parts]
        self._bin_hits = [[BIN_PRIOR * ((b + 0.5) / BINS) for b in range(BINS)] for _ in self.parts]
        self._bin_trials = [[BIN_PRIOR] * BINS for _ in self.parts]
        self._drafts: list[_PartDraft] = []

    def begin(self, prompt: torch.Tensor, prompt_logits: torch.Tensor | None) -> None:
        for part in self.parts:
            part.begin(prompt, prompt_logits if part.wants_prompt_logits else None)

    def propose(self, sequence: torch.Tensor) -> Draft:
        trie = DraftTrie()
        self._drafts, trie_nodes = [], []
        for p, part in enumerate(self.parts):
            draft = part.propose(sequence)
            own = _PartDraft(draft, draft.tokens.tolist(), draft.tree.parents.tolist())
            if own.bins is not None:
                hits, trials = self._bin_hits[p], self._bin_trials[p]
                reach = [hits[b] / trials[b] for b in own.bins]
            else:
                hits, trials = self._hits[p], self._trials[p]
                reach = [1.0] * len(own.tokens)
                for i in range(1, len(own.tokens)):
                    reach[i] = reach[own.parents[i]] * hits[i] / trials[i]
            nodes = [0] * len(own.tokens)
            for i in range(1, len(own.tokens)):
                nodes[i] = trie.insert(nodes[own.parents[i]], own.tokens[i], reach[i])
            self._drafts.append(own)
            trie_nodes.append(nodes)
        merged = trie.build(int(sequence[-1]), self.max_nodes, self.min_prob)
        for own, nodes in zip(self._drafts, trie_nodes, strict=True):
            own.kept = [trie.draft_index.get(node, -1) for node in nodes]
        return merged

    def observe(self, outcome: StepOutcome) -> None:
        if outcome.draft.tree.size == 1:  # a step without drafting: the root alone is every part's draft too
            for part in self.parts:
                part.observe(outcome)
            return
        verified = outcome.draft.tree.size  # the engine may verify a prefix of the merged draft
        on_path = set(outcome.accepted.tolist())
        for p, (part, own) in enumerate(zip(self.parts, self._drafts, strict=True)):
            reached, matched = continuation_matches(own.tokens, own.parents, outcome.committed)
            if own.bins is not None:  # known: reached, or below a node that missed
                hits, trials = self._bin_hits[p], self._bin_trials[p]
                for i in range(1, len(own.tokens)):
                    if reached[i] or not matched[own.parents[i]]:
                        trials[own.bins[i]] += 1
                        hits[own.bins[i]] += matched[i]
            else:
                hits, trials = self._hits[p], self._trials[p]
                for i in range(1, len(own.tokens)):
                    trials[i] += reached[i]
                    hits[i] += matched[i]
            part.observe(_restrict(outcome, own, verified, on_path, part))

    def end(self) -> None:
        for part in self.parts:
            part.end()

    def memory_bytes(self) -> int:
        return sum(part.memory_bytes() for part in self.parts) + PART_BYTES * len(self.parts)


class _PartDraft:
    """One part's draft in the current step, as lists; ``kept``: the merged-draft index of each of its nodes,
    -1 where the merge cut it; ``bins``: the tenth of each node's own estimate, None without estimates."""

    def __init__(self, draft: Draft, tokens: list[int], parents: list[int]) -> None:
        self.draft, self.tokens, self.parents = draft, tokens, parents
        self.kept: list[int] = []
        self.bins = (
            None if draft.estimates is None else [min(int(e * BINS), BINS - 1) for e in draft.estimates.tolist()]
        )


def _restrict(outcome: StepOutcome, own: _PartDraft, verified: int, on_path: set[int], part: Drafter) -> StepOutcome:
    """The outcome as ``part`` sees it: its nodes that made it into the verified draft, renumbered, with their
    greedy choices, their logits (``[n, 0]`` unless it wants them: a vocabulary-wide copy that most parts never
    read), the hidden states it wants and its share of the accepted path (``on_path``: merged-draft indices)."""
    nodes = [i for i, m in enumerate(own.kept) if 0 <= m < verified]  # closed under parents, like the merged draft
    renumber = {node: j for j, node in enumerate(nodes)}
    rows = [own.kept[i] for i in nodes]
    at = torch.tensor(rows)
    estimates = None if own.draft.estimates is None else own.draft.estimates[nodes]
    tree = Tree(torch.tensor([-1] + [renumber[own.parents[i]] for i in nodes[1:]]))
    return StepOutcome(
        Draft(own.draft.tokens[nodes], tree, estimates=estimates),
        outcome.logits.index_select(0, at) if part.wants_step_logits else outcome.logits.new_empty(len(rows), 0),
        torch.tensor([j for j, row in enumerate(rows) if row in on_path], dtype=torch.int64),
        outcome.committed,
        None if outcome.target_probs is None else lambda j: outcome.target_probs(rows[j]),
        greedy_choices=outcome.greedy_choices[at],
        hidden=None if outcome.hidden is None else {layer: outcome.hidden[layer][at] for layer in part.wants_hidden},
    )
