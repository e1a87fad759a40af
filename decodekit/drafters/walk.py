"""Drafting by running a model forward from the root: the shared loop of the model-based drafters (``draft``,
``swift``).

At each depth the model's ``branch`` most likely next tokens become children of the path's last node, each scored
by its chance of being accepted, and the path goes on through the most likely one. Drafting stops when that chance
falls below ``min_prob`` (SpecDec++'s rule, with the drafter's calibrated probability standing in for a trained
acceptance head) or the tree holds ``max_nodes`` nodes, so a draft is long where the model is sure and short where
it is not. A depth costs one forward of one token (the last drafted token is never fed); nodes come out best first
(:class:`decodekit.drafters.trie.DraftTrie`).

A node's chance is the product of the model's probabilities along its path times a calibration: the decayed count
of accepted draft nodes over the decayed sum of the chances they were given. A draft model that is sure and wrong
(a slice of a small target, say) drops below ``min_prob`` within a few steps; while even a first node could not
reach it, the walker drafts nothing and runs no forward, and probes once every ``PROBE_EVERY`` steps to learn
whether that has changed (the model then catches up on the skipped text in one forward).
"""

from __future__ import annotations

import torch

from decodekit.drafters.trie import DraftTrie, chain_draft
from decodekit.protocol import Draft, Drafter, DraftModel, StepOutcome

DECAY = 0.95  # weight of the past per drafted step in the calibration counts
PRIOR = 2.0  # pseudo-counts of the calibration: it starts at 1 (the model's probabilities taken as they are)
PROBE_EVERY = 16  # steps between two drafts while the calibrated chance of a first node is below min_prob


class Calibration:
    """How far a drafter's own chances of its nodes are to be trusted: the decayed count of accepted draft nodes
    over the decayed sum of the chances they were given (``PRIOR`` pseudo-counts: it starts at 1)."""

    def __init__(self) -> None:
        self.accepted = self.expected = PRIOR

    @property
    def scale(self) -> float:
        """What to multiply the model's chance of a path by (at most 1)."""
        return min(1.0, self.accepted / self.expected)

    def observe(self, outcome: StepOutcome) -> None:
        """Count the verified nodes of the drafter's own draft (``Draft.estimates``, scored with :attr:`scale`):
        accepted ones against the chances they were given, divided by that scale (the counts are of the model's own
        chances)."""
        estimates = outcome.draft.estimates
        if estimates is None or estimates.numel() < 2:
            return
        self.expected = DECAY * self.expected + float(estimates[1:].sum()) / self.scale
        self.accepted = DECAY * self.accepted + (outcome.accepted.numel() - 1)


class Walker:
    """Drafts of up to ``max_nodes`` nodes, ``branch`` children per depth, while the calibrated chance of the path
    is at least ``min_prob``."""

    def __init__(self, max_nodes: int, min_prob: float, branch: int) -> None:
        self.max_nodes, self.min_prob, self.branch = max_nodes, min_prob, branch
        self.calibration = Calibration()
        self.idle = 0  # steps since the walker last drafted

    def propose(self, model: DraftModel, sequence: torch.Tensor) -> Draft:
        """The draft tree ``model`` walks from ``sequence[-1]`` (int64 ``[t]``, the committed sequence)."""
        scale = self.calibration.scale
        if scale < self.min_prob and self.idle < PROBE_EVERY:
            self.idle += 1
            return chain_draft(int(sequence[-1]), [])
        self.idle = 0
        trie, node, chance = DraftTrie(), 0, scale
        context = sequence
        while len(trie) < self.max_nodes:
            probs = torch.softmax(model.logits(context), dim=-1)
            top = probs.topk(self.branch)
            best = None
            for p, token in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                if chance * p < self.min_prob or len(trie) >= self.max_nodes:
                    break
                child = trie.insert(node, token, chance * p)
                best = best or (child, token, chance * p)
            if best is None:
                break
            node, token, chance = best
            context = torch.cat([context, torch.tensor([token], dtype=torch.int64)])
        return trie.build(int(sequence[-1]), self.max_nodes, estimates=True)


class WalkingDrafter(Drafter):
    """A drafter whose drafts are ``self.walker``'s walks of the model ``self.runner`` (both set by the subclass's
    constructor): the prompt is prefilled at ``begin`` (counted as drafting time), and the memory is the runner's
    cache."""

    wants_step_logits = False
    runner: DraftModel
    walker: Walker

    def begin(self, prompt: torch.Tensor, prompt_logits: torch.Tensor | None) -> None:
        self.runner.logits(prompt)

    def propose(self, sequence: torch.Tensor) -> Draft:
        return self.walker.propose(self.runner, sequence)

    def observe(self, outcome: StepOutcome) -> None:
        self.walker.calibration.observe(outcome)

    def memory_bytes(self) -> int:
        return self.runner.memory_bytes()
