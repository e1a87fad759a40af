"""Medusa (Cai et al., 2024; Medusa-1: heads trained on a frozen target): ``K`` heads read the target's last
hidden state and each guesses one token further ahead, head k the token k places after the root, without seeing
the tokens in between; the tree holds the heads' top candidates (Medusa's tree: decodekit/drafters/heads.py).

A head is one residual block on the unit-RMS hidden state, ``z + SiLU(W_k z + b_k)``, turned into logits by the
target's own final norm and LM head. Trained by ``decodekit train medusa``. Memory: ``K * hidden**2`` floats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from decodekit.drafters.heads import HeadsDrafter, TrainedHeads


class MedusaHeads(TrainedHeads):
    """``depth`` residual heads, each on the hidden state alone."""

    kind = "medusa"

    def __init__(self, depth: int, hidden: int) -> None:
        super().__init__(depth, hidden)
        self.weight = torch.nn.Parameter(torch.zeros(depth, hidden, hidden))
        self.bias = torch.nn.Parameter(torch.zeros(depth, hidden))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z [..., H]`` -> ``[..., K, H]``: every head's vector."""
        return z.unsqueeze(-2) + F.silu(torch.einsum("...h,kgh->...kg", z, self.weight) + self.bias)

    def states(self, z: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        return self(z)


class Medusa(HeadsDrafter):
    """Method ``medusa``: the trained heads in ``heads`` (default: those trained or shipped for the target) draft
    a tree of ``max_nodes`` nodes (root excluded) from their top candidates."""

    heads_class = MedusaHeads

    def lay_out(self) -> None:
        self.depth = max(len(path) for path in self.paths)
        self.at = ([len(path) - 1 for path in self.paths], [path[-1] for path in self.paths])  # head, rank by node

    def candidates(self, z: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
        top = self.top(self.heads(z)[: self.depth])  # [depth, ranks]
        return torch.cat([root, top[self.at]])
