"""The decoder: a Llama-family transformer (or Gemma 3's variant of it) that scores a whole draft tree in one call
over a KV cache.

``Transformer.forward(tokens [B, n], cache, tree)`` places node i at rotary position ``cache length + depth(i)``,
lets it attend to the committed prefix and to its own ancestors, writes its key/value entries to the cache's
scratch slots and returns logits. Projections are fused (q|k|v and gate|up) so a layer is four matmuls. A Gemma 3
model has blocks of its own (:class:`GemmaBlock`), chosen once when the model is built.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from decodekit.errors import InvalidParameter
from decodekit.protocol import Tree
from decodekit.runtime import cpu
from decodekit.runtime.config import ModelConfig
from decodekit.runtime.kv_cache import KVCache
from decodekit.runtime.tree import Trees, attention_mask, positions

if TYPE_CHECKING:
    from decodekit.runtime.sparse_attention import DoubleSparsity, SparseAttention

# Attention kernels allowed on CUDA. Not cuDNN's: it builds an execution plan for every new key length, and the
# key length grows by one or more every step (measured on an H200: a bfloat16 decode step took ~4x its forward).
CUDA_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def cpu_linear_backend() -> str:
    """The packed backend for CPU linears: ``$DECODEKIT_LINEAR`` if set (small_gemm, onednn, torch), else our
    kernel where it builds, else oneDNN where present (float32 only), else plain torch."""
    choice = os.environ.get("DECODEKIT_LINEAR")
    if choice:
        if choice not in ("small_gemm", "onednn", "torch"):
            raise InvalidParameter(f"DECODEKIT_LINEAR must be small_gemm, onednn or torch, not {choice!r}")
        if choice == "small_gemm" and not cpu.available():
            raise InvalidParameter(
                f"DECODEKIT_LINEAR=small_gemm needs the CPU kernels, which are off here ({cpu.SWITCH}=0, a CPU without "
                "AVX2/FMA, or a failed build: see the warning above); use onednn or torch"
            )
        return choice
    if cpu.available():
        return "small_gemm"
    return "onednn" if onednn_available() else "torch"


class Linear(nn.Linear):
    """``nn.Linear`` that can hand its weight to a packed CPU backend (float32; small_gemm also bfloat16), or hold
    a GGUF-quantized weight (backend ``quant``, :func:`cpu.quant_linear`, float32 x) instead of a float one.

    Both packed backends compute a row's output the same way whatever the number of rows, so a token scored in
    a tree gets bitwise the logits it gets alone. One backend serves every call of a model: the two sum in
    different orders. ``small_gemm`` (kernels/small_gemm.cpp) streams the cold weights at close to memory
    bandwidth for the few rows of a decode step (BENCHMARKS.md).
    """

    backend = "torch"
    packed: object = None

    def reset_parameters(self) -> None:
        """Nothing: the weight stays as allocated (uninitialized) until a loader assigns it."""

    def quantized(self, weight: cpu.QuantWeight | list[cpu.QuantWeight]) -> None:
        """Take ``weight`` (of this layer's shape; or blocks of its rows in different forms, in order) in place of
        the float weight."""
        parts = weight if isinstance(weight, list) else [weight]
        rows = sum(part.n for part in parts)
        if rows != self.out_features or any(part.k != self.in_features for part in parts):
            raise ValueError(f"a [{rows}, {parts[0].k}] weight for a [{self.out_features}, {self.in_features}] layer")
        self.packed, self.backend, self.weight = weight, "quant", None

    def pack(self, backend: str, keep_weight: bool) -> None:
        if self.backend == "quant":
            return
        weight = self.weight.detach()
        if backend == "small_gemm":
            self.packed = cpu.pack(weight)
        elif backend == "onednn":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        else:
            return
        self.backend = backend
        if not keep_weight:
            self.weight = None  # the packed copy replaces it; the module is inference-only from here on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "quant":
            if not isinstance(self.packed, list):
                return cpu.quant_linear(x, self.packed, self.bias)
            y = torch.cat([cpu.quant_linear(x, part) for part in self.packed], dim=-1)
            return y if self.bias is None else y + self.bias
        if self.backend == "small_gemm":
            return cpu.linear(x, self.packed, self.bias)
        if self.backend == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """``nn.Embedding`` that can hold a GGUF-quantized table instead (rows de-quantized as they are looked up)."""

    quant: cpu.QuantWeight | None = None

    def reset_parameters(self) -> None:
        """Nothing: the table stays as allocated (uninitialized) until a loader assigns it."""

    def quantized(self, weight: cpu.QuantWeight) -> None:
        if (weight.n, weight.k) != (self.num_embeddings, self.embedding_dim):
            shape = (self.num_embeddings, self.embedding_dim)
            raise ValueError(f"a [{weight.n}, {weight.k}] table for a {list(shape)} one")
        self.quant, self.weight = weight, None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            return cpu.dequantize(self.quant, tokens.reshape(-1)).view(*tokens.shape, self.embedding_dim)
        return super().forward(tokens)


class RMSNorm(nn.Module):
    fused = False  # set by Transformer.prepare where cpu.rms_norm serves this model

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return cpu.rms_norm(x, self.weight, self.eps)
        # statistics in float32 whatever the model dtype, as the reference implementation does
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def scale(self) -> torch.Tensor:
        """float32 ``[dim]``: what the norm multiplies the unit-RMS input by."""
        return self.weight.detach().float()


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMS norm: ``(x / sqrt(mean(x**2) + eps)) * (1 + weight)`` in float32, rounded to the dtype once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return cpu.rms_norm(x, self.weight, self.eps, unit_offset=True)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)

    def scale(self) -> torch.Tensor:
        return 1.0 + self.weight.detach().float()

    def heads_(self, x: torch.Tensor, first: int, heads: int) -> None:
        """Norm each of the heads ``[first, first + heads)`` of a contiguous ``x [B, n, all heads, d]`` in place."""
        if self.fused:
            cpu.rms_norm_heads_(x, self.weight, self.eps, first, heads, unit_offset=True)
        else:
            x[:, :, first : first + heads] = self(x[:, :, first : first + heads])


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, half-split convention. x ``[B, n, heads, d]``; cos, sin ``[B, n, 1, d]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# Queries up to which a CPU block uses cpu.attention (a row's output independent of the other rows),
# past which torch's flash attention (faster for a long prompt's prefill). Every decode step stays under it:
# drafts are at most 256 nodes (decodekit.protocol.MAX_DRAFT_NODES).
KERNEL_ATTENTION_MAX_QUERIES = 256


class Block(nn.Module):
    # set by Transformer.prepare where the CPU kernels serve this model
    cpu_attention = False
    fused = False  # cpu.rope_ and cpu.silu_mul (Gemma: also cpu.gelu_tanh_mul)
    sparse: SparseAttention | None = None  # set by Transformer.use_sparse_attention
    # the whole block as one kernel call (cpu.fused_block), set by Transformer.prepare where every step of it has
    # a kernel; forward takes it wherever it would take the kernels op by op
    fused_block: object = None
    norm_class = RMSNorm
    # the block's norms -> their names in a Hugging Face checkpoint (model.layers.N.*) and a GGUF file (blk.N.*)
    NORMS: ClassVar[dict[str, tuple[str, str]]] = {
        "attn_norm": ("input_layernorm", "attn_norm"),
        "mlp_norm": ("post_attention_layernorm", "ffn_norm"),
    }

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.scale = cfg.attention_scale
        qkv_out = (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim
        self.attn_norm = self.norm_class(cfg.hidden_size, cfg.norm_eps)
        self.wqkv = Linear(cfg.hidden_size, qkv_out, bias=cfg.qkv_bias)
        self.wo = Linear(cfg.heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.mlp_norm = self.norm_class(cfg.hidden_size, cfg.norm_eps)
        self.w_gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.w_down = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        # norms of the attention's and the MLP's outputs before their residual adds (Gemma's; None: none)
        self.post_attn_norm: nn.Module | None = None
        self.post_mlp_norm: nn.Module | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        slot: int,
        width: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """``x [B, n, hidden]`` -> ``[B, n, hidden]``. ``cos``, ``sin`` ``[B, n, 1, head_dim]``; ``slot``: the cache
        layer that holds this block's keys and values; ``width``: the cache slots attended; ``mask``
        ``[B, 1, n, width]`` or None (every slot)."""
        if self.fused_block is not None and self.sparse is None and x.shape[1] <= KERNEL_ATTENTION_MAX_QUERIES:
            return self.fused_block.forward(x, cos, sin, cache.layer(slot), cache.lengths, width, mask)
        h = self.wo(self.attend(self.attn_norm(x), cos, sin, cache, slot, width, mask))
        x = x + (h if self.post_attn_norm is None else self.post_attn_norm(h))
        h = self.w_down(self.activate(self.w_gate_up(self.mlp_norm(x))))
        return x + (h if self.post_mlp_norm is None else self.post_mlp_norm(h))

    def fuse(self) -> None:
        """Bind this block's weights into one kernel call (:attr:`fused_block`) where each of its steps runs on a
        CPU kernel: the fused elementwise ops, the attention kernel and packed or quantized projections."""
        projections = [self.wqkv, self.wo, self.w_gate_up, self.w_down]
        kernels = self.fused and self.cpu_attention
        if not kernels or any(p.backend not in ("small_gemm", "quant") for p in projections):
            return
        norms = [norm.weight for norm in self.norms_in_kernel_order()]
        weights = [(p.packed, p.bias) for p in projections]
        scale = self.head_dim**-0.5 if self.scale is None else self.scale  # cpu.attention's default
        eps = self.attn_norm.eps
        self.fused_block = cpu.fused_block(self.heads, self.kv_heads, self.head_dim, scale, eps, norms, weights)

    def norms_in_kernel_order(self) -> list[RMSNorm]:
        """The norms as :func:`cpu.fused_block` takes them."""
        return [self.attn_norm, self.mlp_norm]

    def activate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` for ``gate_up [..., 2I]`` = (gate | up): ``[..., I]``."""
        if self.fused:
            return cpu.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def attend(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        slot: int,
        width: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention of the normed ``h [B, n, hidden]`` over the cache, its keys and values written there first:
        the heads' outputs ``[B, n, heads * head_dim]``, before the output projection. Over each query's chosen
        slots only where the model uses sparse attention (:attr:`sparse`)."""
        B, n, _ = h.shape
        H, G, d = self.heads, self.kv_heads, self.head_dim
        qkv = self.wqkv(h).view(B, n, H + 2 * G, d)
        self.rotate_(qkv, cos, sin)
        q = qkv[:, :, :H].transpose(1, 2)
        cache.write(slot, qkv[:, :, H:].view(B, n, 2, G, d).permute(2, 0, 3, 1, 4))
        keys, values = cache.view(slot, width)
        kernel = self.cpu_attention and n <= KERNEL_ATTENTION_MAX_QUERIES
        if self.sparse is not None:
            kept = self.sparse.select(q, qkv[:, :, H : H + G], cache, slot, width, mask)
            if kept is not None:
                return self.sparse.attend(q, keys, values, kept, self.scale, kernel)
        if kernel:
            attn = cpu.attention(q, keys, values, mask, self.scale)
        else:
            gqa = self.heads != self.kv_heads
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        return attn.transpose(1, 2).reshape(B, n, H * d)

    def rotate_(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotary embedding of the query and key heads of ``qkv [B, n, heads + 2 kv_heads, head_dim]``, in place."""
        if self.fused:
            cpu.rope_(qkv, cos, sin, self.heads + self.kv_heads)
        else:
            qkv[:, :, : self.heads + self.kv_heads] = rotate(qkv[:, :, : self.heads + self.kv_heads], cos, sin)


class GemmaBlock(Block):
    """Gemma 3's block: Gemma's norms (:class:`GemmaRMSNorm`) before and after attention and the MLP, each query
    and key head normed before its rotary embedding, and a GeGLU MLP (GELU, tanh approximation)."""

    norm_class = GemmaRMSNorm
    NORMS: ClassVar[dict[str, tuple[str, str]]] = {
        "attn_norm": ("input_layernorm", "attn_norm"),
        "post_attn_norm": ("post_attention_layernorm", "post_attention_norm"),
        "mlp_norm": ("pre_feedforward_layernorm", "ffn_norm"),
        "post_mlp_norm": ("post_feedforward_layernorm", "post_ffw_norm"),
        "q_norm": ("self_attn.q_norm", "attn_q_norm"),
        "k_norm": ("self_attn.k_norm", "attn_k_norm"),
    }

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.post_attn_norm = GemmaRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.post_mlp_norm = GemmaRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.norm_eps)

    def norms_in_kernel_order(self) -> list[RMSNorm]:
        return [self.attn_norm, self.mlp_norm, self.post_attn_norm, self.post_mlp_norm, self.q_norm, self.k_norm]

    def activate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """GeGLU: ``gelu_tanh(gate) * up``."""
        if self.fused:
            return cpu.gelu_tanh_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up

    def rotate_(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """The query and key heads normed, then rotated, in place."""
        self.q_norm.heads_(qkv, 0, self.heads)
        self.k_norm.heads_(qkv, self.heads, self.kv_heads)
        super().rotate_(qkv, cos, sin)


def block_class(cfg: ModelConfig) -> type[Block]:
    """The block a model of ``cfg`` is built of."""
    return GemmaBlock if cfg.gemma else Block


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        """A model of ``cfg``'s shape whose linear and embedding weights are uninitialized (torch.empty: no memory
        touched, none spent on random values): load them (loader.py) or initialize them before use. The norms
        start at ones."""
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size)
        block = block_class(cfg)
        self.blocks = nn.ModuleList(block(cfg) for _ in range(cfg.layers))
        self.norm = block.norm_class(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._rope_cache: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sparse_attention: DoubleSparsity | None = None  # see use_sparse_attention
        self.sparse_channels: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the weights' too, unless they are quantized)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def prepare(self) -> Transformer:
        """Final step after loading: on CPU in float32 or bfloat16, pack every linear weight for the fastest
        backend (in bfloat16: our kernel where it builds, else torch's), use the decode attention and the fused
        elementwise kernels where they build, and then each block as one kernel call where all of it has one."""
        if self.device.type == "cpu" and self.dtype in cpu.WEIGHT_DTYPES:
            float32, kernels = self.dtype == torch.float32, cpu.available()
            backend = cpu_linear_backend()
            if not float32 and backend != "small_gemm":
                backend = "torch"
            for module in self.modules():
                if isinstance(module, Block):
                    module.cpu_attention = kernels and self.cfg.head_dim in cpu.ATTENTION_HEAD_DIMS
                    module.fused = kernels
                elif isinstance(module, RMSNorm):
                    module.fused = kernels
                elif isinstance(module, Linear):
                    module.pack(backend, keep_weight=module is self.lm_head and self.cfg.tie_embeddings)
            for block in self.blocks:
                block.fuse()
        return self

    def use_sparse_attention(self, config: DoubleSparsity | None, channels: torch.Tensor | None = None) -> None:
        """Attend by Double Sparsity (runtime/sparse_attention.py: APPROXIMATE) with the label channels
        ``channels`` int64 ``[layers, kv_heads, C]`` (from ``sparse_attention.calibrate``), or fully where
        ``config`` is None. Caches made before keep no labels: sparse attention refuses them."""
        # imported here: sparse_attention reads the drafters' options, whose package imports this module
        from decodekit.runtime.sparse_attention import SlotPlans, SparseAttention

        if config is None:
            self.sparse_attention, self.sparse_channels = None, None
            for block in self.blocks:
                block.sparse = None
            return
        cfg = self.cfg
        if channels is None or channels.shape[:2] != (cfg.layers, cfg.kv_heads):
            shape = None if channels is None else list(channels.shape)
            raise ValueError(f"label channels {shape} for {cfg.layers} layers of {cfg.kv_heads} KV heads")
        self.sparse_attention, self.sparse_channels = config, channels
        plans = SlotPlans(config)
        for block, own in zip(self.blocks, channels.to(self.device), strict=True):
            block.sparse = SparseAttention(config, own, plans)

    def new_cache(self, capacity: int, batch: int = 1, layers: int | None = None) -> KVCache:
        """A cache for ``layers`` blocks (None: every block) of this model, with a label cache while the model
        uses sparse attention."""
        cfg = self.cfg
        layers = cfg.layers if layers is None else layers
        labels = 0 if self.sparse_channels is None else self.sparse_channels.shape[2]
        return KVCache(layers, batch, cfg.kv_heads, capacity, cfg.head_dim, self.dtype, self.device, labels)

    def rope_table(self, length: int, sliding: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[length, head_dim]`` in the model dtype, computed in float32 and kept: those of the
        sliding-window layers where ``sliding`` (the same tables unless ``cfg.sliding_rope`` is given)."""
        sliding = sliding and self.cfg.sliding_rope is not None
        table = self._rope_cache.get(sliding)
        if table is None or table[0].shape[0] < length:
            length = max(length, self.cfg.context_window + 64)
            inv_freq, scale = self.cfg.sliding_rope if sliding else (self.cfg.rope_inv_freq, self.cfg.rope_scale)
            freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
            angles = torch.cat((freqs, freqs), dim=-1)
            table = (
                (angles.cos() * scale).to(self.dtype).to(self.device),
                (angles.sin() * scale).to(self.dtype).to(self.device),
            )
            self._rope_cache[sliding] = table
        return table

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        tree: Trees | None = None,
        logits_at: torch.Tensor | slice | None = None,
        capture: dict[int, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Score ``tokens`` int64 ``[B, n]`` laid out as ``tree`` (a chain when None; or one tree per row, all
        of ``n`` nodes) after each row's prefix.

        Writes their key/value entries to the cache's scratch slots; the caller commits what it keeps.
        Returns float logits ``[B, m, vocab]`` for the nodes selected by ``logits_at`` (all when None).
        ``capture``: see :meth:`hidden_states`.
        """
        x = self.hidden_states(tokens, cache, tree, capture=capture)
        return self.logits(x if logits_at is None else x[:, logits_at])

    @torch.inference_mode()
    def hidden_states(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        tree: Trees | None = None,
        layers: Sequence[int] | None = None,
        capture: dict[int, torch.Tensor | None] | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The residual stream ``[B, n, hidden]`` after the last block run, before the final norm: as
        :meth:`forward`, with only the blocks ``layers`` (increasing indices; None: all), whose keys and values
        ``cache`` holds in its layers ``0, 1, ...`` in that order. ``capture``: a dict whose keys are layer indices;
        entry ``l`` is set to the residual stream entering block ``l`` (``l = cfg.layers``: leaving the last
        block), ``[B, n, hidden]``. ``embeddings`` ``[B, n, hidden]``: the stream entering the first block, in
        place of ``tokens``' own (which then give the shape only)."""
        n = tokens.shape[1]
        tree = tree if tree is not None else Tree.chain(n)
        layers = range(self.cfg.layers) if layers is None else layers
        cache.check_room(n)
        lengths = cache.lengths
        pos = positions(lengths, tree).to(self.device)
        width = max(lengths) + n
        windows = [self.cfg.layer_windows[layer] for layer in layers]
        masks: dict[int | None, torch.Tensor | None] = {}
        rotary: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = {}  # cos, sin [B, n, 1, head_dim]
        for window in set(windows):
            if n == 1 and (window is None or width <= window) and len(set(lengths)) == 1:
                masks[window] = None  # one query that sees every slot
            else:
                masks[window] = attention_mask(lengths, tree, window).to(self.device)
            cos_table, sin_table = self.rope_table(width, sliding=window is not None)
            rotary[window] = cos_table[pos][:, :, None], sin_table[pos][:, :, None]
        x = self.embedded(tokens) if embeddings is None else embeddings.to(self.dtype)
        with sdpa_kernel(CUDA_ATTENTION_BACKENDS) if self.device.type == "cuda" else nullcontext():
            for slot, (layer, window) in enumerate(zip(layers, windows, strict=True)):
                if capture is not None and layer in capture:
                    capture[layer] = x
                x = self.blocks[layer](x, *rotary[window], cache, slot, width, masks[window])
        if capture is not None and self.cfg.layers in capture:
            capture[self.cfg.layers] = x
        return x

    def embedded(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` int64 ``[...]`` -> ``[..., hidden]``: the residual stream entering the first block."""
        x = self.embed(tokens)
        if self.cfg.gemma:  # scaled by sqrt(hidden_size) rounded to the dtype, as transformers does
            x = x * torch.tensor(self.cfg.hidden_size**0.5).to(x.dtype)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float logits ``[..., vocab]`` of the residual stream ``hidden`` ``[..., hidden]`` leaving the last block."""
        return self.lm_head(self.norm(hidden)).float()

    @torch.inference_mode()
    def output_map(self) -> torch.Tensor:
        """float32 ``[hidden, vocab]``: the final norm's scale and the LM head as one matrix ``G``: the logits of
        ``x`` leaving the last block are ``x / sqrt(mean(x**2) + norm_eps) @ G`` (for training drafters, which
        need them differentiable). Computed through the LM head itself: exact for float weights, within the
        activations' int8 rounding for GGUF ones."""
        return self.lm_head(torch.diag(self.norm.scale()).to(self.dtype)).float()
