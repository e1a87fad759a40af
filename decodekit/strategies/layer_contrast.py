"""Contrast of layers, after LOL (Chen et al., 2024, "Lower Layer Matters: Alleviating Hallucination via
Multi-Layer Fusion Contrastive Decoding with Truthfulness Refocused"), of the family of DoLa (Chuang et al., 2023).

Each step reads the model's final next-token distribution and, through the model's own final norm and LM head,
the early-exit distributions of some lower layers, fused into one (the mean of their log-probabilities). Among the
plausible tokens (``p_final(v) >= alpha * max p_final``: the adaptive plausibility constraint), the next token is the
one of highest ``log p_final(v) - beta * log p_lower(v)``: what the model learns in its upper layers counts, what
its lower layers already guessed counts against.

Departs from the paper: LOL contrasts the model with a separate hallucination-induced amateur model, at the final
layer and at a lower layer, and fuses the two contrasts; here the model's own lower layers play the amateur (as in
DoLa), fused before one contrast, at fixed exits (DoLa picks its premature layer each step by divergence). LOL's
truthfulness-refocus module (a trained classifier) is left out.
"""

from __future__ import annotations

from typing import Annotated

import torch

from decodekit.drafters.options import LayerSet, Range, checked_options
from decodekit.errors import InvalidParameter, clip
from decodekit.runtime.loader import LoadedModel
from decodekit.strategies.base import TokenByToken

MAX_EXITS = 8  # lower layers a step may read (each adds an LM-head product)
DEFAULT_SHARES = (0.5, 0.75)  # the default exits: these shares of the model's depth


def contrast_scores(expert: torch.Tensor, amateurs: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """float ``[V]``: ``log p_expert(v) - beta * mean_i log p_amateur_i(v)`` for the plausible tokens
    (``p_expert(v) >= alpha * max p_expert``), ``-inf`` for the others, from the expert's logits ``expert`` ``[V]``
    and the amateurs' logits ``amateurs`` ``[A, V]``. The expert's most likely token is always plausible."""
    log_expert = expert.float().log_softmax(-1)
    log_amateur = amateurs.float().log_softmax(-1).mean(0)
    probs = log_expert.exp()
    plausible = probs >= alpha * probs.max()
    return (log_expert - beta * log_amateur).masked_fill(~plausible, float("-inf"))


def default_exits(layers: int) -> list[int]:
    """The exits at a half and three quarters of a model of ``layers`` layers (distinct, below ``layers``)."""
    return sorted({min(layers - 1, round(layers * share)) for share in DEFAULT_SHARES})


@checked_options
class LayerContrast(TokenByToken):
    """Greedy over the final layer's log-probabilities less ``beta`` times those of the lower layers ``exits``
    (the stream entering them; "": a half and three quarters of the depth), among the tokens ``alpha``-plausible."""

    paper = (
        "Chen et al. 2024, Lower Layer Matters: Alleviating Hallucination via Multi-Layer Fusion Contrastive "
        "Decoding with Truthfulness Refocused (and Chuang et al. 2023, DoLa)"
    )

    def __init__(
        self,
        model: LoadedModel,
        alpha: Annotated[float, Range(0.0, 1.0)] = 0.1,
        beta: Annotated[float, Range(0.0, 2.0)] = 0.5,
        exits: Annotated[str, LayerSet(most=MAX_EXITS)] = "",
    ) -> None:
        super().__init__(model)
        layers = model.transformer.cfg.layers
        chosen = LayerSet.layers(exits) if exits else default_exits(layers)
        if max(chosen) >= layers:
            raise InvalidParameter(f"layer_contrast exits={clip(exits)}: the model has layers 0 to {layers - 1}")
        self.alpha, self.beta, self.exits = alpha, beta, chosen

    def begin(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        self.seq = self.rows(prompt_ids, max_new_tokens)
        self.advance(prompt_ids[-1])

    def choose(self, out: list[int]) -> int:
        return int(contrast_scores(self.logits[0, 0], self.logits[1:, 0], self.alpha, self.beta).argmax())

    def advance(self, token: int) -> None:
        self.logits = self.seq.extend(torch.tensor([[token]]), exits=self.exits)  # [1 + exits, 1, V]
