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
chance of their path (the product along it of each node's chance given its parent, times
:class:`decodekit.drafters.walk.Calibration`; a node's chance is the drafter's probability of its token or, with
``accept_head``, what the layer's acceptance head predicts: SpecDec++'s classifier, trained beside the layer), and only
the ``branch`` best of them are expanded (one forward of the
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
from decodekit.drafters.options import FilePath, OperatorRange, Range, checked_options
from decodekit.drafters.trie import DraftTrie, chain_draft
from decodekit.drafters.walk import PROBE_EVERY, Calibration
from decodekit.errors import InvalidParameter
from decodekit.protocol import Draft, Drafter, StepOutcome, TargetInfo

GROWTH = 256  # cache slots added at a time
CE_WEIGHT = 0.1  # the cross-entropy's weight beside the feature regression in the training loss
MAX_SEQUENCE = 256  # slots of a request that make one unit of online learning
ACCEPT_RANKS = 8  # candidates per node the acceptance head scores, at most


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


class AcceptanceHead(torch.nn.Module):
    """SpecDec++'s acceptance head (Huang et al., 2024) for the layer: the chance that the target's token after a
    drafted node is the layer's rank-r candidate there (given that the node itself is accepted), a logistic model
    of the layer's predicted feature at the node and of the candidates' standing in the layer's distribution.
    ``trained`` is False until ``decodekit train eagle`` fits it (files written before it have none)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.state = torch.nn.Parameter(torch.zeros(hidden))  # on the feature at unit RMS
        self.mix = torch.nn.Parameter(torch.tensor([1.0, 0.0, 0.0]))  # log p of the candidate, of the best, entropy
        self.rank_bias = torch.nn.Parameter(torch.zeros(ACCEPT_RANKS))
        self.depth_bias = torch.nn.Parameter(torch.zeros(2))  # depth 1, deeper
        self.register_buffer("trained", torch.tensor(False))

    def forward(self, states: torch.Tensor, probs: torch.Tensor, top: torch.Tensor, depth: int) -> torch.Tensor:
        """Acceptance logits ``[F, R]`` of the R most likely candidates (``top [F, R]``, their probabilities, best
        first; ``R <= ACCEPT_RANKS``) after nodes at ``depth`` (1: the root's children) whose predicted features
        are ``states [F, H]`` and the layer's distributions ``probs [F, S]``."""
        ranks = top.shape[-1]
        log_top = top.clamp_min(1e-30).log()  # [F, R]
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1, keepdim=True)  # [F, 1]
        per_node = unit_rms(states) @ self.state + self.depth_bias[min(depth, 2) - 1]  # [F]
        mixed = self.mix[0] * log_top + self.mix[1] * log_top[:, :1] + self.mix[2] * entropy
        return mixed + self.rank_bias[:ranks] + per_node[:, None]


class EagleLayer(TrainedPart):
    """The feature predictor of ``depth`` blocks (see the module docstring), with its acceptance head."""

    kind = "eagle"
    optional = ("acceptance.",)

    def __init__(self, depth: int, hidden: int) -> None:
        super().__init__(depth, hidden)
        self.fc = torch.nn.Linear(2 * hidden, hidden, bias=False)
        self.blocks = torch.nn.ModuleList(EagleBlock(hidden) for _ in range(depth))
        self.acceptance = AcceptanceHead(hidden)

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

    def two_passes(
        self, features: torch.Tensor, tokens: torch.Tensor, embedded: torch.Tensor, output: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Training over one sequence of slots (decodekit/train/eagle.py): ``features [m + 1, H]`` the target's
        features at slots ``0 .. m`` (unit RMS), ``tokens`` int64 ``[m]`` the token after each of slots ``0 .. m -
        1`` and ``embedded [m, H]`` their embeddings; ``output [H, S]`` the target's final norm and LM head over the
        drafter's tokens. For each pass (teacher-forced; then fed its own first-pass predictions): the predicted
        features ``[k, H]``, the target's features they should equal ``[k, H]``, the logits ``[k - 1, S]`` and the
        tokens the target chose there ``[k - 1]``."""
        m, device = len(embedded), embedded.device
        taught = self(features[:-1], embedded)  # [m, H]: the feature at each next position
        # pass 2: row j + m feeds the prediction at slot j with the token after it, seeing the taught slots up to j
        slots = torch.arange(m, device=device)
        visible = torch.zeros(2 * m - 1, 2 * m - 1, dtype=torch.bool, device=device)
        visible[:m, :m] = slots[:, None] >= slots
        visible[m:, :m] = slots[: m - 1, None] >= slots
        visible[m:, m:] = torch.eye(m - 1, dtype=torch.bool, device=device)
        positions = torch.cat([slots, slots[1:]])
        inputs = torch.cat([features[:-1], taught[:-1]]), torch.cat([embedded, embedded[1:]])
        fed_back = self(*inputs, positions=positions, visible=visible)[m:]  # [m - 1, H]
        passes = []
        for ahead, predicted in ((1, taught), (2, fed_back)):
            logits = unit_rms(predicted[:-1]) @ output
            passes.append((predicted, features[ahead:], logits, tokens[ahead:]))
        return passes


def eagle_loss(
    layer: EagleLayer,
    sequences: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    output: torch.Tensor,
    columns: torch.Tensor,
) -> torch.Tensor:
    """EAGLE's loss over ``sequences`` (each ``features, tokens, embedded`` as :meth:`EagleLayer.two_passes` takes
    them): the smooth-L1 regression of the features and ``CE_WEIGHT`` x the cross-entropy of the tokens over
    ``output``'s columns (``columns [V]``: a token's column, negative for none), a mean over the positions of both
    passes."""
    loss, count = torch.zeros((), device=output.device), 0
    for sequence in sequences:
        for predicted, wanted, logits, chosen in layer.two_passes(*sequence, output):
            column = columns[chosen.cpu()]
            column = torch.where(column >= 0, column, -100).to(output.device)
            regression = F.smooth_l1_loss(predicted, wanted, reduction="sum") / predicted.shape[1]
            ce = F.cross_entropy(logits, column, ignore_index=-100, reduction="sum")
            loss, count = loss + regression + CE_WEIGHT * ce, count + len(predicted)
    return loss / max(1, count)


@checked_options
class Eagle(Drafter):
    """Method ``eagle``: the trained ``layer`` (default: the one trained or shipped for the target) drafts a tree of
    up to ``max_nodes`` nodes, at most ``max_depth`` deep, expanding the ``branch`` best nodes of each depth by
    their ``branch`` best children; nodes less than ``min_prob`` likely are left out. ``accept_head``: a child's
    chance given its parent is what the layer's trained acceptance head predicts (SpecDec++), where the layer has
    one; otherwise, or when False (the default: the head measured no gain on the default model), the layer's
    probability of the child (EAGLE-2). ``learn``: a learning rate:
    above 0, the layer keeps learning from every request the engine decodes (decodekit/drafters/online.py; set by
    the operator only)."""

    wants_step_logits = False

    def __init__(
        self,
        target: TargetInfo,
        layer: Annotated[str, FilePath(MAX_TRAINED_BYTES)] = "",
        max_nodes: Annotated[int, Range(1, 64)] = 8,
        max_depth: Annotated[int, Range(1, 16)] = 6,
        branch: Annotated[int, Range(1, 8)] = 2,
        min_prob: Annotated[float, Range(0.0, 1.0)] = 0.05,
        learn: Annotated[float, OperatorRange(0.0, 0.01)] = 0.0,
        accept_head: bool = False,
    ) -> None:
        if target.model is None:
            raise InvalidParameter("method eagle reads the target's features: build it through an Engine")
        self.model = target.model
        path = Path(layer) if layer else default_file(self.model, EagleLayer.kind, "layer")
        self.learner = None
        if learn > 0:  # one learner per engine, file and rate, fed by every request
            from decodekit.drafters.online import EagleObjective, learner  # it builds on this module

            self.learner = learner(self.model, path, EagleLayer, learn, EagleObjective)
            self.layer, self.vocab = self.learner.current, self.learner.vocab
        else:
            self.layer, self.vocab, _ = load_trained(path, EagleLayer, self.model)
        self.features: list[torch.Tensor] = []  # for the learner: this request's slots, [n, H] a step
        self.tokens: list[int] = []
        self.head = self.model.head_over(self.vocab)
        self.max_nodes, self.max_depth, self.branch, self.min_prob = max_nodes, max_depth, branch, min_prob
        self.by_head = accept_head and bool(self.layer.acceptance.trained)
        self.wants_hidden = (self.model.layers,)
        self.calibration = Calibration()
        self.caches = self.layer.new_caches(0)
        self.length = 0  # cache slots holding the committed text's pairs
        self.last: torch.Tensor | None = None  # [H]: the predicted feature at the root
        self.idle = 0  # steps in a row with nothing likely enough to draft

    def begin(self, prompt: torch.Tensor, prompt_logits: torch.Tensor | None) -> None:
        self.length, self.last = 0, None
        self.calibration, self.idle = Calibration(), 0  # per request: how well it drafts depends on the text
        if self.learner is not None:
            self._teach()
            self.layer = self.learner.current  # the latest it published; one layer per request: its cache is its own

    def _teach(self) -> None:
        """Hand the slots gathered so far to the learner as one sequence, and start another."""
        if len(self.tokens) >= 3:
            self.learner.add([(torch.cat(self.features), torch.tensor(self.tokens[:-1]))])
        self.features, self.tokens = [], []

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
            probs = torch.softmax(self.head(states), dim=-1)
            top = probs.topk(self.branch, dim=-1)  # [F, branch]
            accept = top.values  # each child's chance, given its parent: the layer's probability (EAGLE-2) ...
            if self.by_head:  # ... or what its acceptance head predicts (SpecDec++)
                accept = torch.sigmoid(self.layer.acceptance(states, probs, top.values, depth))
            children = []  # (chance, frontier index, trie node, token, the drafter's own chance of the path)
            for f, row in enumerate((paths[:, None] * accept).tolist()):
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
        ours = len(outcome.accepted) == len(outcome.committed)
        self.last = out[-1] if ours else None
        if self.learner is not None:
            self.features.append(features)
            self.tokens += outcome.committed[:m]
            if not ours or len(self.tokens) >= MAX_SEQUENCE:  # a gap in the slots, or a long request: a unit
                self._teach()

    def memory_bytes(self) -> int:
        return part_bytes(self.layer) + sum(cache.numel() * cache.element_size() for cache in self.caches)
