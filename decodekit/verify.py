"""Lossless verification of a draft tree: pure functions on small CPU tensors and lists."""

from __future__ import annotations

from collections.abc import Callable

import torch

from decodekit.protocol import Tree


def continuation_matches(
    tokens: list[int], parents: list[int], continuation: list[int]
) -> tuple[list[bool], list[bool]]:
    """Score a draft (its ``tokens`` laid out by ``parents``, topologically ordered) against the tokens that
    actually followed its root: which nodes the ``continuation`` reached (their parent matched and it is long
    enough for their depth) and which of those matched it. Under greedy decoding a matched node is exactly one
    verification would have accepted. The root counts as reached and matched. Plain lists: drafts are small and
    this runs every step."""
    depth, reached, matched = [0] * len(tokens), [True] * len(tokens), [True] * len(tokens)
    for i in range(1, len(tokens)):
        depth[i] = depth[parents[i]] + 1
        reached[i] = matched[parents[i]] and depth[i] <= len(continuation)
        matched[i] = reached[i] and tokens[i] == continuation[depth[i] - 1]
    return reached, matched


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


def verify_sampled(
    tokens: torch.Tensor,
    tree: Tree,
    target_probs: Callable[[int], torch.Tensor],
    generator: torch.Generator,
    candidates: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Rejection sampling down a draft tree: the committed tokens follow the target distribution exactly.

    From the root, the candidate children of the current node are tried in index order against the current
    distribution p (``target_probs(node)``, float64 ``[V]``, summing to 1):
    - deterministic drafts (``draft_probs`` None): child token x is accepted with probability p(x); on
      rejection p becomes p with x removed, renormalized;
    - sampled drafts: ``draft_probs`` float ``[n, V]``, row i the distribution node i's token was drawn from
      (given its earlier siblings; row 0 unused). x is accepted with probability min(1, p(x) / q(x)); on
      rejection p becomes normalize(max(0, p - q)).
    An accepted child becomes the current node; when every child is rejected (or there is none), the next
    token is drawn from the current p. Random draws come from ``generator`` only. Returns (``path`` int64
    ``[m]`` root first, ``bonus``).
    """
    parents = tree.parents.tolist()
    allowed = [True] * len(parents) if candidates is None else candidates.tolist()
    children: list[list[int]] = [[] for _ in parents]
    for node in range(1, len(parents)):
        if allowed[node]:
            children[parents[node]].append(node)
    path, node = [0], 0
    while True:
        p = target_probs(node)
        for child in children[node]:
            x = int(tokens[child])
            if draft_probs is None:
                chance = float(p[x])
            else:
                q = draft_probs[child].to(p.dtype)
                chance = float(p[x] / q[x]) if q[x] > 0 else 0.0
            if float(torch.rand((), generator=generator, dtype=torch.float64)) < chance:
                path.append(child)
                node = child
                break
            if draft_probs is None:
                residual = p.clone()
                residual[x] = 0
            else:
                residual = (p - q).clamp_(min=0)
            if residual.sum() > 0:  # zero only where p equals q, and then the child was accepted surely
                p = residual / residual.sum()
        else:
            return torch.tensor(path, dtype=torch.int64), draw(p, generator)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from ``probs`` (float ``[V]``, summing to ~1) by inverting its CDF over the support: after top-p
    or top-k the support is small, and this costs a fraction of ``torch.multinomial`` over the whole vocabulary."""
    support = probs.nonzero().flatten()
    cdf = probs[support].cumsum(dim=0)
    u = torch.rand((), generator=generator, dtype=cdf.dtype) * cdf[-1]
    return int(support[torch.searchsorted(cdf, u, right=True).clamp(max=support.numel() - 1)])
