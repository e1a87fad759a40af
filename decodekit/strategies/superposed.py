"""Superposed decoding (Shen et al., 2024, "Superposed Decoding: Multiple Generations from a Single Autoregressive
Inference Pass").

``k`` drafts advance together through one row, one forward a step: the step's input is the superposition of the
drafts' last tokens, their input embeddings summed with the drafts' probabilities (normalized over the live
drafts) as weights. Each live draft is extended by each of the top ``k`` tokens of the resulting distribution
(their probabilities renormalized over them), each candidate's probability interpolated with an n-gram model's
for that draft's context, ``(1 - ngram_weight) * p_lm + ngram_weight * p_ngram``; the ``k`` candidates (and
finished drafts) with the highest product of their tokens' probabilities are the next drafts. As in the paper, the
first step is a normal forward (the last prompt token), whose top ``k`` tokens start the drafts. A draft that takes
an EOS is finished: it stops contributing to the superposition but keeps its score and its place while no better
candidate displaces it. The drafts are returned best first.

Departs from the paper: no corpus ships, so the n-gram models (orders 2 to ``n``) are counted from the prompt's
own tokens instead of a large corpus; an order whose context the prompt never holds abstains, the others count
equally, and where all abstain the LM's probability stands alone. The interpolation is linear (the authors' code
mixes log-probabilities). Finished and live drafts share one pool of ``k``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Annotated

import torch

from decodekit.drafters.options import Range, checked_options
from decodekit.runtime.loader import LoadedModel
from decodekit.strategies.base import Strategy

FLOOR = 1e-30  # the least probability a candidate gets, so a draft the n-gram model rules out keeps a finite score


@dataclass
class Draft:
    """One draft: its output tokens, the sum of their (interpolated) log-probabilities, and whether it ended."""

    tokens: list[int]
    logprob: float
    finished: bool = False


class PromptNgrams:
    """The n-gram counts of ``tokens`` (the prompt), n from 2 to ``max_n``: for each context, its next tokens."""

    def __init__(self, tokens: list[int], max_n: int) -> None:
        self.orders = range(2, max_n + 1)
        self.following: dict[tuple[int, ...], Counter[int]] = {}
        for n in self.orders:
            for start in range(len(tokens) - n + 1):
                context = tuple(tokens[start : start + n - 1])
                self.following.setdefault(context, Counter())[tokens[start + n - 1]] += 1

    def probs(self, text: list[int], candidates: list[int]) -> torch.Tensor | None:
        """float ``[c]``: each of ``candidates``' relative frequency after the context ``text`` ends with, averaged
        over the orders whose context the prompt holds; None where it holds none."""
        seen = [
            counts
            for n in self.orders
            if len(text) >= n - 1 and (counts := self.following.get(tuple(text[len(text) - n + 1 :]))) is not None
        ]
        if not seen:
            return None
        return torch.tensor([[counts[t] / counts.total() for t in candidates] for counts in seen]).mean(0)


def superposed_embedding(embeddings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[H]``: the drafts' last-token input embeddings ``embeddings`` ``[k, H]`` summed with ``weights``
    ``[k]`` (the drafts' normalized probabilities)."""
    return (weights[:, None] * embeddings).sum(0)


def interpolated(lm_probs: torch.Tensor, ngram_probs: torch.Tensor | None, weight: float) -> torch.Tensor:
    """float ``[c]``: ``(1 - weight) * lm_probs + weight * ngram_probs`` (both ``[c]``), or ``lm_probs`` where the
    n-gram model abstains (None)."""
    return lm_probs if ngram_probs is None else (1 - weight) * lm_probs + weight * ngram_probs


@checked_options
class SuperposedDecoding(Strategy):
    """``k`` drafts from one row and one forward a step, fed the superposition of the drafts' last tokens, their
    candidates checked against the prompt's n-grams (orders 2 to ``n``, weighted by ``ngram_weight``)."""

    paper = "Shen et al. 2024, Superposed Decoding: Multiple Generations from a Single Autoregressive Inference Pass"

    def __init__(
        self,
        model: LoadedModel,
        k: Annotated[int, Range(1, 8)] = 3,
        ngram_weight: Annotated[float, Range(0.0, 1.0)] = 0.5,
        n: Annotated[int, Range(2, 6)] = 3,
    ) -> None:
        super().__init__(model)
        self.k, self.ngram_weight, self.n = k, ngram_weight, n

    @property
    def count(self) -> int:
        return self.k

    def decode(self, prompt_ids: list[int], max_new_tokens: int) -> list[list[int]]:
        if max_new_tokens == 0:
            return [[] for _ in range(self.k)]
        ngrams = PromptNgrams(prompt_ids, self.n)
        rows = self.rows(prompt_ids, max_new_tokens)
        logits = rows.extend(torch.tensor([prompt_ids[-1:]]))[0]  # the first step: the empty draft's forward
        drafts = [Draft([], 0.0)]
        for step in range(max_new_tokens):
            probs, top = logits.float().softmax(-1).topk(self.k)
            probs, tokens = (probs / probs.sum()).cpu(), top.tolist()
            candidates = [draft for draft in drafts if draft.finished]
            for draft in drafts:
                if not draft.finished:
                    mixed = interpolated(probs, ngrams.probs(prompt_ids + draft.tokens, tokens), self.ngram_weight)
                    logprobs = mixed.clamp_min(FLOOR).log().tolist()
                    grown = zip(tokens, logprobs, strict=True)
                    candidates += [Draft([*draft.tokens, t], draft.logprob + lp, t in self.eos) for t, lp in grown]
            drafts = sorted(candidates, key=lambda draft: draft.logprob, reverse=True)[: self.k]
            live = [draft for draft in drafts if not draft.finished]
            if not live or step == max_new_tokens - 1:
                break
            weights = torch.tensor([draft.logprob for draft in live]).softmax(0)
            last = torch.tensor([draft.tokens[-1] for draft in live])
            embeddings = rows.embedded(last)  # [live, H]
            mixed_input = superposed_embedding(embeddings.float(), weights.to(embeddings.device))
            logits = rows.extend(last[None, :1], embeddings=mixed_input.to(embeddings.dtype)[None, None])[0]
        return [draft.tokens for draft in drafts]
