"""CopySpec: copy long spans from everything this engine has seen, triggered by a ``gamma``-token match.

One n-gram index (``gamma``-grams only, the most recent occurrence kept) covers a rolling history of every
request's prompt and output, so a conversation sent turn by turn, or a document asked about twice, is found
again. When the last ``gamma`` tokens occurred before, the tokens that followed are copied as one chain. The
copy grows while whole copies are accepted (doubling from ``num_tokens`` up to ``max_tokens``) and falls back
to ``num_tokens`` after a rejection, so long verbatim passages cost few steps and misses cost little.
"""

from __future__ import annotations

from typing import Annotated

import torch

from decodekit.drafters.lookup import NgramIndex
from decodekit.drafters.options import Range, checked_options
from decodekit.drafters.trie import chain_draft
from decodekit.errors import InvalidParameter
from decodekit.protocol import MAX_DRAFT_NODES, Draft, Drafter, StepOutcome, TargetInfo


@checked_options
class CopySpec(Drafter):
    """Method ``copyspec``. Memory: at most ``2 * history`` tokens and their index entries (the history is cut
    back to its last ``history`` tokens whenever it doubles)."""

    wants_step_logits = False  # observe never reads StepOutcome.logits

    def __init__(
        self,
        target: TargetInfo,
        gamma: Annotated[int, Range(1, 16)] = 3,
        num_tokens: Annotated[int, Range(1, MAX_DRAFT_NODES - 1)] = 8,
        max_tokens: Annotated[int, Range(1, MAX_DRAFT_NODES - 1)] = 32,
        history: Annotated[int, Range(1, 1 << 16)] = 16384,
    ) -> None:
        if not 1 <= num_tokens <= max_tokens:
            raise InvalidParameter(f"copyspec needs 1 <= num_tokens <= max_tokens, got {num_tokens}, {max_tokens}")
        if history < 1:
            raise InvalidParameter(f"copyspec history must be >= 1 token, got {history}")
        self.num_tokens, self.max_tokens, self.history = num_tokens, max_tokens, history
        self.index = NgramIndex(gamma, gamma, keep=1)
        self.span = num_tokens
        self._synced = 0  # tokens of the current request already in the history

    def begin(self, prompt: torch.Tensor, prompt_logits: torch.Tensor | None) -> None:
        self._append(prompt.tolist())
        self._synced = prompt.numel()
        self.span = self.num_tokens

    def propose(self, sequence: torch.Tensor) -> Draft:
        self._append(sequence[self._synced :].tolist())
        self._synced = sequence.numel()
        tokens = self.index.tokens
        _, positions = self.index.matches(tokens[-self.index.max_n :])
        copied = tokens[positions[0] : positions[0] + self.span] if positions else []
        return chain_draft(tokens[-1], copied)

    def observe(self, outcome: StepOutcome) -> None:
        drafted = outcome.draft.tree.size - 1
        if drafted:
            whole = outcome.accepted.numel() - 1 == drafted
            self.span = min(2 * self.span, self.max_tokens) if whole else self.num_tokens

    def memory_bytes(self) -> int:
        return self.index.memory_bytes()

    def _append(self, new_tokens: list[int]) -> None:
        if len(self.index.tokens) + len(new_tokens) > 2 * self.history:
            kept = (self.index.tokens + new_tokens)[-self.history :]
            self.index.reset()
            new_tokens = kept
        self.index.extend(new_tokens)
