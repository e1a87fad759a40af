"""Double Sparsity (Yang et al. 2024, "Post-Training Sparse Attention with Double Sparsity"): APPROXIMATE
attention over the few cached tokens that matter to each query, found with a few outlier channels.

Offline, :func:`calibrate` picks, per layer and KV head, the ``channels`` head-dim channels that carry most of
``|q_c k_c|`` on calibration text. At run time a cache keeps those channels of every key (its label cache,
``KVCache.labels``); each query scores every slot it may see with them (``q_label . k_label``, summed over the
query heads of the KV head), and exact softmax attention runs over its ``tokens`` best-scoring slots and its
``recent`` newest ones. A query that sees at most ``tokens + recent`` slots attends to all of them: exactly full
attention.

Every query row picks its own slots among those its mask allows, prompt tokens included (the paper prefills
densely; here a prompt chunk selects too), so a token gets the same result alone, in a draft tree or in a prompt
chunk: the speculative methods are lossless relative to this attention, not to full attention.

The scores are float64 sums of products of float32, bfloat16 or float16 values (each product exact), so the order
in which a matmul of some batch shape sums them moves a score by a few float64 ulps at most: a row's top slots do
not depend on the other rows in the step (unless two scores lie that close: exact ties, which keys at distinct
rotary positions do not give). Hence the label cache holds float64 (a quarter of the keys' float32 bytes at 16 of
64 channels); float32 scores from a matmul differ in their last bits with its shape, and would flip the choice at
near ties.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Annotated, get_args, get_type_hints

import torch
import torch.nn.functional as F

from decodekit.drafters.options import Option, Range, parse_spec
from decodekit.errors import InvalidParameter, clip
from decodekit.runtime import cpu

if TYPE_CHECKING:
    from decodekit.runtime.kv_cache import KVCache
    from decodekit.runtime.loader import LoadedModel
    from decodekit.runtime.model import Transformer

NAME = "double_sparsity"
FULL = "full"
CALIBRATION_TOKENS = 4096  # of the built-in prompts, for calibrated_channels


@dataclass(frozen=True)
class DoubleSparsity:
    """Settings: ``channels`` label channels per KV head (clamped to head_dim), ``tokens`` slots a query keeps by
    label score, ``recent`` newest slots it always keeps. InvalidParameter for a value out of bounds."""

    channels: Annotated[int, Range(1, 128)] = 16
    tokens: Annotated[int, Range(16, 8192)] = 256
    recent: Annotated[int, Range(0, 1024)] = 16

    def __post_init__(self) -> None:
        for name, option in attention_options().items():
            value = getattr(self, name)
            try:
                option.check(value)
            except ValueError as err:
                raise InvalidParameter(f"option {name} of attention {NAME}: {clip(value)} {err}", "attention") from None

    @property
    def spec(self) -> str:
        """The spec that names these settings (:func:`parse_attention`)."""
        return f"{NAME}:" + ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


@functools.cache
def attention_options() -> dict[str, Option]:
    """DoubleSparsity's options, by name, with their bounds."""
    hints = get_type_hints(DoubleSparsity, include_extras=True)
    options = {}
    for field in fields(DoubleSparsity):
        base, kind = get_args(hints[field.name])
        options[field.name] = Option(field.name, base, field.default, kind)
    return options


def parse_attention(spec: str | None) -> DoubleSparsity | None:
    """The attention ``spec`` names: ``full`` or None (full attention: None), or ``double_sparsity`` with options
    ``:key=value,...`` (``double_sparsity:tokens=512,channels=8``). InvalidParameter (param "attention") if not."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        raise InvalidParameter(f"attention must be a spec such as '{NAME}:tokens=256', got {clip(spec)}", "attention")
    name, _, options = spec.strip().partition(":")
    if name == FULL:
        if options.strip():
            raise InvalidParameter(f"attention {FULL} takes no options, got {clip(options)}", "attention")
        return None
    if name != NAME:
        raise InvalidParameter(f"unknown attention {clip(name)}; available: {FULL}, {NAME}", "attention")
    try:
        _, values = parse_spec(spec, {NAME: DoubleSparsity}, "attention", declared=lambda _: attention_options())
    except InvalidParameter as err:
        raise InvalidParameter(str(err), "attention") from None
    return DoubleSparsity(**values)


def attention_spec(config: DoubleSparsity | None) -> str:
    """What results record: ``full``, or the settings' spec."""
    return FULL if config is None else config.spec


