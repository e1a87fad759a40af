"""Merge scored token paths into one draft tree under a node budget: the shared back end of the n-gram, copy,
suffix, hybrid and model drafters.

A path is the token sequence a drafter guesses will follow the root, with a score per token: the drafter's
estimate that the target accepts the path up to that token. Paths that share a prefix share nodes (a node keeps
the best score any path gave it). ``build`` keeps the ``max_nodes`` best-scored nodes; scores are made
non-increasing along every path, so the kept set is always closed under parents.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from decodekit.protocol import Draft, Tree


class DraftTrie:
    """A trie of candidate continuations of one root token."""

    def __init__(self) -> None:
        self._children: list[dict[int, int]] = [{}]  # node -> {token: child node}
        self._token: list[int] = [-1]
        self._parent: list[int] = [-1]
        self._depth: list[int] = [0]
        self._score: list[float] = [float("inf")]

    def __len__(self) -> int:
        """Nodes below the root."""
        return len(self._token) - 1

    def add(self, tokens: Sequence[int], scores: Sequence[float] | float = 1.0) -> list[int]:
        """Insert the path ``tokens`` below the root; ``scores`` one per token, or one for every token. Returns
        the path's trie nodes."""
        if isinstance(scores, (int, float)):
            scores = [float(scores)] * len(tokens)
        nodes, node, best = [], 0, float("inf")
        for token, score in zip(tokens, scores, strict=True):
            best = min(best, float(score))
            node = self.insert(node, token, best)
            nodes.append(node)
        return nodes

    def insert(self, parent: int, token: int, score: float) -> int:
        """The child of trie node ``parent`` for ``token`` (created if new), its score raised to at least
        ``score`` (capped by the parent's, so scores never grow along a path)."""
        score = min(float(score), self._score[parent])
        child = self._children[parent].get(token)
        if child is None:
            child = len(self._token)
            self._children[parent][token] = child
            self._children.append({})
            self._token.append(int(token))
            self._parent.append(parent)
            self._depth.append(self._depth[parent] + 1)
            self._score.append(score)
        else:
            self._score[child] = max(self._score[child], score)
        return child

    def build(self, root: int, max_nodes: int, min_prob: float = float("-inf"), estimates: bool = False) -> Draft:
        """The draft tree of the ``max_nodes`` best nodes scoring at least ``min_prob`` under ``root``, best first
        (ties: shallower, then earlier inserted), so parents come first and every prefix of the draft is the best
        subtree of its size. Afterwards ``draft_index`` maps every kept trie node to its index in the draft (the
        root, trie node 0, is index 0). ``estimates``: the scores are chances of acceptance, handed on as
        ``Draft.estimates``."""
        kept = [i for i in range(1, len(self._token)) if self._score[i] >= min_prob]
        nodes = sorted(kept, key=lambda i: (-self._score[i], self._depth[i], i))[:max_nodes]
        self.draft_index = {0: 0} | {node: i + 1 for i, node in enumerate(nodes)}
        tokens = [root] + [self._token[n] for n in nodes]
        parents = [-1] + [self.draft_index[self._parent[n]] for n in nodes]
        chances = torch.tensor([1.0] + [self._score[n] for n in nodes], dtype=torch.float64) if estimates else None
        return Draft(
            torch.tensor(tokens, dtype=torch.int64), Tree(torch.tensor(parents, dtype=torch.int64)), estimates=chances
        )


def chain_draft(root: int, tokens: Sequence[int]) -> Draft:
    """A single path: ``root`` followed by ``tokens``."""
    return Draft(torch.tensor([root, *tokens], dtype=torch.int64), Tree.chain(len(tokens) + 1))
