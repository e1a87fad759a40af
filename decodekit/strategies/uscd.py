"""Uncertainty-aware selective contrastive decoding (Wang et al., 2024, "USCD: Improving Code Generation of LLMs
by Uncertainty-Aware Selective Contrastive Decoding").

Two sequences run side by side on the one model, both fed every chosen token: the full prompt, and a "lame" prompt
that lacks the prompt's key part, whose continuation shows the noise the model would produce without it. Where the
full prompt's next-token distribution is confident (entropy below ``threshold``), its greedy token passes through
unchanged; where it is uncertain, the next token is the greedy one over ``log p_full(v) - beta * log p_lame(v)``
among the plausible tokens (``p_full(v) >= alpha * max p_full``), which removes what the lame prompt would say too.

Departs from the paper: it builds the lame prompt by removing the input-output examples of a few-shot prompt,
which needs to know the prompt's parts; here it keeps only the prompt's last ``tail + 1`` tokens (by default the
last one alone): with a chat template, the framing that opens the assistant's turn, without the user's
instruction. The uncertainty is the entropy of the full distribution in nats, against a fixed threshold.
"""

from __future__ import annotations

from typing import Annotated

import torch

from decodekit.drafters.options import Range, checked_options
from decodekit.runtime.loader import LoadedModel
from decodekit.strategies.base import TokenByToken
from decodekit.strategies.layer_contrast import contrast_scores


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """float ``[]``: the entropy in nats of the distribution of ``logits`` ``[V]``."""
    log_probs = logits.float().log_softmax(-1)
    return -(log_probs.exp() * log_probs).nansum()  # a token of probability 0 adds 0 (0 * -inf is nan)


def selective_choice(full: torch.Tensor, lame: torch.Tensor, alpha: float, beta: float, threshold: float) -> int:
    """The next token from the full prompt's logits ``full`` ``[V]`` and the lame prompt's ``lame`` ``[V]``: the
    greedy token of ``full`` where its entropy is below ``threshold``, else the best of :func:`contrast_scores`
    with the lame prompt as the amateur."""
    if entropy(full) < threshold:
        return int(full.argmax())
    return int(contrast_scores(full, lame[None], alpha, beta).argmax())


@checked_options
class UncertaintySelectiveContrast(TokenByToken):
    """Greedy where the full prompt is confident (entropy under ``threshold`` nats); elsewhere greedy over its
    log-probabilities less ``beta`` times those of the lame prompt (its last ``tail + 1`` tokens), among the
    tokens ``alpha``-plausible."""

    paper = (
        "Wang et al. 2024, USCD: Improving Code Generation of LLMs by Uncertainty-Aware Selective Contrastive Decoding"
    )

    def __init__(
        self,
        model: LoadedModel,
        alpha: Annotated[float, Range(0.0, 1.0)] = 0.1,
        beta: Annotated[float, Range(0.0, 2.0)] = 0.5,
        threshold: Annotated[float, Range(0.0, 10.0)] = 1.0,
        tail: Annotated[int, Range(0, 64)] = 0,
    ) -> None:
        super().__init__(model)
        self.alpha, self.beta, self.threshold, self.tail = alpha, beta, threshold, tail

    def begin(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        lame = prompt_ids[-(self.tail + 1) :]  # the whole prompt when it is no longer
        self.full, self.lame = self.rows(prompt_ids, max_new_tokens), self.rows(lame, max_new_tokens)
        self.advance(prompt_ids[-1])

    def choose(self, out: list[int]) -> int:
        return selective_choice(self.full_logits, self.lame_logits, self.alpha, self.beta, self.threshold)

    def advance(self, token: int) -> None:
        fed = torch.tensor([[token]])
        self.full_logits, self.lame_logits = self.full.extend(fed)[0], self.lame.extend(fed)[0]
