"""Sampling parameters and the target distribution p they define.

The target distribution at a draft node is the model's logits after, in this order (as transformers applies
them): repetition penalty over the tokens in the node's context, temperature, top-k, top-p, min-p. Verification
compares drafts against exactly this p (see :mod:`decodekit.verify`). Temperature 0 means greedy decoding: the
argmax of the penalized logits, verified by the greedy rule.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import torch

from decodekit.errors import InvalidParameter
from decodekit.protocol import Tree, greedy_choice
from decodekit.verify import verify_greedy, verify_sampled

# the smallest temperature and the largest factor a penalty may scale logits by: beyond them float64 scores
# overflow and the distribution turns to NaN (below MIN_TEMPERATURE, sample greedily with temperature 0)
MIN_TEMPERATURE, MAX_PENALTY = 1e-5, 1e3


@dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 = greedy, else at least ``MIN_TEMPERATURE``. ``top_k`` 0 = off; ``top_p`` 1 = off;
    ``min_p`` 0 = off; ``repetition_penalty`` 1 = off (CTRL's rule: a seen token's logit is divided by it when
    positive, multiplied when negative); ``seed`` None = a fresh random seed per request."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        def require(name: str, ok: bool, rule: str) -> None:
            if not ok:
                raise InvalidParameter(f"{name} must be {rule}, got {getattr(self, name)!r}", name)

        for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"):
            value, integer = getattr(self, name), name in ("top_k", "seed")
            if value is not None or name != "seed":
                number = not isinstance(value, bool) and isinstance(value, int if integer else int | float)
                require(name, number and math.isfinite(value), f"a finite {'integer' if integer else 'number'}")
        require(
            "temperature",
            self.temperature == 0 or self.temperature >= MIN_TEMPERATURE,
            f"0 (greedy) or at least {MIN_TEMPERATURE}",
        )
        require("top_k", self.top_k >= 0, ">= 0 (0 = off)")
        require("top_p", 0 < self.top_p <= 1, "in (0, 1]")
        require("min_p", 0 <= self.min_p <= 1, "in [0, 1]")
        penalties = 1 / MAX_PENALTY <= self.repetition_penalty <= MAX_PENALTY
        require("repetition_penalty", penalties, f"in [{1 / MAX_PENALTY}, {MAX_PENALTY}] (1 = off)")
        require("seed", self.seed is None or 0 <= self.seed < 2**63, "in [0, 2**63)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return asdict(self)


GREEDY = SamplingParams()


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Repetition penalty. ``logits`` float ``[..., V]``, ``seen`` bool ``[..., V]`` (tokens in the context)."""
    if penalty == 1:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities (float64 ``[..., V]``) from penalized logits: temperature, then top-k, top-p, min-p."""
    scores = logits.double() / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth = scores.topk(params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if params.top_p < 1:
        scores = scores.masked_fill(_outside_nucleus(scores.softmax(dim=-1), params.top_p), -math.inf)
    probs = scores.softmax(dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), 0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _outside_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """bool ``[..., V]``: tokens outside the smallest most-likely set whose mass reaches ``top_p`` (at least one
    token kept). Only tokens with p >= (1 - top_p) / V can be inside (all the others together hold less than
    1 - top_p), so only those are sorted: a full sort of a large vocabulary costs more than the rest of sampling."""
    vocab = probs.shape[-1]
    outside = torch.ones_like(probs, dtype=torch.bool)
    for p, out in zip(probs.reshape(-1, vocab), outside.view(-1, vocab), strict=True):
        candidates = (p >= (1 - top_p) / vocab).nonzero().flatten()
        values, order = p[candidates].sort(descending=True)
        mass_before = values.cumsum(dim=0) - values
        out[candidates[order[mass_before < top_p]]] = False
    return outside


class Sampler:
    """One request's sampling state: its parameters, its random generator (seeded: the same seed and inputs
    give the same output) and, with a repetition penalty, the set of tokens in the context so far.

    The context of draft node ``i`` is the committed sequence plus the draft tokens on the path to ``i``, so
    every node is judged by the distribution plain decoding would have used at that point.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: list[int]) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.seen: torch.Tensor | None = None
        if params.repetition_penalty != 1:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            self.seen[torch.tensor(prompt_ids)] = True

    def advance(self, committed: list[int]) -> None:
        """Add the tokens a step committed to the context."""
        if self.seen is not None and committed:
            self.seen[torch.tensor(committed)] = True

    def node_logits(self, logits: torch.Tensor, tokens: torch.Tensor, tree: Tree, nodes: torch.Tensor) -> torch.Tensor:
        """Penalized logits ``[len(nodes), V]`` of the given draft nodes (``logits`` ``[n, V]``, ``tokens`` ``[n]``)."""
        rows = logits[nodes].float().cpu()
        if self.seen is None:
            return rows
        seen = self.seen.expand(len(nodes), -1).clone()
        which, ancestor = tree.ancestors[nodes].nonzero(as_tuple=True)
        seen[which, tokens[ancestor]] = True
        return penalize(rows, seen, self.params.repetition_penalty)

    def node_probs(self, logits: torch.Tensor, tokens: torch.Tensor, tree: Tree, node: int) -> torch.Tensor:
        """The target distribution p (float64 ``[V]``) for the token after draft node ``node``."""
        return warp(self.node_logits(logits, tokens, tree, torch.tensor([node]))[0], self.params)

    def greedy_choices(self, tokens: torch.Tensor, tree: Tree, logits: torch.Tensor) -> torch.Tensor:
        """int64 ``[n]`` on the CPU: the token greedy decoding picks after every draft node, the first maximum of
        its penalized logits row (``logits`` ``[n, V]`` on any device)."""
        scores = logits if self.seen is None else self.node_logits(logits, tokens, tree, torch.arange(tree.size))
        return greedy_choice(scores).cpu()

    def verify(
        self,
        tokens: torch.Tensor,
        tree: Tree,
        logits: torch.Tensor,
        greedy_choices: torch.Tensor,
        candidates: torch.Tensor | None = None,
        draft_probs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Accepted path (node indices, root first) and the next token: by the greedy rule against
        ``greedy_choices`` (from :meth:`greedy_choices`) at temperature 0, by rejection sampling over ``logits``
        ``[n, V]`` (any device) otherwise."""
        if self.params.greedy:
            return verify_greedy(tokens, tree, greedy_choices, candidates)
        logits = logits.cpu()
        return verify_sampled(
            tokens,
            tree,
            lambda node: self.node_probs(logits, tokens, tree, node),
            self.generator,
            candidates,
            draft_probs,
        )
