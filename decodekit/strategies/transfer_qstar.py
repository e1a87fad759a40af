"""Transfer Q* (Chakraborty et al., 2024, "Transfer Q Star: Principled Decoding for LLM Alignment").

Decoding for alignment picks each token ``z`` by ``log p_target(z) + alpha * Q*(context, z)``, where ``Q*`` is the
reward of the best continuation after ``z``. Transfer Q* estimates it through a baseline model already aligned
for that reward: the aligned model continues ``context + z`` and the continuation's reward stands for ``Q*``.
Here the reward is the aligned model's own implicit one, ``beta * (log pi_aligned(y) - log pi_reference(y))``
summed over ``y`` (``z`` and its continuation), ``pi_reference`` being the model it was aligned from (by default
the target), so no reward model is needed. Each step scores the target's top ``k`` tokens, their ``k``
continuations rolled out together as ``k`` rows of one batch, and keeps the best.

Departs from the paper: the paper estimates ``Q*`` from continuations sampled from the aligned model to the end
of the response and scored by a reward model, and samples the next token from the reweighted distribution; here
the continuation is the aligned model's greedy one of ``horizon`` tokens (cut after an EOS), scored by the
implicit reward above, and the next token is the best-scoring of the ``k`` candidates (deterministic).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Annotated

import torch

from decodekit.drafters.options import ModelPath, Range, checked_options
from decodekit.runtime.loader import LoadedModel
from decodekit.runtime.rows import Rows
from decodekit.strategies.base import Strategy


def until_eos(paths: torch.Tensor, eos: Collection[int]) -> torch.Tensor:
    """bool ``[k, T]``: which tokens of ``paths`` int64 ``[k, T]`` come no later than their row's first EOS (one
    of ``eos``)."""
    is_eos = torch.isin(paths, torch.tensor(sorted(eos), dtype=paths.dtype)).long()
    return is_eos.cumsum(-1) - is_eos == 0


def qstar_scores(
    target_logprobs: torch.Tensor,
    aligned_logprobs: torch.Tensor,
    reference_logprobs: torch.Tensor,
    counted: torch.Tensor,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """float ``[k]``: candidates' target log-probabilities ``target_logprobs`` ``[k]`` plus ``alpha`` times the
    implicit reward of their paths, ``beta * sum (aligned_logprobs - reference_logprobs)`` over the tokens of each
    (float ``[k, T]``: each path token's log-probability under either model) that ``counted`` (bool ``[k, T]``)
    marks."""
    reward = beta * ((aligned_logprobs - reference_logprobs) * counted).sum(-1)
    return target_logprobs + alpha * reward


@checked_options
class TransferQStar(Strategy):
    """The target's top ``k`` tokens, each scored by its log-probability plus ``weight`` times the implicit reward
    (scaled by ``beta``) of the ``aligned`` model's ``horizon``-token continuation after it."""

    paper = "Chakraborty et al. 2024, Transfer Q Star: Principled Decoding for LLM Alignment"

    def __init__(
        self,
        model: LoadedModel,
        aligned: Annotated[str, ModelPath()] = "",
        reference: Annotated[str, ModelPath()] = "",
        k: Annotated[int, Range(1, 16)] = 4,
        horizon: Annotated[int, Range(1, 16)] = 4,
        weight: Annotated[float, Range(0.0, 10.0)] = 1.0,
        beta: Annotated[float, Range(0.01, 10.0)] = 1.0,
    ) -> None:
        super().__init__(model)
        self.aligned = self.second_model(aligned, "aligned")
        self.reference = self.second_model(reference, "reference") if reference else model
        self.k = min(k, model.cfg.vocab_size)
        self.horizon, self.weight, self.beta = horizon, weight, beta

    def decode(self, prompt_ids: list[int], max_new_tokens: int) -> list[list[int]]:
        target = self.rows(prompt_ids, max_new_tokens)
        aligned = self.rows(prompt_ids, max_new_tokens, self.aligned)
        reference = self.rows(prompt_ids, max_new_tokens, self.reference)
        aligned.select([0] * self.k)  # k copies of the context: one per candidate's continuation
        reference.select([0] * self.k)
        out: list[int] = []
        token = prompt_ids[-1]  # the last committed token, which no model holds yet
        while len(out) < max_new_tokens and not (out and out[-1] in self.eos):
            logprobs, candidates = target.extend(torch.tensor([[token]]))[0].log_softmax(-1).topk(self.k)
            paths, aligned_logprobs, reference_logprobs = self.rollouts(aligned, reference, token, candidates)
            counted = until_eos(paths, self.eos)
            scores = qstar_scores(logprobs, aligned_logprobs, reference_logprobs, counted, self.weight, self.beta)
            token = int(candidates[scores.argmax()])
            out.append(token)
        return [out]

    def rollouts(
        self, aligned: Rows, reference: Rows, token: int, candidates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The aligned model's greedy continuation of each candidate (``candidates`` int64 ``[k]``, after the
        committed ``token``): the paths (candidate first) int64 ``[k, 1 + horizon]`` and each path token's
        log-probability under the aligned and the reference model (float ``[k, 1 + horizon]`` each). Both models
        are fed the same tokens in the same steps, so that one checkpoint given as both scores alike. Leaves both
        holding the context and ``token``."""
        start = aligned.length
        first = torch.stack([torch.full_like(candidates, token), candidates], -1)  # [k, 2]
        aligned_logits = list(aligned.extend_all(first).unbind(1))  # each [k, V], before the path token of its index
        reference_logits = list(reference.extend_all(first).unbind(1))
        path = [candidates]
        for step in range(self.horizon):
            path.append(aligned_logits[-1].argmax(-1))
            if step + 1 < self.horizon:
                aligned_logits.append(aligned.extend(path[-1][:, None]))
                reference_logits.append(reference.extend(path[-1][:, None]))
        aligned.truncate(start + 1)
        reference.truncate(start + 1)
        paths = torch.stack(path, -1)
        return paths, logprobs_of(paths, aligned_logits), logprobs_of(paths, reference_logits)


def logprobs_of(paths: torch.Tensor, logits: list[torch.Tensor]) -> torch.Tensor:
    """float ``[k, T]``: the log-probability of each token of ``paths`` int64 ``[k, T]`` under ``logits``, ``T``
    float ``[k, V]`` (those the token at each index was scored by)."""
    return torch.stack(logits, 1).log_softmax(-1).gather(-1, paths[..., None])[..., 0]
