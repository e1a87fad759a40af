"""S2D, sorted self-speculative drafts (Kavehzadeh et al., 2024): nested sub-networks of the target (its first k
layers with its own final norm and LM head, for a few k) draft for it at different costs, and each step drafts with
the one that has paid best.

The paper fine-tunes the target (SoFT) so that its early exits predict well; here the target is taken as it is,
so the nested exits are the ones it has, and the choice between them carries the method. Each exit is a slice of
the target with a KV cache of its own that follows the committed text (:class:`decodekit.runtime.runner
.ModelRunner`; an exit left unused catches up on the text in one forward when next chosen) and its own walker
(:class:`decodekit.drafters.walk.Walker`: a chain, or a top-k tree with ``branch``, cut where the exit's calibrated
chance of the path falls below ``min_prob``). For each exit the drafter keeps decayed means of the tokens a step
committed and of the nodes it drafted when that exit drafted; a step with exit k is worth
``committed / (1 + drafted * k / layers)`` (a drafted node costs k of the target's layers, a verification step
about all of them), and each step uses the exit worth most, except every ``EXPLORE_EVERY``-th step, which gives the
exit left unused longest a turn. The choice never changes the output (every draft is verified by the target).

Memory: a KV cache per exit over the sequence so far (plus the largest draft) for its layers, in the target's dtype.
"""

from __future__ import annotations

from typing import Annotated

import torch

from decodekit.drafters.options import LayerSet, Range, checked_options
from decodekit.drafters.walk import Walker
from decodekit.errors import InvalidParameter, clip
from decodekit.protocol import Draft, Drafter, StepOutcome, TargetInfo

DECAY = 0.9  # weight of the past per step an exit drafted, in its means
EXPLORE_EVERY = 8  # steps between turns for the exit left unused longest
MAX_EXITS = 6


@checked_options
class SortedDrafts(Drafter):
    """Method ``s2d``: exits after the first ``exits`` layers (layer counts joined by ``/``; default: a half, two
    thirds and five sixths of the target's layers) draft up to ``max_nodes`` nodes, ``branch`` children per depth,
    while the exit's chance of the path is at least ``min_prob``; each step uses the exit that has paid best."""

    wants_step_logits = False

    def __init__(
        self,
        target: TargetInfo,
        exits: Annotated[str, LayerSet(most=MAX_EXITS)] = "",
        max_nodes: Annotated[int, Range(1, 64)] = 8,
        min_prob: Annotated[float, Range(0.0, 1.0)] = 0.3,
        branch: Annotated[int, Range(1, 8)] = 1,
    ) -> None:
        if target.model is None:
            raise InvalidParameter("method s2d runs the target's own layers: build it through an Engine")
        model, layers = target.model, target.model.layers
        if layers < 2:
            raise InvalidParameter("method s2d drafts with the target's first layers: it needs a target of 2 or more")
        shares = (1 / 2, 2 / 3, 5 / 6)
        default = sorted({min(layers - 1, max(1, round(layers * share))) for share in shares})
        depths = LayerSet.layers(exits) if exits else default
        if not 1 <= min(depths) <= max(depths) < layers:
            raise InvalidParameter(f"s2d exits={clip(exits)}: exits are layer counts in [1, {layers - 1}]")
        self.layers, self.depths = layers, depths
        self.runners = [model.slice(range(depth)) for depth in depths]
        self.walkers = [Walker(max_nodes, min_prob, branch) for _ in depths]
        self.committed = [2.0] * len(depths)  # decayed means per exit: optimistic, so every exit gets tried
        self.drafted = [1.0] * len(depths)
        self.last_used = [0] * len(depths)
        self.steps = 0
        self.chosen = 0

    def worth(self, exit: int) -> float:
        """Committed tokens per unit of cost (a verification step = 1) of a step drafted by ``exit``."""
        return self.committed[exit] / (1.0 + self.drafted[exit] * self.depths[exit] / self.layers)

    def begin(self, prompt: torch.Tensor, prompt_logits: torch.Tensor | None) -> None:
        self.chosen = max(range(len(self.depths)), key=self.worth)
        self.runners[self.chosen].logits(prompt)  # the prompt's prefill, counted as drafting time

    def propose(self, sequence: torch.Tensor) -> Draft:
        self.steps += 1
        exits = range(len(self.depths))
        if self.steps % EXPLORE_EVERY == 0:
            self.chosen = min(exits, key=lambda exit: self.last_used[exit])
        else:
            self.chosen = max(exits, key=self.worth)
        self.last_used[self.chosen] = self.steps
        return self.walkers[self.chosen].propose(self.runners[self.chosen], sequence)

    def observe(self, outcome: StepOutcome) -> None:
        exit = self.chosen
        self.walkers[exit].calibration.observe(outcome)
        self.committed[exit] = DECAY * self.committed[exit] + (1 - DECAY) * len(outcome.committed)
        self.drafted[exit] = DECAY * self.drafted[exit] + (1 - DECAY) * (outcome.draft.tokens.numel() - 1)

    def memory_bytes(self) -> int:
        return sum(runner.memory_bytes() for runner in self.runners)
