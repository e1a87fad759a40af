"""Speculative Jacobi Decoding (Teng et al., 2024): a Jacobi window whose guesses are sampled, not argmaxed.

The draft is the root followed by a window of ``window`` guessed tokens, verified as a chain. Row j of the
target's output scores the token after window slot j given the slots before it, so one forward is also one
Jacobi iteration: after a step that committed m tokens, the rows from m on (conditioned on a now stale window)
propose the next window. Under sampling each guess is drawn from its row's target distribution, and that
distribution travels with it as the draft's q, so verification accepts with min(1, p/q) and the output keeps the
target distribution exactly. Slots beyond the last row are drawn again from the last row's distribution. At
temperature 0 the guesses are argmaxes: plain Jacobi decoding, verified greedily.
"""

from __future__ import annotations

from typing import Annotated

import torch

from decodekit.drafters.options import Range, checked_options
from decodekit.protocol import Draft, Drafter, StepOutcome, TargetInfo, Tree
from decodekit.verify import draw


@checked_options
class SpeculativeJacobi(Drafter):
    """Method ``sjd``. Memory: the window and, under sampling, its distributions: ``(window + 1) * vocab``
    float64 values."""

    samples_drafts = True  # its drafts carry q: they cannot be merged into another method's tree

    def __init__(self, target: TargetInfo, window: Annotated[int, Range(1, 64)] = 4) -> None:
        self.window_size, self.vocab_size = window, target.vocab_size
        self.tree = Tree.chain(window + 1)
        self.window: list[int] = []
        self.window_probs: torch.Tensor | None = None  # [window + 1, V], row 0 unused; None: argmax guesses
        self.generator = torch.Generator()  # seeded by the engine for every sampled request

    def begin(self, prompt: torch.Tensor, prompt_logits: torch.Tensor | None) -> None:
        # the first window repeats the prompt's last token: a deterministic start that the first forward replaces
        self.window, self.window_probs = [int(prompt[-1])] * self.window_size, None

    def propose(self, sequence: torch.Tensor) -> Draft:
        tokens = torch.tensor([int(sequence[-1]), *self.window], dtype=torch.int64)
        return Draft(tokens, self.tree, draft_probs=self.window_probs)

    def observe(self, outcome: StepOutcome) -> None:
        draft = outcome.draft
        if draft.tree is not self.tree:
            return  # not our draft
        rows = list(range(len(outcome.committed), self.tree.size))  # rows guessing the positions after the step
        if not rows:  # the whole window was accepted: no row looks past the bonus token; restart from it
            self.window, self.window_probs = [outcome.committed[-1]] * self.window_size, None
            return
        rows += rows[-1:] * (self.window_size - len(rows))
        if outcome.target_probs is None:  # greedy
            guesses = outcome.greedy_choices[rows].tolist()
            self.window, self.window_probs = guesses, None
            return
        probs = {row: outcome.target_probs(row) for row in set(rows)}
        self.window_probs = torch.zeros(self.tree.size, self.vocab_size, dtype=torch.float64)
        for slot, row in enumerate(rows, start=1):
            self.window_probs[slot] = probs[row]
        self.window = [draw(row, self.generator) for row in self.window_probs[1:]]

    def memory_bytes(self) -> int:
        return 0 if self.window_probs is None else self.window_probs.numel() * self.window_probs.element_size()
