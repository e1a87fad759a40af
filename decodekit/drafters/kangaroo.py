"""Kangaroo (Liu et al., 2024): self-speculative decoding with a double early exit. The target's first
``depth`` layers are a shallow sub-network; a small trained adapter on top of them, then the target's own final
norm and LM head, make it a draft model that shares the target's embeddings, lower layers and head.

The adapter is the paper's: one attention layer (its own RMSNorm, query/key/value and output projections,
``hidden / 64`` heads with a rotary embedding of their own) over the shallow layer's residual stream at every
position so far, added to that stream (zero-initialized output: training starts from the plain early exit).
``decodekit train kangaroo`` trains it on the target's own greedy answers (decodekit/train/kangaroo.py). Drafting
walks a chain (or a top-k tree with ``branch``) forward from the root
(:class:`decodekit.drafters.walk.Walker`) and stops where the calibrated chance of the path falls below
``min_prob``: the second early exit (the paper stops on each token's own top probability; the walker's rule is the
path's). The shallow layers and the adapter keep caches of their own that follow the committed text
(:class:`decodekit.runtime.runner.ModelRunner`). Departures: the target's verification runs all its layers for
the drafted tokens again (the paper reuses the shallow layers' work), and the logits cover the tokens of the
training answers only (``head_over``: a fraction of the full head's cost).

Memory: the adapter (``4 * hidden**2`` floats), the shallow layers' KV cache and the adapter's over the sequence
so far plus the largest draft, and the head's matrix over its tokens (``hidden x S`` floats, shared per engine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F

from decodekit.drafters.heads import MAX_TRAINED_BYTES, TrainedPart, default_file, load_trained, part_bytes
from decodekit.drafters.options import FilePath, Range, checked_options
from decodekit.drafters.walk import Walker, WalkingDrafter
from decodekit.errors import InvalidParameter
from decodekit.protocol import EarlyExit, ModelAccess, TargetInfo

HEAD_DIM = 64  # the adapter's attention head width (fewer heads where the hidden size is smaller)
ROPE_BASE = 10000.0


class KangarooAdapter(TrainedPart):
    """The adapter over the residual stream entering the target's block ``depth`` (see the module docstring)."""

    kind = "kangaroo"

    def __init__(self, depth: int, hidden: int) -> None:
        super().__init__(depth, hidden)
        self.heads = max(1, hidden // HEAD_DIM)
        self.head_dim = hidden // self.heads
        if self.heads * self.head_dim != hidden or self.head_dim % 2:
            raise InvalidParameter(f"a kangaroo adapter needs a hidden size of whole even heads, got {hidden}")
        self.norm = torch.nn.RMSNorm(hidden, eps=1e-6)
        self.qkv = torch.nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = torch.nn.Linear(hidden, hidden, bias=False)
        torch.nn.init.zeros_(self.out.weight)
        inverse = 1.0 / ROPE_BASE ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        self.register_buffer("inv_freq", inverse, persistent=False)

    def new_cache(self, capacity: int) -> torch.Tensor:
        """float32 ``[capacity, 2, heads, head_dim]``: keys and values by position."""
        return torch.zeros(capacity, 2, self.heads, self.head_dim, device=self.inv_freq.device)

    def forward(
        self,
        x: torch.Tensor,
        start: int = 0,
        cache: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """float32 ``x [n, H]`` (the stream at cache slots ``start .. start + n - 1``) -> ``[n, H]``, over those slots
        and the ``start`` before them that ``cache`` holds (written there too; None: there are none, ``start`` is 0,
        and nothing is kept: for training). ``positions`` int64 ``[n]`` (default: the slots) turn the rotary
        embedding; ``visible`` bool ``[n, start + n]`` says which slots each row attends to (default: causal)."""
        n = x.shape[0]
        q, k, v = self.qkv(self.norm(x)).view(n, 3, self.heads, self.head_dim).unbind(1)
        slots = torch.arange(start, start + n, device=x.device)
        positions = slots if positions is None else positions
        angles = torch.outer(positions.float(), self.inv_freq).repeat(1, 2)[:, None]  # [n, 1, head_dim]
        cos, sin = angles.cos(), angles.sin()
        q, k = q * cos + rotated(q) * sin, k * cos + rotated(k) * sin
        if cache is not None:
            cache[start : start + n, 0], cache[start : start + n, 1] = k, v
            k, v = cache[: start + n, 0], cache[: start + n, 1]
        if visible is None:
            visible = slots[:, None] >= torch.arange(start + n, device=x.device)  # [n, start + n]
        attended = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), visible)
        return x + self.out(attended.transpose(0, 1).reshape(n, self.hidden))


def rotated(x: torch.Tensor) -> torch.Tensor:
    """``x [..., d]`` with its halves (a, b) turned into (-b, a): the rotary embedding's partner vector."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class AdapterExit(EarlyExit):
    """The adapter and the target's head over the adapter's tokens ``vocab`` as an exit of the shallow slice; the
    logits of other tokens are -inf."""

    def __init__(self, adapter: KangarooAdapter, model: ModelAccess, vocab: torch.Tensor) -> None:
        self.adapter, self.vocab, self.vocab_size = adapter, vocab, model.vocab_size
        self.head = model.head_over(vocab)

    def new_cache(self, capacity: int) -> torch.Tensor:
        return self.adapter.new_cache(capacity)

    def states(self, hidden: torch.Tensor, start: int, cache: torch.Tensor) -> torch.Tensor:
        return self.adapter(hidden.float(), start, cache)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        full = torch.full((*states.shape[:-1], self.vocab_size), -torch.inf, device=states.device)
        full[..., self.vocab] = self.head(states)
        return full


@checked_options
class Kangaroo(WalkingDrafter):
    """Method ``kangaroo``: the target's shallow layers and the trained ``adapter`` (default: the one trained or
    shipped for the target) draft up to ``max_nodes`` nodes, ``branch`` children per depth, while their chance of
    the path is at least ``min_prob``."""

    def __init__(
        self,
        target: TargetInfo,
        adapter: Annotated[str, FilePath(MAX_TRAINED_BYTES)] = "",
        max_nodes: Annotated[int, Range(1, 64)] = 8,
        min_prob: Annotated[float, Range(0.0, 1.0)] = 0.3,
        branch: Annotated[int, Range(1, 8)] = 1,
    ) -> None:
        if target.model is None:
            raise InvalidParameter("method kangaroo runs the target's own layers: build it through an Engine")
        model = target.model
        path = Path(adapter) if adapter else default_file(model, KangarooAdapter.kind, "adapter")
        self.adapter, vocab, _ = load_trained(path, KangarooAdapter, model)
        if not 1 <= self.adapter.depth < model.layers:
            raise InvalidParameter(f"the kangaroo adapter {path} sits on {self.adapter.depth} layers of {model.layers}")
        self.runner = model.slice(range(self.adapter.depth), AdapterExit(self.adapter, model, vocab))
        self.walker = Walker(max_nodes, min_prob, branch)

    def memory_bytes(self) -> int:
        return super().memory_bytes() + part_bytes(self.adapter)