# ---- calibration --------------------------------------------------------------------------------------------


def calibration_batches(model: LoadedModel, max_tokens: int = CALIBRATION_TOKENS) -> list[torch.Tensor]:
    """Calibration text: the turns of the package's built-in prompts (decodekit/data/prompts.jsonl), each as a
    user message in the chat template, int64 ``[1, n]`` each (cut to the context window), ``max_tokens`` in all."""
    from decodekit.prompts import builtin_questions
    from decodekit.text import encode_chat

    batches, total = [], 0
    for turn in (turn for question in builtin_questions() for turn in question.turns):
        ids = encode_chat(model.tokenizer, [{"role": "user", "content": turn}])[: model.cfg.context_window]
        ids = ids[: max_tokens - total]
        if not ids:
            break
        batches.append(torch.tensor([ids]))
        total += len(ids)
    return batches


@torch.inference_mode()
def calibrate(transformer: Transformer, token_batches: Iterable[torch.Tensor], channels: int) -> torch.Tensor:
    """The label channels: int64 ``[layers, kv_heads, min(channels, head_dim)]``, per layer and KV head the
    channels of the largest mean ``|q_c k_c|`` over the tokens of ``token_batches`` (int64 ``[B, n]`` each), q of
    each query head sharing the KV head and k of the same token, both rotated as the model computes them, most
    important first. Runs the batches with full attention (captured by a hook that recomputes each block's
    rotated q and k from its input; :func:`calibrated_channels` calibrates on the built-in prompts)."""
    cfg = transformer.cfg
    H, G, d = cfg.heads, cfg.kv_heads, cfg.head_dim
    totals = torch.zeros(cfg.layers, G, d, dtype=torch.float64)

    def hook(layer: int) -> Callable[[torch.nn.Module, tuple], None]:
        def capture(block: torch.nn.Module, args: tuple) -> None:
            x, cos, sin = args[:3]
            B, n, _ = x.shape
            qkv = block.wqkv(block.attn_norm(x)).view(B, n, H + 2 * G, d)
            block.rotate_(qkv, cos, sin)
            q = qkv[:, :, :H].view(B, n, G, H // G, d).float()
            k = qkv[:, :, H : H + G, None].float()
            totals[layer] += (q * k).abs().sum((0, 1, 3)).double().cpu()

        return capture

    saved = transformer.sparse_attention, transformer.sparse_channels
    transformer.use_sparse_attention(None)
    handles = [block.register_forward_pre_hook(hook(i)) for i, block in enumerate(transformer.blocks)]
    try:
        for tokens in token_batches:
            cache = transformer.new_cache(tokens.shape[1], tokens.shape[0])
            transformer.hidden_states(tokens.to(transformer.device), cache)
    finally:
        for handle in handles:
            handle.remove()
        transformer.use_sparse_attention(*saved)
    return totals.argsort(dim=-1, descending=True, stable=True)[..., : min(channels, d)].contiguous()


_RANKINGS: dict[tuple[str, str], torch.Tensor] = {}  # (model identity, weights) -> every channel, ranked


def calibrated_channels(model: LoadedModel, channels: int) -> torch.Tensor:
    """:func:`calibrate` on the built-in prompts (:func:`calibration_batches`), done once per model's weights:
    int64 ``[layers, kv_heads, min(channels, head_dim)]``."""
    key = (model.identity, model.weights)
    if key not in _RANKINGS:
        _RANKINGS[key] = calibrate(model.transformer, calibration_batches(model), model.cfg.head_dim)
    return _RANKINGS[key][..., :channels].contiguous()


# ---- selection ----------------------------------------------------------------------------------------------


def key_labels(keys: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """The labels of ``keys [B, kv_heads, n, d]``: their ``channels`` (int64 ``[kv_heads, C]``), float64
    ``[B, kv_heads, C, n]``."""
    B, G, n, _ = keys.shape
    return keys.gather(3, channels[None, :, None, :].expand(B, G, n, -1)).transpose(2, 3).double()


def label_scores(q: torch.Tensor, labels: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """float64 ``[B, kv_heads, n, W]``: for each query of ``q [B, heads, n, d]`` and each slot of ``labels``
    (float64 ``[B, kv_heads, C, W]``), the query heads' channels ``channels [kv_heads, C]`` dotted with the slot's
    labels, summed over the query heads of each KV head."""
    B, H, n, d = q.shape
    _, G, C, W = labels.shape
    picked = q.reshape(B, G, H // G, n, d).gather(4, channels[None, :, None, None, :].expand(B, G, H // G, n, C))
    summed = picked.double().sum(2).reshape(B * G, n, C)
    return torch.bmm(summed, labels.reshape(B * G, C, W)).view(B, G, n, W)


@dataclass(frozen=True)
class SlotPlan:
    """What each query row of a step keeps whatever the scores: ``always`` bool ``[B, 1, n, W]`` (the ``recent``
    newest slots it may see; all of them where it sees at most ``tokens + recent``), and what it chooses its
    ``tokens`` best among: ``candidates``, the other slots it may see, bool ``[B, 1, n, W]``, or an int ``m``:
    the slots ``[0, m)`` for every row."""

    always: torch.Tensor
    candidates: torch.Tensor | int


def slot_plan(
    mask: torch.Tensor | None, shape: tuple[int, int, int], tokens: int, recent: int, device: torch.device
) -> SlotPlan | None:
    """The plan of a step of ``shape`` (B, n, W) whose queries may see ``mask`` (bool ``[B, 1, n, W]``, or None:
    every slot); None when no row sees more than ``tokens + recent`` slots (then attention is full)."""
    batch, n, width = shape
    if mask is None:
        if width <= tokens + recent:
            return None
        always = torch.zeros(batch, 1, n, width, dtype=torch.bool, device=device)
        always[..., width - recent :] = True
        return SlotPlan(always, width - recent)
    seen = mask.sum(-1, keepdim=True)
    if int(seen.max()) <= tokens + recent:
        return None
    after = seen - mask.cumsum(-1)  # the slots a row sees after each slot (slot order is sequence order)
    always = mask & ((after < recent) | (seen <= tokens + recent))
    return SlotPlan(always, mask & ~always)


def choose(scores: torch.Tensor, plan: SlotPlan, tokens: int) -> torch.Tensor:
    """The slots each query keeps: bool ``[B, kv_heads, n, W]``, from its label scores ``[B, kv_heads, n, W]``."""
    if isinstance(plan.candidates, int):
        top = scores[..., : plan.candidates].topk(tokens, sorted=False).indices
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, top, True) | plan.always
    top = scores.masked_fill(~plan.candidates, float("-inf")).topk(min(tokens, scores.shape[-1]), sorted=False).indices
    kept = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, top, True)
    return (kept & plan.candidates) | plan.always


def kept_slots(
    q: torch.Tensor,
    labels: torch.Tensor,
    channels: torch.Tensor,
    mask: torch.Tensor | None,
    tokens: int,
    recent: int,
) -> torch.Tensor:
    """The slots Double Sparsity attends to: bool ``[B, kv_heads, n, W]`` for queries ``q [B, heads, n, d]`` that
    may see ``mask`` (bool ``[B, 1, n, W]``, or None: every slot), the keys' ``labels`` float64
    ``[B, kv_heads, C, W]`` (:func:`key_labels`) on ``channels`` int64 ``[kv_heads, C]``."""
    B, _, n, _ = q.shape
    _, G, _, W = labels.shape
    plan = slot_plan(mask, (B, n, W), tokens, recent, q.device)
    if plan is None:
        every = torch.ones(B, 1, n, W, dtype=torch.bool, device=q.device) if mask is None else mask
        return every.expand(B, G, n, W)
    return choose(label_scores(q, labels, channels), plan, tokens)


class SlotPlans:
    """The plans of the last masks seen, shared by a model's blocks: a step's blocks see one mask per kind of
    window, so its plan is made once."""

    KEPT = 2  # global and sliding-window layers

    def __init__(self, config: DoubleSparsity) -> None:
        self.config = config
        self._plans: list[tuple[torch.Tensor | None, tuple[int, int, int], SlotPlan | None]] = []

    def get(self, mask: torch.Tensor | None, shape: tuple[int, int, int], device: torch.device) -> SlotPlan | None:
        for seen_mask, seen_shape, plan in self._plans:
            if seen_mask is mask and seen_shape == shape:
                return plan
        plan = slot_plan(mask, shape, self.config.tokens, self.config.recent, device)
        self._plans = [(mask, shape, plan), *self._plans[: self.KEPT - 1]]
        return plan


class SparseAttention:
    """Double Sparsity at one block: its label channels int64 ``[kv_heads, C]`` and the model's settings and
    plans.

    The label cache is kept (``KVCache.labels``, written as keys are) rather than gathered from the cached keys at
    each step: a gather reads every key's cache lines (16 channels spread over a key of 64), and scoring gathered
    labels took 4x as long as scoring kept ones (SmolLM2-135M, 8000 slots, one core: 583 against 143 us a layer,
    scripts/sparse_attention_bench.py): some 60% of the 0.75 ms a layer that sparse attention saved there.
    """

    def __init__(self, config: DoubleSparsity, channels: torch.Tensor, plans: SlotPlans) -> None:
        self.config, self.channels, self.plans = config, channels, plans

    def select(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        cache: KVCache,
        slot: int,
        width: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Store the labels of the step's new keys ``keys [B, n, kv_heads, d]`` (just written to cache layer
        ``slot``), then choose the slots of each query of ``q [B, heads, n, d]``: bool ``[B, kv_heads, n, width]``,
        or None where every query attends to all it may see (full attention)."""
        labels = cache.labels
        if labels is None or labels.shape[3] != self.channels.shape[1]:
            raise RuntimeError(
                "sparse attention on a cache made without its label cache: make caches (Transformer.new_cache) "
                "after Transformer.use_sparse_attention"
            )
        cache.write_labels(slot, key_labels(keys.transpose(1, 2), self.channels))
        B, _, n, _ = q.shape
        plan = self.plans.get(mask, (B, n, width), q.device)
        if plan is None:
            return None
        return choose(label_scores(q, labels[slot, ..., :width], self.channels), plan, self.config.tokens)

    @staticmethod
    def attend(
        q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, scale: float, kernel: bool
    ) -> torch.Tensor:
        """Exact attention of ``q [B, heads, n, d]`` over the ``kept`` slots (bool ``[B, kv_heads, n, W]``) of
        ``keys`` and ``values`` ``[B, kv_heads, W, d]``, each KV head its own batch row: the heads' outputs
        ``[B, n, heads * d]``. ``kernel``: through cpu.attention (a query's output bitwise a function of the keys
        and values it keeps, in slot order), else torch's attention."""
        B, H, n, d = q.shape
        G, W = keys.shape[1], keys.shape[2]
        q = q.reshape(B * G, H // G, n, d)
        keys, values, kept = keys.reshape(B * G, 1, W, d), values.reshape(B * G, 1, W, d), kept.view(B * G, 1, n, W)
        if kernel:
            out = cpu.attention(q, keys, values, kept, scale)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=kept, scale=scale, enable_gqa=True)
        return out.view(B, G, H // G, n, d).permute(0, 3, 1, 2, 4).reshape(B, n, H * d)
