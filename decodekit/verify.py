"""Lossless verification of a draft tree: pure functions on small CPU tensors."""

from __future__ import annotations

import torch

from decodekit.runtime.tree import Tree


def verify_greedy(
    tokens: torch.Tensor, tree: Tree, target: torch.Tensor, candidates: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Pick the longest draft path that greedy decoding would itself have produced.

    ``tokens`` int64 ``[n]``: draft tokens, ``tokens[0]`` the root (already committed).
    ``target`` int64 ``[n]``: the target's argmax after each node.
    ``candidates`` bool ``[n]`` or None: nodes allowed on the path (side tokens are not).
    A node is accepted when its token equals the target's choice at its parent and its parent is accepted.
    Returns (``path`` int64 ``[m]``: accepted node indices root first, ``bonus``: the target's token after the
    last accepted node). Among equally deep accepted nodes the lowest index wins.
    """
    matches_parent = tokens == target[tree.parents.clamp(min=0)]
    matches_parent[0] = True
    if candidates is not None:
        matches_parent &= candidates
    accepted = ~(tree.ancestors & ~matches_parent[None, :]).any(dim=1)
    deepest = int(torch.where(accepted, tree.depth, -1).argmax())
    path = tree.ancestors[deepest].nonzero().flatten()
    return path, int(target[deepest])
