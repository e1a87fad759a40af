"""Momentum decoding (Lan et al., 2022, "Momentum Decoding: Open-ended Text Generation As Graph Exploration").

The output is a walk on a graph whose nodes are the n-grams it has produced; a token that would make an n-gram the
text already holds re-enters a node, closing a circle. Decoding stays greedy over the target's top-k tokens, but a
re-entering candidate's probability is lowered by a resistance that grows with the depth of the circle the text is
in (the consecutive re-entries just before it), so a loop gets harder to continue the longer it runs, while one
repeated phrase costs little.

Departs from the paper: nodes are n-grams of a fixed ``n`` (default 2) and the resistance is linear in the depth,
``alpha * (depth + 1)``.
"""

from __future__ import annotations

from typing import Annotated

import torch

from decodekit.drafters.options import Range, checked_options
from decodekit.runtime.loader import LoadedModel
from decodekit.strategies.base import TokenByToken


def closes_circle(candidates: list[int], text: list[int], n: int) -> torch.Tensor:
    """bool ``[k]``: which of ``candidates`` would end an ``n``-gram that ``text`` already holds."""
    known = {tuple(text[i : i + n]) for i in range(len(text) - n + 1)}
    tail = tuple(text[len(text) - n + 1 :]) if n > 1 else ()
    return torch.tensor([(*tail, c) in known for c in candidates], dtype=torch.bool)


def momentum_scores(probs: torch.Tensor, closes: torch.Tensor, alpha: float, depth: int) -> torch.Tensor:
    """float ``[k]``: candidates' probabilities ``probs`` ``[k]``, less ``alpha * (depth + 1)`` for those that
    close a circle (``closes`` bool ``[k]``), ``depth`` the consecutive re-entries just before them."""
    return probs - closes * (alpha * (depth + 1))


@checked_options
class MomentumDecoding(TokenByToken):
    """Greedy over the top ``k`` tokens, with a growing resistance to re-entering ``n``-grams of the text."""

    paper = "Lan et al. 2022, Momentum Decoding: Open-ended Text Generation As Graph Exploration"

    def __init__(
        self,
        model: LoadedModel,
        k: Annotated[int, Range(1, 64)] = 5,
        alpha: Annotated[float, Range(0.0, 10.0)] = 0.2,
        n: Annotated[int, Range(1, 8)] = 2,
    ) -> None:
        super().__init__(model)
        self.k, self.alpha, self.n = k, alpha, n

    def begin(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        self.seq = self.rows(prompt_ids, max_new_tokens)
        self.logits = self.seq.extend(torch.tensor([prompt_ids[-1:]]))[0]
        self.depth = 0  # consecutive re-entries just before the next token
        self.text = list(prompt_ids[-1:])  # the walk so far: the last prompt token, then the output

    def choose(self, out: list[int]) -> int:
        probs, candidates = self.logits.softmax(-1).topk(self.k)
        ids = candidates.tolist()
        closes = closes_circle(ids, self.text, self.n)
        best = int(momentum_scores(probs, closes, self.alpha, self.depth).argmax())
        self.depth = self.depth + 1 if closes[best] else 0
        self.text.append(ids[best])
        return ids[best]

    def advance(self, token: int) -> None:
        self.logits = self.seq.extend(torch.tensor([[token]]))[0]
