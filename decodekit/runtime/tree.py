"""The pure functions that turn draft trees (:class:`decodekit.protocol.Tree`) into positions and attention masks
for a batch of rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from decodekit.errors import InvalidParameter
from decodekit.protocol import Tree

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
