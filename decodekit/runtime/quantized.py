"""A GGUF file's weights as they are stored: its quantized blocks, read once and laid out for the CPU kernel.

``read_gguf_weights(path, cfg)`` maps the file's tensors onto the runtime's parameter names (q|k|v and gate|up
fused) and returns, per name, a :class:`~decodekit.runtime.cpu.QuantWeight` for a quantized matrix or a float32
tensor for everything else (norms, biases, float-typed matrices). The llama converter of llama.cpp stores the
rows of q and k permuted for its rotary layout; they are put back here, as transformers does when it de-quantizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from decodekit.errors import ModelFileError, UnsupportedArchitecture
from decodekit.runtime import cpu
from decodekit.runtime.config import ModelConfig

# GGML type name -> (kernel kind, bytes per block of 32, byte offset of q in a block)
QUANT_TYPES = {"Q4_0": ("q4_0", 18, 2), "Q4_1": ("q4_1", 20, 4), "Q8_0": ("q8_0", 34, 2)}
FLOAT_TYPES = {"F32": np.float32, "F16": np.float16}


class Rows(NamedTuple):
    """One GGUF tensor: ``kind`` None and float32 ``values`` ``[n, k]`` (or ``[n]``), or a quantized kind with its
    integers ``values [n, k]``, ``scales`` and (q4_1) ``mins`` ``[n, k / 32]`` float16."""

    kind: str | None
    values: torch.Tensor
    scales: torch.Tensor | None = None
    mins: torch.Tensor | None = None


def read_gguf_weights(path: Path, cfg: ModelConfig) -> dict[str, cpu.QuantWeight | torch.Tensor]:
    """The runtime's parameters from GGUF file ``path`` (see the module docstring). Raises ModelFileError for a
    missing tensor or a damaged file, UnsupportedArchitecture for a tensor type the kernel does not run."""
    from gguf import GGUFReader

    try:
        tensors = {t.name: t for t in GGUFReader(path).tensors}
    except Exception as err:  # the gguf reader raises assorted errors on damaged files
        raise ModelFileError(f"cannot read GGUF file {path}: {err}") from None

    def matrix(names: list[str], permute: list[bool]) -> cpu.QuantWeight | torch.Tensor:
        """The tensors ``names`` stacked by rows into one matrix (all of one type)."""
        parts = [_rows(tensors, name, path, cfg if flip else None) for name, flip in zip(names, permute, strict=True)]
        kinds = {part.kind for part in parts}
        if len(kinds) > 1:
            raise UnsupportedArchitecture(
                f"{path.name}: {', '.join(names)} are stored in different types ({', '.join(sorted(map(str, kinds)))});"
                " decodekit fuses them and runs one type per matrix: load this file with --dtype float32"
            )
        values = torch.cat([part.values for part in parts])
        if parts[0].kind is None:
            return values
        scales = torch.cat([part.scales for part in parts])
        mins = None if parts[0].mins is None else torch.cat([part.mins for part in parts])
        return cpu.quant_pack(parts[0].kind, values, scales, mins)

    def vector(name: str, permute: bool = False) -> torch.Tensor:
        part = _rows(tensors, name, path, cfg if permute else None)
        if part.kind is not None:
            raise UnsupportedArchitecture(f"{path.name}: {name} is quantized; decodekit expects it in float")
        return part.values.reshape(-1)

    llama = cfg.architecture == "llama"  # llama.cpp permutes q and k rows of llama models only
    out: dict[str, cpu.QuantWeight | torch.Tensor] = {
        "embed.weight": matrix(["token_embd.weight"], [False]),
        "norm.weight": vector("output_norm.weight"),
    }
    out["lm_head.weight"] = out["embed.weight"] if cfg.tie_embeddings else matrix(["output.weight"], [False])
    for i in range(cfg.layers):
        blk, ours = f"blk.{i}.", f"blocks.{i}."
        qkv = [blk + f"attn_{p}" for p in "qkv"]
        out[ours + "attn_norm.weight"] = vector(blk + "attn_norm.weight")
        out[ours + "mlp_norm.weight"] = vector(blk + "ffn_norm.weight")
        out[ours + "wqkv.weight"] = matrix([name + ".weight" for name in qkv], [llama, llama, False])
        if cfg.qkv_bias:
            biases = [vector(name + ".bias", llama and name[-1] != "v") for name in qkv]
            out[ours + "wqkv.bias"] = torch.cat(biases)
        out[ours + "wo.weight"] = matrix([blk + "attn_output.weight"], [False])
        out[ours + "w_gate_up.weight"] = matrix([blk + "ffn_gate.weight", blk + "ffn_up.weight"], [False, False])
        out[ours + "w_down.weight"] = matrix([blk + "ffn_down.weight"], [False])
    return out


def _rows(tensors: dict, name: str, path: Path, permute_for: ModelConfig | None) -> Rows:
    """Tensor ``name`` of the file, its rows put back in the model's order when ``permute_for`` is given."""
    if name not in tensors:
        raise ModelFileError(f"{path.name} lacks tensor {name}")
    tensor = tensors[name]
    type_name = tensor.tensor_type.name
    shape = [int(s) for s in reversed(tensor.shape)]  # GGUF lists dimensions innermost first
    if type_name in FLOAT_TYPES:
        values = torch.from_numpy(np.asarray(tensor.data, dtype=FLOAT_TYPES[type_name]).astype(np.float32))
        values = values.reshape(shape)
        if permute_for is not None:
            values = values[_unpermute(shape[0], permute_for, name)]
        return Rows(None, values)
    if type_name not in QUANT_TYPES:
        supported = ", ".join([*QUANT_TYPES, *FLOAT_TYPES])
        raise UnsupportedArchitecture(
            f"{path.name}: tensor {name} is {type_name}; decodekit runs {supported} natively: load it with --dtype "
            "float32 (de-quantized) instead"
        )
    n, k = shape
    raw = torch.from_numpy(np.array(tensor.data, dtype=np.uint8)).reshape(n, -1)
    if permute_for is not None:
        raw = raw[_unpermute(n, permute_for, name)]
    return parse_blocks(raw, type_name, k)


