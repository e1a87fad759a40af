"""EAGLE (Li et al., 2024): drafting at the feature level. A small trained decoder layer runs beside the target:
fed the target's own feature at a position (the residual stream leaving its last block, before the final norm: the
vector its head turns into the next token) with the embedding of the token that followed, it predicts the feature
at the next position; the target's final norm and LM head turn that into the next token's distribution, and the
prediction is fed back with a drafted token to go one deeper.

The layer (``EagleLayer``): ``fc`` maps the pair (feature, token embedding; each at unit RMS) to the hidden width,
then ``depth`` decoder blocks, each Kangaroo's adapter block (one rotary attention layer with its own norm, added
to the stream) and a SwiGLU MLP of the hidden width; its output is the predicted feature at unit RMS.
``decodekit train eagle`` trains it on the target's own greedy answers (decodekit/train/eagle.py).

After each verified step the drafter feeds the layer the target's features along the accepted path, each with the
token committed after it, into a cache of its own (slots from the prompt's last position on: the engine hands no
features of the prompt); the output at the last one predicts the feature at the root. Drafting is EAGLE-2's dynamic
tree: at each depth the ``branch`` most likely children of every expanded node join a pool, scored by the calibrated
chance of their path (the product of the drafter's probabilities along it, times
:class:`decodekit.drafters.walk.Calibration`), and only the ``branch`` best of them are expanded (one forward of the
layer over them, each attending to the committed slots and its own ancestors); after ``max_depth`` depths, or once
no expandable node can still make the best ``max_nodes``, the best ``max_nodes`` of the pool at least ``min_prob``
likely form the draft (while nothing is, every ``PROBE_EVERY``-th step drafts regardless, so that a calibration that
fell too low can rise again; it starts afresh with each request). The logits cover the training answers' most
frequent tokens only (``ModelAccess.head_over``; 4,096 of them by default). Drafts are deterministic: greedy output
equals ``ar`` and sampled output follows the target. The first step drafts nothing, nor, inside a hybrid, the step
after one whose accepted path ran past this drafter's nodes (the features there are another part's; the layer's
cache skips those positions).

Memory: the layer (``(2 + 7 * depth) * hidden**2`` floats), its cache (``2 * hidden`` floats per committed token and
drafted node) and the head's matrix over its tokens (``hidden x S`` floats, shared per engine).
"""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F

from decodekit.drafters.heads import MAX_TRAINED_BYTES, TrainedPart, default_file, load_trained, part_bytes, unit_rms
from decodekit.drafters.kangaroo import KangarooAdapter
from decodekit.drafters.options import FilePath, Range, checked_options
from decodekit.drafters.trie import DraftTrie, chain_draft
from decodekit.drafters.walk import PROBE_EVERY, Calibration
from decodekit.errors import InvalidParameter
from decodekit.protocol import Draft, Drafter, StepOutcome, TargetInfo

GROWTH = 256  # cache slots added at a time


