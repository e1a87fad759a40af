"""Speculative decoding with a draft model (Leviathan et al., 2023; Chen et al., 2023), with SpecDec++'s adaptive
draft length (Huang et al., 2024).

A smaller checkpoint that shares the target's tokenizer drafts by running forward from the root
(:class:`decodekit.drafters.walk.Walker`): a chain through its most likely tokens, with the next ``branch - 1`` most
likely tokens at every depth as extra leaves (a top-k tree), cut where the chance of the path falls below
``min_prob``. SpecDec++ stops drafting where a trained head predicts a rejection; the draft model's probability of
its path, calibrated by what the target accepted, stands in for that head here. Its KV cache follows the committed
text: after a step it keeps the longest prefix it still shares with the sequence, so the next draft first scores the
accepted tokens it had not seen and the bonus token, in one forward.

Under sampling the drafts are the same deterministic tree, accepted node by node with the target's probability
of the node's token (lossless like every deterministic draft), not sampled from the draft model.

Memory: the draft model's weights (once per engine and path) and a KV cache per drafter over the sequence so far
plus the largest draft, in the target's dtype.
"""

from __future__ import annotations

from typing import Annotated

from decodekit.drafters.options import ModelPath, Range, checked_options
from decodekit.drafters.walk import Walker, WalkingDrafter
from decodekit.errors import InvalidParameter
from decodekit.protocol import TargetInfo


@checked_options
class DraftModelDrafter(WalkingDrafter):
    """Method ``draft``: ``model`` (a checkpoint directory or a .gguf file with the target's tokenizer) drafts up
    to ``max_nodes`` nodes, ``branch`` children per depth, while its chance of the path is at least
    ``min_prob``."""

    def __init__(
        self,
        target: TargetInfo,
        model: Annotated[str, ModelPath()] = "",
        max_nodes: Annotated[int, Range(1, 64)] = 8,
        min_prob: Annotated[float, Range(0.0, 1.0)] = 0.3,
        branch: Annotated[int, Range(1, 8)] = 1,
    ) -> None:
        if not model:
            raise InvalidParameter("method draft needs a draft model: draft:model=PATH (a checkpoint or a .gguf)")
        if target.model is None:
            raise InvalidParameter("method draft runs a model: build it through an Engine")
        self.runner = target.model.checkpoint(model)
        self.walker = Walker(max_nodes, min_prob, branch)
