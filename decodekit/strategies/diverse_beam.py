"""Diverse beam search (Vijayakumar et al., 2016/2018, "Diverse Beam Search: Decoding Diverse Solutions from Neural
Sequence Models").

The beam is split into ``groups`` of ``beams`` each. Within a step the groups choose one after another: group 1
takes a plain beam-search step; each later group ranks its candidates by their log-probability less a Hamming
diversity penalty, ``penalty`` times how many times the groups before it took the same token at this step, so it
is pushed off the earlier groups' choices. With one group this is plain beam search, and with one beam greedy
decoding. Every live beam of every group is a row of one :class:`Rows`: a step reorders (and forks) the surviving
beams with ``select`` and feeds all their new tokens in one batched forward.

A candidate ending in an EOS among its group's ``beams`` best leaves the live set for the group's finished list; a
group stops once it has ``beams`` finished beams. Each group returns its best beam by ``sum log-prob /
length ** length_penalty``, finished or (where the budget ran out first) live; the result is one completion per
group, in group order.

Departs from the paper: it returns the best beam of each group instead of all ``groups * beams``; the penalty
steers each step's choice only, beams keeping (and being ranked by) their plain log-probability; EOS handling,
the stopping rule and the length penalty are this library's (the paper does not fix them).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Annotated

import torch

from decodekit.drafters.options import Range, checked_options
from decodekit.runtime.loader import LoadedModel
from decodekit.strategies.base import Strategy


@dataclass
class Beam:
    """A hypothesis: its output tokens and the sum of their log-probabilities."""

    tokens: list[int]
    logprob: float


def hamming_penalized(logprobs: torch.Tensor, earlier: torch.Tensor, penalty: float) -> torch.Tensor:
    """float ``[n, V]``: a group's next-token log-probabilities ``logprobs`` ``[n, V]``, each token's lowered by
    ``penalty`` times how many times ``earlier`` (int64 ``[m]``: the tokens the earlier groups took this step)
    holds it."""
    counts = torch.bincount(earlier.to(logprobs.device), minlength=logprobs.shape[-1]).to(logprobs.dtype)
    return logprobs - penalty * counts


def beam_step(
    totals: torch.Tensor, width: int, eos: Collection[int]
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """One group's choice among its candidates ``totals`` float ``[n, V]`` (beam ``i``'s score after token ``v``):
    the (beam, token) pairs, best first, of the ``width`` beams it goes on with (no EOS) and of those it finishes
    (an EOS ranked among the ``width`` best)."""
    n, vocab = totals.shape
    ranked = totals.flatten().topk(min(n * vocab, width + n * len(eos))).indices.tolist()
    live: list[tuple[int, int]] = []
    finished: list[tuple[int, int]] = []
    for rank, flat in enumerate(ranked):
        beam, token = divmod(flat, vocab)
        if token in eos:
            if rank < width:
                finished.append((beam, token))
        elif len(live) < width:
            live.append((beam, token))
    return live, finished


def normalized_score(beam: Beam, length_penalty: float) -> float:
    """A beam's final score: its log-probability over ``len(tokens) ** length_penalty`` (an empty one: over 1)."""
    return beam.logprob / max(len(beam.tokens), 1) ** length_penalty


@checked_options
class DiverseBeamSearch(Strategy):
    """``groups`` beam searches of ``beams`` beams each, later groups penalized (``penalty``) for the tokens the
    earlier ones took at the same step; one completion per group."""

    paper = "Vijayakumar et al. 2018, Diverse Beam Search: Decoding Diverse Solutions from Neural Sequence Models"

    def __init__(
        self,
        model: LoadedModel,
        groups: Annotated[int, Range(1, 8)] = 4,
        beams: Annotated[int, Range(1, 8)] = 2,
        penalty: Annotated[float, Range(0.0, 10.0)] = 0.5,
        length_penalty: Annotated[float, Range(0.0, 2.0)] = 1.0,
    ) -> None:
        super().__init__(model)
        self.groups, self.beams, self.penalty, self.length_penalty = groups, beams, penalty, length_penalty

    @property
    def count(self) -> int:
        return self.groups

    def decode(self, prompt_ids: list[int], max_new_tokens: int) -> list[list[int]]:
        rows = self.rows(prompt_ids, max_new_tokens)
        logits = rows.extend(torch.tensor([prompt_ids[-1:]])).expand(self.groups, -1)  # [rows, V]
        rows.select([0] * self.groups)  # a copy of the prompt for each group's first beam
        live = [[Beam([], 0.0)] for _ in range(self.groups)]  # each group's live beams; rows in this order
        finished: list[list[Beam]] = [[] for _ in range(self.groups)]
        for step in range(max_new_tokens):
            logprobs = logits.float().log_softmax(-1)
            parents: list[int] = []  # the row each next live beam extends, groups in order
            taken: list[int] = []  # the tokens the groups so far took this step
            first = 0  # the row of the group's first beam
            for group, beams in enumerate(live):
                if not beams:
                    continue
                own = logprobs[first : first + len(beams)]
                scores = torch.tensor([beam.logprob for beam in beams], device=own.device)[:, None]
                penalized = hamming_penalized(own, torch.tensor(taken, dtype=torch.int64), self.penalty)
                going, ending = beam_step(scores + penalized, self.beams, self.eos)
                grown = [Beam([*beams[b].tokens, t], beams[b].logprob + float(own[b, t])) for b, t in going + ending]
                finished[group] += grown[len(going) :]
                done = len(finished[group]) >= self.beams
                live[group] = [] if done else grown[: len(going)]
                parents += [] if done else [first + b for b, _ in going]
                taken += [t for _, t in (ending if done else going + ending)]
                first += len(beams)
            if not parents or step == max_new_tokens - 1:
                break
            rows.select(parents)
            logits = rows.extend(torch.tensor([[beam.tokens[-1]] for beams in live for beam in beams]))
        return [
            max(ended + going, key=lambda beam: normalized_score(beam, self.length_penalty)).tokens
            for ended, going in zip(finished, live, strict=True)
        ]
