"""Token Recycling (Luo et al., 2024, arXiv 2408.08696).

State: an adjacency matrix ``[vocab, k]`` of token ids (int32); row t holds the top-k tokens the target model
most recently predicted after t. A draft is a static tree template expanded level by level from the root: the
node at rank r under a node holding token t holds ``adjacency[t, r]``. After each step every node's row is
overwritten with the top-k of that node's target logits, rejected branches included. The matrix lives as long
as the drafter, so it carries over between requests of one engine.
"""

from __future__ import annotations

from functools import cache
from typing import Annotated

import torch

from decodekit.drafters.options import Choice, Range, checked_options
from decodekit.errors import InvalidParameter
from decodekit.protocol import Draft, Drafter, StepOutcome, TargetInfo, Tree

# The published "2.2.2" template: 80 nodes below the root, depth 6. Each string is one node's path of child
# ranks from the root ("01" = rank 1 under rank 0 under the root), listed breadth-first.
PUBLISHED_TREE: tuple[str, ...] = tuple(
    """
    0 1 2 3 4 5 6 7
    00 01 02 03 04 05 06 07 10 11 12 13 20 21 22 30 31 40 50 60 70
    000 001 002 003 004 005 006 007 010 011 012 020 021 030 040 050 060 070 100 101 110 200 300 400 500
    0000 0001 0002 0003 0004 0010 0011 0020 0030 0040 0100 0200 1000 2000 3000
    00000 00001 00002 00010 00020 00100 01000 10000
    000000 000001 000100
    """.split()
)

# Probability that the draft at each rank is accepted given its parent was: what selects the best subtree of the
# published template for a smaller node budget. Measured on the default model (published tree, seed_prompt, 18
# Spec-Bench first turns, 3 per task, 128 tokens; pooled over depths 1-6; BENCHMARKS.md).
RANK_ACCEPTANCE = (0.435, 0.089, 0.053, 0.025, 0.020, 0.016, 0.011, 0.009)


def path_score(path: str) -> float:
    """Estimated probability that every node on ``path`` is accepted."""
    score = 1.0
    for rank in path:
        score *= RANK_ACCEPTANCE[int(rank)]
    return score


@cache
def subtree(size: int) -> tuple[str, ...]:
    """The ``size`` most probable nodes of the published template, most probable first. Every prefix of the
    result is itself the best subtree of its size (closed under parents), so a draft cut to its first n nodes
    (the server's load-aware speculation) keeps the n nodes most likely to be accepted."""
    if not 1 <= size <= len(PUBLISHED_TREE):
        raise InvalidParameter(f"recycling tree size must be between 1 and {len(PUBLISHED_TREE)}, got {size}")
    # a child never scores above its parent, and ties go to the earlier (shallower) node, so parents come first
    return tuple(sorted(PUBLISHED_TREE, key=lambda p: (-path_score(p), PUBLISHED_TREE.index(p)))[:size])


class TemplateTree:
    """A template of rank paths (each after its parent) compiled to parent pointers, ranks and per-depth gather
    indices; node i + 1 holds ``paths[i]``."""

    def __init__(self, paths: tuple[str, ...] | list[str]) -> None:
        index = {"": 0}
        parents, ranks = [-1], [0]
        for path in paths:
            if path[:-1] not in index:
                raise InvalidParameter(f"tree template node {path!r} has no parent {path[:-1]!r}")
            index[path] = len(parents)
            parents.append(index[path[:-1]])
            ranks.append(int(path[-1]))
        self.tree = Tree.from_parents(parents)
        self.max_rank = max(ranks)
        depth = self.tree.depth
        parent_t, rank_t = torch.tensor(parents), torch.tensor(ranks)
        self.levels = [
            (nodes, parent_t[nodes], rank_t[nodes])
            for d in range(1, int(depth.max()) + 1)
            for nodes in [torch.nonzero(depth == d).flatten()]
        ]


