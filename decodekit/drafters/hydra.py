"""Hydra (Ankner et al., 2024): sequentially dependent draft heads. Where a Medusa head guesses a token without
seeing the ones before it, a Hydra head also reads the tokens drafted on its path, so the candidates below a node
are guessed for that node's text.

Here one head serves every depth, as a recurrent cell over the target's last hidden state (the form ReDrafter
uses; Hydra's paper has one head per depth): ``s_0 = z`` (the unit-RMS hidden state), and after each token x on
the path ``s <- s + W_out SiLU(W_state s + W_token e(x) + b)``, with ``e(x)`` the target's own embedding of x
(unit RMS); the root's state guesses depth 1, a depth-1 node's guesses depth 2, and so on, each through the
target's final norm and LM head. Sharing the head keeps it at three ``hidden x hidden`` matrices however deep it
drafts. The tree's shape is Medusa's (decodekit/drafters/heads.py) from accept rates measured along the target's
own text; its tokens are filled depth by depth, one batched head step for the nodes of a depth that have
children. Trained by ``decodekit train hydra``. Memory: ``3 * hidden**2`` floats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from decodekit.drafters.heads import HeadsDrafter, TrainedHeads, unit_rms


class HydraHead(TrainedHeads):
    """One recurrent head (see the module docstring); ``depth``: the tokens ahead it was trained for."""

    kind = "hydra"

    def __init__(self, depth: int, hidden: int) -> None:
        super().__init__(depth, hidden)
        self.state = torch.nn.Linear(hidden, hidden)
        self.token = torch.nn.Linear(hidden, hidden, bias=False)
        self.out = torch.nn.Linear(hidden, hidden, bias=False)
        torch.nn.init.zeros_(self.out.weight)

    def step(self, s: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """The state ``s [..., H]`` after one more token, whose target embedding is ``embedded [..., H]``."""
        return s + self.out(F.silu(self.state(s) + self.token(unit_rms(embedded))))

    def states(self, z: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        s, out = z, []
        for k in range(embedded.shape[1]):
            s = self.step(s, embedded[:, k])
            out.append(s)
        return torch.stack(out, dim=1)


class Hydra(HeadsDrafter):
    """Method ``hydra``: the trained head in ``heads`` (default: the one trained or shipped for the target) drafts
    a tree of ``max_nodes`` nodes (root excluded), each node's children guessed from its own path."""

    heads_class = HydraHead

    def lay_out(self) -> None:
        n = len(self.parents)
        depth = [0] + [len(path) for path in self.paths]
        expanding = sorted({p for p in self.parents[1:]})  # nodes with children, parents before children
        self.levels = [[node for node in expanding if depth[node] == d] for d in range(max(depth))]
        self.row = {node: i for level in self.levels for i, node in enumerate(level)}  # a node's row in its level
        self.children = [[c for c in range(1, n) if self.parents[c] == node] for node in range(n)]

    def candidates(self, z: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
        tokens = torch.empty(len(self.parents), dtype=torch.int64)
        tokens[0] = root[0]
        states = z[None]  # [1, H]: the state before the root
        for level in self.levels:
            before = [self.row[self.parents[node]] if node else 0 for node in level]  # rows of the level above
            states = self.heads.step(states[before], self.model.embed(tokens[level]))  # after each node's token
            top = self.top(states)  # [len(level), ranks]
            for i, node in enumerate(level):
                for child in self.children[node]:
                    tokens[child] = top[i, self.paths[child - 1][-1]]
        return tokens
