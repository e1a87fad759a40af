"""The runtime's view of a checkpoint's config: the Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from decodekit.errors import UnsupportedArchitecture

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
# rope types whose frequencies do not depend on the current sequence length
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    norm_eps: float
    qkv_bias: bool
    tie_embeddings: bool
    context_window: int
    layer_windows: tuple[int | None, ...]  # sliding-window size per layer, None = full attention
    rope_inv_freq: torch.Tensor  # float32 [head_dim // 2]
    rope_scale: float  # multiplies cos and sin (yarn's attention factor; 1.0 otherwise)

    @staticmethod
    def from_hf(hf: PretrainedConfig) -> ModelConfig:
        """Translate a transformers config; raise UnsupportedArchitecture for anything we do not run."""
        arch = hf.model_type
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitecture(
                f"unsupported architecture {arch!r}: decodekit runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if getattr(hf, "quantization_config", None):
            raise UnsupportedArchitecture("quantized safetensors checkpoints are not supported; use float weights")
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise UnsupportedArchitecture(f"unsupported activation {hf.hidden_act!r} (only silu)")
        if getattr(hf, "mlp_bias", False) or getattr(hf, "pretraining_tp", 1) != 1:
            raise UnsupportedArchitecture("MLP biases and pretraining_tp > 1 are not supported")
        rope = hf.rope_parameters or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise UnsupportedArchitecture(f"unsupported rope type {rope_type!r}")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedArchitecture("partial rotary embeddings are not supported")
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        if rope_type == "default":
            inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scale = 1.0
        else:
            inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
        return ModelConfig(
            architecture=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            layers=hf.num_hidden_layers,
            heads=hf.num_attention_heads,
            kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim,
            norm_eps=hf.rms_norm_eps,
            qkv_bias=arch == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            context_window=hf.max_position_embeddings,
            layer_windows=_layer_windows(hf),
            rope_inv_freq=inv_freq.float(),
            rope_scale=float(scale),
        )


def _layer_windows(hf: PretrainedConfig) -> tuple[int | None, ...]:
    window = getattr(hf, "sliding_window", None)
    if hf.model_type == "qwen2":
        types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (window,) * hf.num_hidden_layers