class EagleBlock(torch.nn.Module):
    """One decoder block of the layer: attention (Kangaroo's adapter block) then a SwiGLU MLP, each added to the
    stream; both outputs start at zero."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.attention = KangarooAdapter(0, hidden)
        self.norm = torch.nn.RMSNorm(hidden, eps=1e-6)
        self.gate_up = torch.nn.Linear(hidden, 2 * hidden, bias=False)
        self.down = torch.nn.Linear(hidden, hidden, bias=False)
        torch.nn.init.zeros_(self.down.weight)

    def forward(self, x: torch.Tensor, *where) -> torch.Tensor:
        """``x [n, H]`` -> ``[n, H]``; ``where``: the attention's ``start, cache, positions, visible``."""
        x = self.attention(x, *where)
        gate, up = self.gate_up(self.norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class EagleLayer(TrainedPart):
    """The feature predictor of ``depth`` blocks (see the module docstring)."""

    kind = "eagle"

    def __init__(self, depth: int, hidden: int) -> None:
        super().__init__(depth, hidden)
        self.fc = torch.nn.Linear(2 * hidden, hidden, bias=False)
        self.blocks = torch.nn.ModuleList(EagleBlock(hidden) for _ in range(depth))

    def new_caches(self, capacity: int) -> list[torch.Tensor]:
        """Empty caches for ``capacity`` slots, one per block."""
        return [block.attention.new_cache(capacity) for block in self.blocks]

    def forward(
        self,
        features: torch.Tensor,
        embedded: torch.Tensor,
        start: int = 0,
        caches: list[torch.Tensor] | None = None,
        positions: torch.Tensor | None = None,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The predicted feature ``[n, H]`` after each pair of ``features [n, H]`` (unit RMS) and ``embedded [n, H]``
        (the target's embeddings of the tokens that follow them), at cache slots ``start .. start + n - 1``;
        ``caches`` (None: no cache, ``start`` 0), ``positions`` and ``visible`` as
        :meth:`decodekit.drafters.kangaroo.KangarooAdapter.forward` takes them."""
        x = self.fc(torch.cat([features, unit_rms(embedded)], dim=-1))
        for i, block in enumerate(self.blocks):
            x = block(x, start, None if caches is None else caches[i], positions, visible)
        return x


@checked_options
class Eagle(Drafter):
    """Method ``eagle``: the trained ``layer`` (default: the one trained or shipped for the target) drafts a tree of
    up to ``max_nodes`` nodes, at most ``max_depth`` deep, expanding the ``branch`` best nodes of each depth by
    their ``branch`` best children; nodes less than ``min_prob`` likely are left out."""

    wants_step_logits = False

    def __init__(
        self,
        target: TargetInfo,
        layer: Annotated[str, FilePath(MAX_TRAINED_BYTES)] = "",
        max_nodes: Annotated[int, Range(1, 64)] = 8,
        max_depth: Annotated[int, Range(1, 16)] = 6,
        branch: Annotated[int, Range(1, 8)] = 2,
        min_prob: Annotated[float, Range(0.0, 1.0)] = 0.05,
    ) -> None:
        if target.model is None:
            raise InvalidParameter("method eagle reads the target's features: build it through an Engine")
        self.model = target.model
        path = Path(layer) if layer else default_file(self.model, EagleLayer.kind, "layer")
        self.layer, self.vocab, _ = load_trained(path, EagleLayer, self.model)
        self.head = self.model.head_over(self.vocab)
        self.max_nodes, self.max_depth, self.branch, self.min_prob = max_nodes, max_depth, branch, min_prob
        self.wants_hidden = (self.model.layers,)
        self.calibration = Calibration()
        self.caches = self.layer.new_caches(0)
        self.length = 0  # cache slots holding the committed text's pairs
        self.last: torch.Tensor | None = None  # [H]: the predicted feature at the root
        self.idle = 0  # steps in a row with nothing likely enough to draft

    def begin(self, prompt: torch.Tensor, prompt_logits: torch.Tensor | None) -> None:
        self.length, self.last = 0, None
        self.calibration, self.idle = Calibration(), 0  # per request: how well it drafts depends on the text

    def _room(self, slots: int) -> None:
        """Grow the caches to hold ``slots`` slots."""
        capacity = self.caches[0].shape[0]
        if slots > capacity:
            grown = self.layer.new_caches(slots + GROWTH)
            for old, new in zip(self.caches, grown, strict=True):
                new[:capacity] = old
            self.caches = grown

    def propose(self, sequence: torch.Tensor) -> Draft:
        root = int(sequence[-1])
        if self.last is None:
            return chain_draft(root, [])
        min_prob = 0.0 if self.idle >= PROBE_EVERY else self.min_prob  # a probe: is the calibration still right?
        with torch.inference_mode():
            trie = self._grow(self.calibration.scale, min_prob)
        self.idle = self.idle + 1 if len(trie) == 0 else 0
        return trie.build(root, self.max_nodes, min_prob, estimates=True)

    def _grow(self, scale: float, min_prob: float) -> DraftTrie:
        """EAGLE-2's dynamic tree under the root (see the module docstring), chances scaled by ``scale``, nodes
        less than ``min_prob`` likely left out."""
        self._room(self.length + self.branch * self.max_depth)
        trie, chances = DraftTrie(), []  # chances: of every pooled node
        frontier = [0]  # trie nodes expanded at this depth
        states = self.last[None]  # [F, H]: the predicted feature at each frontier node
        paths = torch.ones(1)  # [F]: the drafter's own chance of each frontier node's path
        ancestors: list[list[int]] = [[]]  # each frontier node's drafted slots, itself included
        slot = self.length
        for depth in range(1, self.max_depth + 1):
            top = torch.softmax(self.head(states), dim=-1).topk(self.branch, dim=-1)  # [F, branch]
            children = []  # (chance, frontier index, trie node, token, the drafter's own chance of the path)
            for f, row in enumerate((paths[:, None] * top.values).tolist()):
                for j, path in enumerate(row):
                    if (chance := path * scale) >= min_prob:
                        token = int(self.vocab[top.indices[f, j]])
                        children.append((chance, f, trie.insert(frontier[f], token, chance), token, path))
                        chances.append(chance)
            # only a child that beats the max_nodes-th best pooled node can have descendants in the draft
            bar = heapq.nlargest(self.max_nodes, chances)[-1] if len(chances) >= self.max_nodes else 0.0
            expand = [c for c in heapq.nlargest(self.branch, children) if c[0] > bar]
            if depth == self.max_depth or not expand:
                break
            n = len(expand)
            visible = torch.zeros(n, slot + n, dtype=torch.bool)
            visible[:, : self.length] = True
            for i, (_, f, *_) in enumerate(expand):
                visible[i, ancestors[f]] = True
                visible[i, slot + i] = True
            tokens = torch.tensor([c[3] for c in expand])
            positions = torch.full((n,), self.length + depth - 1)
            parents = [c[1] for c in expand]
            embedded = self.model.embed(tokens).float()
            states = self.layer(states[parents], embedded, slot, self.caches, positions, visible)
            frontier = [c[2] for c in expand]
            paths = torch.tensor([c[4] for c in expand])
            ancestors = [ancestors[f] + [slot + i] for i, f in enumerate(parents)]
            slot += n
        return trie

    def observe(self, outcome: StepOutcome) -> None:
        self.calibration.observe(outcome)
        m = min(len(outcome.accepted), len(outcome.committed))
        if m == 0:  # a stop string cut every token: the request ends here
            self.last = None
            return
        features = unit_rms(outcome.hidden[self.model.layers][outcome.accepted[:m]])
        tokens = torch.tensor(outcome.committed[:m], dtype=torch.int64)
        self._room(self.length + m)
        with torch.inference_mode():
            out = self.layer(features, self.model.embed(tokens).float(), self.length, self.caches)
        self.length += m
        # inside a hybrid, the path may run on past our nodes: the feature before the root is then not ours to see
        self.last = out[-1] if len(outcome.accepted) == len(outcome.committed) else None

    def memory_bytes(self) -> int:
        return part_bytes(self.layer) + sum(cache.numel() * cache.element_size() for cache in self.caches)
