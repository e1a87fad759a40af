"""Prompt lookup: draft what followed the last earlier occurrence of the sequence's most recent n-gram.

The match is searched in the prompt and the output so far (one request); the longest n in
``[min_ngram, max_ngram]`` that matches wins. Up to ``branches`` earlier occurrences (most recent first) each
contribute a continuation of ``num_tokens`` tokens, merged into one tree.
"""

from __future__ import annotations

from typing import Annotated

import torch

from decodekit.drafters.options import Range, checked_options
from decodekit.drafters.trie import DraftTrie
from decodekit.errors import InvalidParameter
from decodekit.protocol import MAX_DRAFT_NODES, Draft, Drafter, StepOutcome, TargetInfo

# CPython 3.11, measured with tracemalloc: a list slot (and, past 256, its int), and one n-gram key (its tuple,
# its list of positions and the dict slot)
TOKEN_BYTES, KEY_BYTES = 36, 220


class NgramIndex:
    """Where every n-gram (``min_n <= n <= max_n``) of a growing token list occurred.

    ``tokens`` is the list indexed so far; ``extend`` indexes newly appended tokens in O(new * sizes). Each key
    keeps its ``keep`` most recent follow positions (the index just after the n-gram), so memory is bounded by
    ``len(tokens) * (max_n - min_n + 1)`` entries.
    """

    def __init__(self, min_n: int, max_n: int, keep: int) -> None:
        if not 1 <= min_n <= max_n:
            raise InvalidParameter(f"n-gram sizes need 1 <= min_ngram <= max_ngram, got {min_n} and {max_n}")
        if keep < 1:
            raise InvalidParameter(f"n-gram index must keep >= 1 position per key, got {keep}")
        self.min_n, self.max_n, self.keep = min_n, max_n, keep
        self.tokens: list[int] = []
        self._follows: dict[tuple[int, ...], list[int]] = {}  # n-gram -> its last ``keep`` follow positions

    def reset(self) -> None:
        self.tokens, self._follows = [], {}

    def memory_bytes(self) -> int:
        return TOKEN_BYTES * len(self.tokens) + KEY_BYTES * len(self._follows)

    def extend(self, new_tokens: list[int]) -> None:
        start = len(self.tokens)
        self.tokens.extend(new_tokens)
        # a follow position j is indexed once tokens[j] exists, so a match always has a continuation
        for j in range(max(start, 1), len(self.tokens)):
            for n in range(self.min_n, min(self.max_n, j) + 1):
                key = tuple(self.tokens[j - n : j])
                positions = self._follows.get(key)
                if positions is None:
                    self._follows[key] = [j]
                else:
                    positions.append(j)
                    if len(positions) > self.keep:
                        del positions[0]

    def sync(self, sequence: torch.Tensor) -> None:
        """Index ``sequence`` int64 ``[t]``, which extends what was indexed before."""
        if sequence.numel() > len(self.tokens):
            self.extend(sequence[len(self.tokens) :].tolist())

    def matches(self, suffix: list[int]) -> tuple[int, list[int]]:
        """(n, follow positions most recent first) for the longest indexed n-gram that ends ``suffix``."""
        for n in range(min(self.max_n, len(suffix)), self.min_n - 1, -1):
            positions = self._follows.get(tuple(suffix[-n:]))
            if positions:
                return n, list(reversed(positions))
        return 0, []


@checked_options
class PromptLookup(Drafter):
    """Method ``lookup``. Memory: the n-gram index of one request (see :class:`NgramIndex`)."""

    wants_step_logits = False  # observe never reads StepOutcome.logits

    def __init__(
        self,
        target: TargetInfo,
        min_ngram: Annotated[int, Range(1, 16)] = 1,
        max_ngram: Annotated[int, Range(1, 16)] = 4,
        num_tokens: Annotated[int, Range(1, MAX_DRAFT_NODES - 1)] = 10,
        branches: Annotated[int, Range(1, 16)] = 1,
    ) -> None:
        if num_tokens * branches >= MAX_DRAFT_NODES:
            raise InvalidParameter(
                f"lookup needs num_tokens * branches < {MAX_DRAFT_NODES}, got {num_tokens} * {branches}"
            )
        self.num_tokens, self.branches = num_tokens, branches
        self.index = NgramIndex(min_ngram, max_ngram, keep=branches)

    def begin(self, prompt: torch.Tensor, prompt_logits: torch.Tensor | None) -> None:
        self.index.reset()

    def memory_bytes(self) -> int:
        return self.index.memory_bytes()

    def propose(self, sequence: torch.Tensor) -> Draft:
        self.index.sync(sequence)
        tokens = self.index.tokens
        trie = DraftTrie()
        n, positions = self.index.matches(tokens[-self.index.max_n :])
        for rank, j in enumerate(positions):
            continuation = tokens[j : j + self.num_tokens]
            trie.add(continuation, n - rank / len(positions))
        return trie.build(tokens[-1], self.num_tokens * self.branches)

    def observe(self, outcome: StepOutcome) -> None:
        pass