def parse_blocks(raw: torch.Tensor, type_name: str, k: int) -> Rows:
    """GGML blocks ``raw`` (uint8 ``[n, k / 32 * block bytes]``, one matrix row per row) of a type in QUANT_TYPES
    as integers, scales and mins."""
    kind, block_bytes, offset = QUANT_TYPES[type_name]
    blocks = raw.reshape(raw.shape[0], k // cpu.QUANT_BLOCK, block_bytes)
    scales = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0]
    mins = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0] if kind == "q4_1" else None
    body = blocks[..., offset:]
    # q8_0: signed bytes; 4-bit kinds: byte j holds element j (low nibble) and element j + 16 (high nibble)
    q = body.contiguous().view(torch.int8) if kind == "q8_0" else torch.cat((body & 15, body >> 4), dim=-1)
    return Rows(kind, q.reshape(raw.shape[0], k), scales, mins)


def _unpermute(rows: int, cfg: ModelConfig, name: str) -> torch.Tensor:
    """The row order that undoes llama.cpp's q/k permutation for a matrix of ``rows`` rows: per head, its rows
    were stored as the interleave of the two rotary halves."""
    heads = cfg.heads if rows == cfg.heads * cfg.head_dim else cfg.kv_heads
    if rows != heads * cfg.head_dim:
        expected = f"{cfg.heads * cfg.head_dim} or {cfg.kv_heads * cfg.head_dim}"
        raise ModelFileError(f"tensor {name} has {rows} rows, expected {expected}")
    # stored row (h, j, half) holds model row (h, half, j): list the stored rows in model order
    return torch.arange(rows).view(heads, cfg.head_dim // 2, 2).transpose(1, 2).reshape(-1)
