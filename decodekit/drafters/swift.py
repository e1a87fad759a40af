"""SWIFT: on-the-fly self-speculative decoding (Xia et al., 2024): the target with some of its layers skipped
drafts for the target, with no training and no second model.

The draft model is a slice of the target (the layers it keeps, the target's embeddings, final norm and LM head) with
a KV cache of its own; it drafts by walking forward from the root (:class:`decodekit.drafters.walk.Walker`: a chain
through its most likely tokens, extra leaves with ``branch``, cut where its calibrated chance of the path falls
below ``min_prob``, no drafting at all while a slice that is sure and wrong keeps being rejected). Which layers to
skip is searched while decoding, as in the paper, but by a simpler search: every ``TRIAL_EVERY`` steps, while trials
are left, one skipped layer is swapped with one kept layer at random, both sets score the last ``window`` committed
tokens (teacher-forced: how often the slice's greedy choice is the token that followed), and the better set stays.
The number of skipped layers stays fixed, so a slice's drafting cost stays fixed too and a better score means more
accepted tokens for the same price (the paper's Bayesian search over sets of any size is left out). The search state
lives in the drafter, so a pooled drafter keeps what it found for later requests; greedy output never depends on it.

Memory: a KV cache over the sequence so far (plus the largest draft) for the kept layers, in the target's dtype.
"""

from __future__ import annotations

import random
from typing import Annotated

import torch

from decodekit.drafters.options import LayerSet, Range, checked_options
from decodekit.drafters.walk import Walker, WalkingDrafter
from decodekit.errors import InvalidParameter, clip
from decodekit.protocol import StepOutcome, TargetInfo

TRIAL_EVERY = 16  # steps between two trials of the skip-set search (a trial costs two forwards of the slice)


@checked_options
class LayerSkip(WalkingDrafter):
    """Method ``swift``: skip ``skip`` of the target's layers (a share; or the layers ``skipped`` names, such as
    ``4-9/12``) to draft up to ``max_nodes`` nodes, ``branch`` children per depth, while the slice's chance of the
    path is at least ``min_prob``; ``trials`` swaps of the skip set are tried on the last ``window`` tokens."""

    def __init__(
        self,
        target: TargetInfo,
        skip: Annotated[float, Range(0.05, 0.95)] = 0.5,
        skipped: Annotated[str, LayerSet()] = "",
        max_nodes: Annotated[int, Range(1, 64)] = 8,
        min_prob: Annotated[float, Range(0.0, 1.0)] = 0.3,
        branch: Annotated[int, Range(1, 8)] = 1,
        trials: Annotated[int, Range(0, 1000)] = 16,
        window: Annotated[int, Range(8, 256)] = 64,
    ) -> None:
        if target.model is None:
            raise InvalidParameter("method swift runs the target's own layers: build it through an Engine")
        self.target, layers = target.model, target.model.layers
        if skipped:
            chosen = LayerSet.layers(skipped)
            if max(chosen) >= layers:
                raise InvalidParameter(f"swift skipped={clip(skipped)}: the target has layers 0 to {layers - 1}")
            if len(chosen) >= layers:
                raise InvalidParameter(f"swift skipped={clip(skipped)} skips every layer; at least one must run")
        else:
            chosen = spread(max(1, min(layers - 1, round(skip * layers))), layers)
        self.walker = Walker(max_nodes, min_prob, branch)
        self.trials_left, self.window = trials, window
        self.random = random.Random(0)
        self.steps = 0
        self.recent: list[int] = []  # the last window + 1 tokens of the sequence
        self._use(chosen)

    def _use(self, skipped: list[int]) -> None:
        self.skipped = sorted(skipped)
        self.runner = self.target.slice(self.kept(self.skipped))

    def kept(self, skipped: list[int]) -> list[int]:
        return [layer for layer in range(self.target.layers) if layer not in skipped]

    def begin(self, prompt: torch.Tensor, prompt_logits: torch.Tensor | None) -> None:
        self.recent = prompt[-self.window - 1 :].tolist()
        super().begin(prompt, prompt_logits)

    def observe(self, outcome: StepOutcome) -> None:
        super().observe(outcome)
        self.recent = (self.recent + outcome.committed)[-self.window - 1 :]
        self.steps += 1
        if self.trials_left and outcome.drafted and self.steps % TRIAL_EVERY == 0 and len(self.recent) > 8:
            self.trials_left -= 1
            self._trial()

    def _trial(self) -> None:
        """Swap one skipped layer for one kept layer; keep the swap if the slice then agrees more often with the
        recent text."""
        candidate = list(self.skipped)
        out = self.random.randrange(len(candidate))
        candidate[out] = self.random.choice(self.kept(self.skipped))
        tokens = torch.tensor(self.recent, dtype=torch.int64)
        if self._agreement(candidate, tokens) > self._agreement(self.skipped, tokens):
            self._use(candidate)

    def _agreement(self, skipped: list[int], tokens: torch.Tensor) -> int:
        """How many tokens of ``tokens[1:]`` the slice without ``skipped`` picks greedily after the ones before."""
        choices = self.target.slice(self.kept(sorted(skipped))).greedy(tokens[:-1])
        return int((choices == tokens[1:]).sum())


def spread(count: int, layers: int) -> list[int]:
    """``count`` layers spread evenly over the inner layers ``1 .. layers - 2`` (over all when that is too few):
    the first and last layers matter most to a slice's output, so they are skipped last."""
    inner = list(range(1, layers - 1)) if count <= layers - 2 else list(range(layers))
    return sorted({inner[int((i + 0.5) * len(inner) / count)] for i in range(count)})