# Node budget of the "auto" tree by device and dtype, measured with `decodekit bench` (BENCHMARKS.md): on a CPU
# every extra node costs compute (~1.5 ms each in float32 on the 2-core AVX2 test machine; on GGUF Q4 weights
# ~0.6 ms against a ~6 ms step on the 2-core Zen 4, where 3 nodes beat 5, 9 and 16), on a GPU a tree of this size
# costs about what one token does.
AUTO_TREE_SIZE = {("cpu", "float32"): 9, ("cpu", "bfloat16"): 9, ("cpu", "gguf"): 3}


def parse_tree(tree: str, target: TargetInfo) -> tuple[str, ...]:
    """``"published"`` (80 nodes), ``"auto"`` (a size suited to the device and dtype) or a node count (the best
    subtree of the published template of that size); nodes most probable first (:func:`subtree`)."""
    if tree == "published":
        return subtree(len(PUBLISHED_TREE))
    if tree == "auto":
        return subtree(AUTO_TREE_SIZE.get((target.device_type, target.dtype), len(PUBLISHED_TREE)))
    try:
        size = int(tree)
    except ValueError:
        raise InvalidParameter(f"unknown recycling tree {tree!r}: use 'auto', 'published' or a node count") from None
    return subtree(size)


@checked_options
class TokenRecycling(Drafter):
    """Drafts from an adjacency matrix of the model's own recent top-k predictions.

    ``k``: columns of the matrix (candidates kept per token). ``tree``: see :func:`parse_tree`.
    ``seed_prompt``: also fill the matrix from the prompt's logits at the start of each request (one lm_head pass
    over the prompt; on by default: +0.15 MAT and +5% tokens/s on Spec-Bench, BENCHMARKS.md).
    """

    def __init__(
        self,
        target: TargetInfo,
        k: Annotated[int, Range(1, 64)] = 8,
        tree: Annotated[str, Choice(("auto", "published"), Range(1, len(PUBLISHED_TREE)))] = "auto",
        seed_prompt: bool = True,
    ) -> None:
        self.k = k
        self.template = TemplateTree(parse_tree(tree, target))
        if self.template.max_rank >= k:
            raise InvalidParameter(f"tree uses rank {self.template.max_rank} but k={k}; raise k or shrink the tree")
        self.adjacency = torch.zeros(target.vocab_size, k, dtype=torch.int32)
        self.wants_prompt_logits = seed_prompt

    def memory_bytes(self) -> int:
        return self.adjacency.numel() * self.adjacency.element_size()

    def begin(self, prompt: torch.Tensor, prompt_logits: torch.Tensor | None) -> None:
        if prompt_logits is not None and len(prompt_logits):
            tokens = prompt[-1 - len(prompt_logits) : -1]  # the tokens the logits rows follow
            # the root's row keeps what followed it in the last answer: an earlier occurrence in the prompt
            # (a chat template's newline, say) was followed by prompt text, not by the answer's first token
            seeded = tokens != prompt[-1]
            self._record(tokens[seeded], prompt_logits[seeded])

    def propose(self, sequence: torch.Tensor) -> Draft:
        tokens = torch.empty(self.template.tree.size, dtype=torch.int64)
        tokens[0] = sequence[-1]
        for nodes, parents, ranks in self.template.levels:
            tokens[nodes] = self.adjacency[tokens[parents], ranks].long()
        return Draft(tokens, self.template.tree)

    def observe(self, outcome: StepOutcome) -> None:
        # a step the engine did not draft (plain decoding under load) teaches nothing: a top-k over the vocabulary
        # per request per step costs ~4% of a full batch's step, and the matrix keeps what earlier steps taught
        if outcome.drafted:
            self._record(outcome.draft.tokens, outcome.logits)

    def _record(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """Overwrite the rows of ``tokens`` ``[n]`` with the top-k of their ``logits`` ``[n, vocab]``."""
        top = logits.topk(self.k, dim=-1).indices.to(device="cpu", dtype=torch.int32)
        self.adjacency[tokens.cpu()] = top
