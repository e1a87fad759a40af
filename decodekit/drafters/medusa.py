"""Medusa (Cai et al., 2024; Medusa-1: heads trained on a frozen target): ``K`` heads read the target's last
hidden state and each guesses one token further ahead, head k the token k places after the root, without seeing
the tokens in between; the tree holds the heads' top candidates (Medusa's tree: decodekit/drafters/heads.py).

A head is one residual block on the unit-RMS hidden state, ``z + SiLU(W_k z + b_k)``, turned into logits by the
target's own final norm and LM head. Trained by ``decodekit train medusa``. Memory: ``K * hidden**2`` floats.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from decodekit.drafters.heads import MAX_HEADS_BYTES, HeadsDrafter, TrainedHeads
from decodekit.drafters.options import FilePath, Range, checked_options
from decodekit.protocol import TargetInfo


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


@checked_options
class Medusa(HeadsDrafter):
    """Method ``medusa``: the trained heads in ``heads`` (default: those trained or shipped for the target) draft
    a tree of ``max_nodes`` nodes (root excluded) from their top candidates."""

    heads_class = MedusaHeads

    def __init__(
        self,
        target: TargetInfo,
        heads: Annotated[str, FilePath(MAX_HEADS_BYTES)] = "",
        max_nodes: Annotated[int, Range(1, 128)] = 24,
    ) -> None:
        super().__init__(target, heads, max_nodes)
        depth = torch.tensor([len(path) for path in self.paths])
        self.at = (depth - 1, torch.tensor([path[-1] for path in self.paths]))  # each node's head and rank

    def candidates(self, z: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
        top = self.top(self.heads(z)[: int(self.at[0].max()) + 1])  # [depth, ranks]
        return torch.cat([root, top[self.at]])
