"""The runtime's view of a checkpoint's config: the Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2) and Gemma 3
(text)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from decodekit.errors import UnsupportedArchitecture

if TYPE_CHECKING:
    from transformers import PretrainedConfig

GEMMA3 = "gemma3_text"
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", GEMMA3)
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
    # Gemma 3: its block (norms x * (1 + w), also after attention and MLP and on each q and k head; GeGLU MLP) and
    # embeddings scaled by sqrt(hidden_size)
    gemma: bool = False
    attention_scale: float | None = None  # the softmax scale; None: head_dim ** -0.5
    # (inv_freq, scale) of the sliding-window layers where given apart (Gemma 3's local base); None: rope_inv_freq
    sliding_rope: tuple[torch.Tensor, float] | None = None

    def to_json(self) -> str:
        """The config as JSON (tensors as lists of their float32 values, exactly); :meth:`from_json` reads it."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["rope_inv_freq"] = self.rope_inv_freq.tolist()
        if self.sliding_rope is not None:
            values["sliding_rope"] = [self.sliding_rope[0].tolist(), self.sliding_rope[1]]
        return json.dumps({"format": FORMAT, **values})

    @staticmethod
    def from_json(text: str) -> ModelConfig:
        """The config :meth:`to_json` wrote; ValueError where another version of this module wrote it."""
        values = json.loads(text)
        if values.pop("format", None) != FORMAT:
            raise ValueError("a runtime config of another format")
        values["rope_inv_freq"] = torch.tensor(values["rope_inv_freq"], dtype=torch.float32)
        values["layer_windows"] = tuple(values["layer_windows"])
        if values["sliding_rope"] is not None:
            inv_freq, scale = values["sliding_rope"]
            values["sliding_rope"] = (torch.tensor(inv_freq, dtype=torch.float32), scale)
        return ModelConfig(**values)

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
        gemma = arch == GEMMA3
        if gemma:
            _check_gemma(hf)
        elif getattr(hf, "hidden_act", "silu") != "silu":
            raise UnsupportedArchitecture(f"unsupported activation {hf.hidden_act!r} (only silu)")
        if getattr(hf, "mlp_bias", False) or getattr(hf, "pretraining_tp", 1) != 1:
            raise UnsupportedArchitecture("MLP biases and pretraining_tp > 1 are not supported")
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        if gemma:  # rope parameters per layer type
            inv_freq, scale = _rope(hf, head_dim, "full_attention")
            sliding_rope = _rope(hf, head_dim, "sliding_attention")
        else:
            inv_freq, scale = _rope(hf, head_dim)
            sliding_rope = None
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
            rope_inv_freq=inv_freq,
            rope_scale=scale,
            gemma=gemma,
            attention_scale=hf.query_pre_attn_scalar**-0.5 if gemma else None,
            sliding_rope=sliding_rope,
        )


# what a cached to_json is valid for: this file (the fields and their translation from transformers' configs)
FORMAT = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:12]


def _rope(hf: PretrainedConfig, head_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """float32 inverse frequencies ``[head_dim // 2]`` and the cos/sin scale of the rope parameters (those of
    ``layer_type`` where they are given per layer type)."""
    rope = (hf.rope_parameters or {}) if layer_type is None else hf.rope_parameters[layer_type]
    rope_type = rope.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedArchitecture(f"unsupported rope type {rope_type!r}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedArchitecture("partial rotary embeddings are not supported")
    if rope_type == "default":
        inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"), **kwargs)
    return inv_freq.float(), float(scale)


def _check_gemma(hf: PretrainedConfig) -> None:
    """Refuse the Gemma 3 features the runtime does not implement (none of them in Gemma 3's own checkpoints)."""
    refused = {
        "final_logit_softcapping": hf.final_logit_softcapping is not None,
        "attn_logit_softcapping": hf.attn_logit_softcapping is not None,
        "use_bidirectional_attention": bool(hf.use_bidirectional_attention),
        "attention_bias": bool(hf.attention_bias),
        "sliding_window": hf.sliding_window is None,
    }
    for name, present in refused.items():
        if present:
            raise UnsupportedArchitecture(f"{GEMMA3} with {name}={getattr(hf, name)!r} is not supported")
    if hf.hidden_activation != "gelu_pytorch_tanh":
        raise UnsupportedArchitecture(f"unsupported activation {hf.hidden_activation!r} (gemma3: gelu_pytorch_tanh)")
    unknown = set(hf.layer_types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise UnsupportedArchitecture(f"unsupported layer types {sorted(unknown)}")


def _layer_windows(hf: PretrainedConfig) -> tuple[int | None, ...]:
    window = getattr(hf, "sliding_window", None)
    if hf.model_type in ("qwen2", GEMMA3):
        types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (window,) * hf.num_hidden_layers
