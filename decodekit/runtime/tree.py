"""Draft trees as parent pointers, and the pure functions that turn them into positions and attention masks.

A tree of ``n`` nodes is stored in topological order: node 0 is the root (the last committed token, whose KV
entry is not yet in the cache) and ``parents[i] < i`` for every other node. Drafters that reuse one static
template build its :class:`Tree` once, so the derived tensors are computed once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from decodekit.errors import InvalidParameter


@dataclass(frozen=True, eq=False)
class Tree:
    """A rooted tree over ``n`` nodes. ``parents``: int64 ``[n]``, ``parents[0] == -1``, ``parents[i] < i``."""

    parents: torch.Tensor

    @staticmethod
    def from_parents(parents: list[int] | torch.Tensor) -> Tree:
        """Validate parent pointers and wrap them. Raises InvalidParameter on a malformed tree."""
        p = torch.as_tensor(parents, dtype=torch.int64).flatten()
        if p.numel() == 0 or p[0].item() != -1:
            raise InvalidParameter("a draft tree needs a root: parents[0] must be -1")
        if p.numel() > 1 and not bool(((p[1:] >= 0) & (p[1:] < torch.arange(1, p.numel()))).all()):
            raise InvalidParameter("draft tree parents must satisfy 0 <= parents[i] < i for i > 0")
        return Tree(p)

    @staticmethod
    def chain(n: int) -> Tree:
        """A path of ``n`` nodes (root included): what autoregressive or single-sequence drafts use."""
        return Tree(torch.arange(-1, n - 1, dtype=torch.int64))

    @property
    def size(self) -> int:
        return self.parents.numel()

    @cached_property
    def depth(self) -> torch.Tensor:
        """int64 ``[n]``: distance from the root (root = 0)."""
        return torch.arange(self.size) if self.is_chain else node_depths(self.parents)

    @cached_property
    def ancestors(self) -> torch.Tensor:
        """bool ``[n, n]``: ``[i, j]`` is True when j is i or an ancestor of i."""
        if self.is_chain:
            return torch.ones(self.size, self.size, dtype=torch.bool).tril_()
        return ancestor_mask(self.parents)

    @cached_property
    def is_chain(self) -> bool:
        return bool((self.parents == torch.arange(-1, self.size - 1)).all())

    def padded(self, n: int) -> Tree:
        """This tree grown to ``n`` nodes by leaves under the root (so that trees of a batch share one size);
        no original node sees them."""
        if n <= self.size:
            return self
        return Tree(torch.cat([self.parents, torch.zeros(n - self.size, dtype=torch.int64)]))

    def prefix(self, n: int) -> Tree:
        """The tree of the first ``n`` nodes (topological order keeps it a tree)."""
        return self if n >= self.size else Tree(self.parents[:n])


def node_depths(parents: torch.Tensor) -> torch.Tensor:
    """Depth of every node of a topologically ordered tree. ``parents`` int64 ``[n]`` -> int64 ``[n]``."""
    parent_list = parents.tolist()
    depth = [0] * len(parent_list)
    for i in range(1, len(parent_list)):
        depth[i] = depth[parent_list[i]] + 1
    return torch.tensor(depth, dtype=torch.int64)


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """bool ``[n, n]`` with ``[i, j]`` True iff node j is node i or one of its ancestors."""
    n = parents.numel()
    mask = torch.eye(n, dtype=torch.bool)
    parent_list = parents.tolist()
    for i in range(1, n):
        mask[i] |= mask[parent_list[i]]
    return mask


Trees = Tree | Sequence[Tree]  # one tree for every row of a batch, or one per row (all of one size)


def row_trees(trees: Trees, rows: int) -> list[Tree]:
    """One tree per row; raises InvalidParameter unless there are ``rows`` trees of one size."""
    trees = [trees] * rows if isinstance(trees, Tree) else list(trees)
    if len(trees) != rows or len({tree.size for tree in trees}) != 1:
        raise InvalidParameter(f"a batch of {rows} rows needs {rows} trees of one size (pad them)")
    return trees


def positions(prefix_lengths: list[int], trees: Trees) -> torch.Tensor:
    """int64 ``[B, n]``: rotary position of every node, ``prefix_length + depth`` (row b's tree for row b)."""
    depths = torch.stack([tree.depth for tree in row_trees(trees, len(prefix_lengths))])
    return torch.tensor(prefix_lengths, dtype=torch.int64)[:, None] + depths


def attention_mask(prefix_lengths: list[int], trees: Trees, window: int | None = None) -> torch.Tensor:
    """bool ``[B, 1, n, S]`` over cache slots ``S = max(prefix_lengths) + n``; True = may attend.

    Row ``b`` holds its committed prefix in slots ``[0, L_b)`` and its tree in ``[L_b, L_b + n)``: a node
    sees the whole prefix and its own ancestors (itself included). With a sliding ``window``, a node at
    position ``p`` sees a key at position ``q`` only when ``p - q < window``.
    """
    trees = row_trees(trees, len(prefix_lengths))
    n = trees[0].size
    width = max(prefix_lengths) + n
    mask = torch.zeros(len(prefix_lengths), 1, n, width, dtype=torch.bool)
    for b, (length, tree) in enumerate(zip(prefix_lengths, trees, strict=True)):
        mask[b, 0, :, :length] = True
        mask[b, 0, :, length : length + n] = tree.ancestors
    if window is not None:
        query_pos = positions(prefix_lengths, trees)  # [B, n]
        key_pos = torch.arange(width).repeat(len(prefix_lengths), 1)  # a prefix slot's position is its index
        for b, length in enumerate(prefix_lengths):
            key_pos[b, length : length + n] = query_pos[b]
        mask &= (query_pos[:, None, :, None] - key_pos[:, None, None, :]) < window
    return mask
