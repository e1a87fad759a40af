"""Lookahead decoding: a Jacobi window refined in the same forward that verifies n-grams from a pool.

Each step's tree holds (a) candidates: up to ``candidates`` n-grams from the pool that start with the root,
merged into a trie, and (b) side tokens: the Jacobi window, a chain of ``window`` guesses for the positions after
the root. The target's prediction after every window token is one Jacobi iteration: it becomes the next
window (shifted by the tokens the step committed), and each run of ``ngram - 1`` window tokens followed by the
prediction after them enters the pool as an n-gram keyed by its first token.

This keeps the paper's pieces (window, pool, one forward for both) with a single-level window: the window is a
causal chain, so it fits the tree runtime, and the n-grams come from the current iteration rather than from the
diagonals of the last ``ngram - 1`` iterations.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Annotated

import torch

from decodekit.drafters.options import Range, checked_options
from decodekit.drafters.trie import DraftTrie
from decodekit.protocol import Draft, Drafter, StepOutcome, TargetInfo, Tree

# CPython 3.11, measured with tracemalloc: a pool key (its int, list and ordered-dict slot), an n-gram tail's
# tuple, and each token in it
KEY_BYTES, GRAM_BYTES, TOKEN_BYTES = 250, 80, 36


@checked_options
class Lookahead(Drafter):
    """Method ``lookahead``. Memory: the window, and a pool of at most ``pool_keys`` first tokens (least recently
    used evicted) with ``candidates`` n-grams each: ``pool_keys * candidates * (ngram - 1)`` tokens."""

    side_tokens = True

    def __init__(
        self,
        target: TargetInfo,
        window: Annotated[int, Range(1, 32)] = 5,
        ngram: Annotated[int, Range(2, 8)] = 4,
        candidates: Annotated[int, Range(1, 16)] = 3,
        pool_keys: Annotated[int, Range(1, 1 << 14)] = 4096,
    ) -> None:
        self.window_size, self.ngram, self.candidates, self.pool_keys = window, ngram, candidates, pool_keys
        self.pool: OrderedDict[int, list[tuple[int, ...]]] = OrderedDict()  # first token -> n-gram tails, oldest first
        self.window: list[int] = []
        self._side_start = 0  # index of the first window node in the last draft

    def begin(self, prompt: torch.Tensor, prompt_logits: torch.Tensor | None) -> None:
        # the first window guesses the prompt's own last tokens again: a cheap start that Jacobi replaces
        self.window = prompt[-self.window_size :].tolist()
        self.window += self.window[-1:] * (self.window_size - len(self.window))

    def propose(self, sequence: torch.Tensor) -> Draft:
        root = int(sequence[-1])
        trie = DraftTrie()
        grams = self.pool.get(root, ())
        for rank, gram in enumerate(reversed(grams)):  # most recent first
            trie.add(gram, 1.0 - rank / (len(grams) + 1))
        trie_draft = trie.build(root, self.candidates * (self.ngram - 1))
        n = trie_draft.tree.size
        self._side_start = n
        tokens = torch.cat([trie_draft.tokens, torch.tensor(self.window, dtype=torch.int64)])
        window_parents = [0, *range(n, n + self.window_size - 1)]
        parents = torch.cat([trie_draft.tree.parents, torch.tensor(window_parents, dtype=torch.int64)])
        candidates = torch.arange(tokens.numel()) < n
        return Draft(tokens, Tree(parents), candidates)

    def observe(self, outcome: StepOutcome) -> None:
        if outcome.draft.tree.size - self._side_start != self.window_size:
            return  # not our draft (the window did not ride along, or was cut off): keep the old window
        side = torch.arange(self._side_start, outcome.draft.tree.size)
        # slots: the root and the window; predicted[i] is the target's token after slots[0..i], a guess for
        # the position after slot i. That is one Jacobi iteration over the window.
        slots = outcome.draft.tokens[torch.cat([torch.tensor([0]), side])].tolist()
        predicted = outcome.greedy_choices[torch.cat([torch.tensor([0]), side])].tolist()
        for i in range(self.ngram - 2, len(slots)):
            self._remember((*slots[i - self.ngram + 2 : i + 1], predicted[i]))
        fresh = predicted[len(outcome.committed) :]  # guesses for the positions after what was committed
        if fresh:
            self.window = fresh[: self.window_size] + fresh[-1:] * (self.window_size - len(fresh))

    def memory_bytes(self) -> int:
        grams = sum(map(len, self.pool.values()))
        return KEY_BYTES * len(self.pool) + (GRAM_BYTES + TOKEN_BYTES * (self.ngram - 1)) * grams

    def _remember(self, gram: tuple[int, ...]) -> None:
        first, rest = gram[0], gram[1:]
        grams = self.pool.get(first)
        if grams is None:
            grams = self.pool[first] = []
            if len(self.pool) > self.pool_keys:
                self.pool.popitem(last=False)
        else:
            self.pool.move_to_end(first)
        if rest in grams:
            grams.remove(rest)
        grams.append(rest)
        if len(grams) > self.candidates:
            del grams[0]
