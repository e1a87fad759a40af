"""Plain decoding (method ``ar``): the root alone, so each step commits exactly the target's next token."""

from __future__ import annotations

import torch

from decodekit.protocol import Draft, Drafter, TargetInfo, Tree


class Autoregressive(Drafter):
    """Method ``ar``: drafts nothing; the baseline every method's output must equal."""

    _tree = Tree.chain(1)

    def __init__(self, target: TargetInfo) -> None:
        pass

    def propose(self, sequence: torch.Tensor) -> Draft:
        return Draft(sequence[-1:], self._tree)
