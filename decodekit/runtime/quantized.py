"""A GGUF file's weights as they are stored: its quantized blocks, read once and laid out for the CPU kernel.

``read_gguf_weights(path, cfg)`` maps the file's tensors onto the runtime's parameter names (q|k|v and gate|up
fused) and returns, per name, a :class:`~decodekit.runtime.cpu.QuantWeight` for a quantized matrix or a float32
tensor for everything else (norms, biases, float-typed matrices). The llama converter of llama.cpp stores the
rows of q and k permuted for its rotary layout; they are put back here, as transformers does when it de-quantizes.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from decodekit.errors import ModelFileError, UnsupportedArchitecture
from decodekit.runtime import cpu
from decodekit.runtime.config import ModelConfig
from decodekit.runtime.model import block_class

# GGML type name -> (elements, bytes) of one block
QUANT_TYPES = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q8_0": (32, 34),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
FLOAT_TYPES = {"F32": np.float32, "F16": np.float16}
Matrix = cpu.QuantWeight | list[cpu.QuantWeight] | torch.Tensor  # one weight, or row blocks of different forms
# the packed weights of a GGUF file, kept beside its conversion; the version names the kernel's layout (bump it
# when quant_pack's layout changes, and old files are simply not read)
PACKED_FILE = "gguf-packed-v1.safetensors"


def load_gguf_weights(path: Path, cfg: ModelConfig, cache: Path) -> dict[str, Matrix]:
    """:func:`read_gguf_weights`, kept packed in directory ``cache`` (the file's conversion) after the first read:
    later loads read that file (~0.1 s) instead of parsing and laying out the GGUF blocks again (~3.5 s)."""
    packed = cache / PACKED_FILE
    if packed.is_file():
        try:
            return _read_packed(packed)
        except Exception as err:  # a damaged cache file: read the GGUF again and rewrite it
            logging.getLogger("decodekit").warning("ignoring %s (%s); reading %s again", packed, err, path.name)
    weights = read_gguf_weights(path, cfg)
    try:
        _write_packed(weights, packed)
    except OSError as err:
        logging.getLogger("decodekit").warning("cannot keep the packed weights in %s: %s", packed, err.strerror)
    return weights


def _write_packed(weights: dict[str, Matrix], file: Path) -> None:
    """One safetensors file: each float tensor under its name, each quantized weight's tensors under
    ``name.i.qs|scales|mins``; the header's metadata says which is which (a weight met twice, as a tied
    embedding, is written once and named again)."""
    from safetensors.torch import save_file

    tensors, layout, seen = {}, {}, {}
    for name, value in weights.items():
        if id(value) in seen:
            layout[name] = {"same": seen[id(value)]}
            continue
        seen[id(value)] = name
        if isinstance(value, torch.Tensor):
            tensors[name], layout[name] = value.contiguous(), {"float": True}
            continue
        parts = value if isinstance(value, list) else [value]
        for i, part in enumerate(parts):
            for field in ("qs", "scales", "mins"):
                if getattr(part, field) is not None:
                    tensors[f"{name}.{i}.{field}"] = getattr(part, field)
        described = [{"kind": part.kind, "form": part.form, "n": part.n, "k": part.k} for part in parts]
        layout[name] = {"parts": described, "list": isinstance(value, list)}
    partial = file.with_name(file.name + ".partial")
    save_file(tensors, partial, metadata={"layout": json.dumps(layout)})
    os.replace(partial, file)


def _read_packed(file: Path) -> dict[str, Matrix]:
    from safetensors import safe_open

    weights: dict[str, Matrix] = {}
    with safe_open(file, framework="pt") as f:
        layout, keys = json.loads(f.metadata()["layout"]), set(f.keys())
        for name, entry in layout.items():
            if "same" in entry:
                weights[name] = weights[entry["same"]]
            elif "float" in entry:
                weights[name] = f.get_tensor(name)
            else:
                parts = [
                    cpu.QuantWeight(
                        part["kind"],
                        part["form"],
                        f.get_tensor(f"{name}.{i}.qs"),
                        f.get_tensor(f"{name}.{i}.scales"),
                        f.get_tensor(f"{name}.{i}.mins") if f"{name}.{i}.mins" in keys else None,
                        part["n"],
                        part["k"],
                    )
                    for i, part in enumerate(entry["parts"])
                ]
                weights[name] = parts if entry["list"] else parts[0]
    return weights


def read_gguf_weights(path: Path, cfg: ModelConfig) -> dict[str, Matrix]:
    """The runtime's parameters from GGUF file ``path`` (see the module docstring). Raises ModelFileError for a
    missing tensor or a damaged file, UnsupportedArchitecture for a tensor type the kernel does not run."""
    from gguf import GGUFReader

    try:
        tensors = {t.name: t for t in GGUFReader(path).tensors}
    except Exception as err:  # the gguf reader raises assorted errors on damaged files
        raise ModelFileError(f"cannot read GGUF file {path}: {err}") from None

    def matrix(names: list[str], permute: list[bool]) -> Matrix:
        """The tensors ``names`` stacked by rows into one matrix: one weight where they share a kernel form (or
        are all float), else the list of their weights (each form its own product, the outputs concatenated)."""
        parts = [_tensor(tensors, name, path, cfg if flip else None) for name, flip in zip(names, permute, strict=True)]
        floats = [isinstance(part, torch.Tensor) for part in parts]
        if all(floats):
            return torch.cat(parts)
        if any(floats):
            raise UnsupportedArchitecture(
                f"{path.name}: {', '.join(names)} mix float and quantized types; load this file with --dtype float32"
            )
        forms = [part.form for part in parts]
        if any(form != forms[0] for form in forms) or any(part.n % cpu.QUANT_PANEL for part in parts[:-1]):
            return parts
        return cpu.quant_cat(parts) if len(parts) > 1 else parts[0]

    def vector(name: str, permute: bool = False) -> torch.Tensor:
        values = _tensor(tensors, name, path, cfg if permute else None)
        if not isinstance(values, torch.Tensor):
            raise UnsupportedArchitecture(f"{path.name}: {name} is quantized; decodekit expects it in float")
        return values.reshape(-1)

    def norm(name: str) -> torch.Tensor:
        # llama.cpp stores Gemma's norm weights plus one: take it off as transformers does, so both paths agree
        return vector(name) - 1 if cfg.gemma else vector(name)

    llama = cfg.architecture == "llama"  # llama.cpp permutes q and k rows of llama models only
    out: dict[str, Matrix] = {
        "embed.weight": matrix(["token_embd.weight"], [False]),
        "norm.weight": norm("output_norm.weight"),
    }
    out["lm_head.weight"] = out["embed.weight"] if cfg.tie_embeddings else matrix(["output.weight"], [False])
    for i in range(cfg.layers):
        blk, ours = f"blk.{i}.", f"blocks.{i}."
        qkv = [blk + f"attn_{p}" for p in "qkv"]
        for name, (_, stored) in block_class(cfg).NORMS.items():
            out[f"{ours}{name}.weight"] = norm(f"{blk}{stored}.weight")
        out[ours + "wqkv.weight"] = matrix([name + ".weight" for name in qkv], [llama, llama, False])
        if cfg.qkv_bias:
            biases = [vector(name + ".bias", llama and name[-1] != "v") for name in qkv]
            out[ours + "wqkv.bias"] = torch.cat(biases)
        out[ours + "wo.weight"] = matrix([blk + "attn_output.weight"], [False])
        out[ours + "w_gate_up.weight"] = matrix([blk + "ffn_gate.weight", blk + "ffn_up.weight"], [False, False])
        out[ours + "w_down.weight"] = matrix([blk + "ffn_down.weight"], [False])
    return out


def _tensor(tensors: dict, name: str, path: Path, permute_for: ModelConfig | None) -> cpu.QuantWeight | torch.Tensor:
    """Tensor ``name`` of the file (float32 values, or a packed weight), its rows put back in the model's order when
    ``permute_for`` is given."""
    if name not in tensors:
        raise ModelFileError(f"{path.name} lacks tensor {name}")
    tensor = tensors[name]
    type_name = tensor.tensor_type.name
    shape = [int(s) for s in reversed(tensor.shape)]  # GGUF lists dimensions innermost first
    if type_name in FLOAT_TYPES:
        values = torch.from_numpy(np.asarray(tensor.data, dtype=FLOAT_TYPES[type_name]).astype(np.float32))
        values = values.reshape(shape)
        return values[_unpermute(shape[0], permute_for, name)] if permute_for is not None else values
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


def parse_blocks(raw: torch.Tensor, type_name: str, k: int) -> cpu.QuantWeight:
    """GGML blocks ``raw`` (uint8 ``[n, bytes of a row]``, one matrix row per row) of a type in QUANT_TYPES,
    packed for the kernel; their de-quantization is bitwise gguf-py's."""
    elements, size = QUANT_TYPES[type_name]
    n = raw.shape[0]
    blocks = raw.reshape(n, k // elements, size)
    half = lambda t: t.contiguous().view(torch.float16)  # noqa: E731  bytes -> float16 values
    nibbles = lambda t: torch.stack((t & 15, t >> 4), dim=-2)  # noqa: E731  [.., m] -> [.., 2 (low, high), m]
    if type_name in ("Q4_0", "Q4_1", "Q5_0", "Q8_0"):  # d (fp16), [m (fp16)], [high bits (32)], 16 or 32 bytes
        d = half(blocks[..., 0:2])[..., 0]
        if type_name == "Q8_0":
            return cpu.quant_pack("q8_0", blocks[..., 2:].contiguous().view(torch.int8).reshape(n, k), d)
        if type_name == "Q4_1":
            q = nibbles(blocks[..., 4:]).reshape(n, k)
            return cpu.quant_pack("q4_1", q, d, half(blocks[..., 2:4])[..., 0])
        if type_name == "Q4_0":
            return cpu.quant_pack("q4_0", nibbles(blocks[..., 2:]).reshape(n, k), d)
        high = _bits(blocks[..., 2:6]).reshape(n, -1, 32)  # bit j of the little-endian word: element j
        q = (nibbles(blocks[..., 6:]).reshape(n, -1, 32) | (high << 4)).to(torch.int8) - 16
        return cpu.quant_pack("q5_0", q.reshape(n, k), d)
    if type_name == "Q6_K":  # low 4 bits (128), high 2 bits (64), int8 scales (16), d (fp16)
        low = nibbles(blocks[..., :128].reshape(n, -1, 2, 64))  # [n, blocks, 2, 2 (low, high), 64]
        high = blocks[..., 128:192].reshape(n, -1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6]).view(4, 1).to(torch.uint8)
        q = (low.reshape(n, -1, 8, 32) | ((high & 3).reshape(n, -1, 8, 32) << 4)).to(torch.int8) - 32
        scales = half(blocks[..., 208:210]).float() * blocks[..., 192:208].contiguous().view(torch.int8).float()
        return cpu.quant_pack("q6_k", q.reshape(n, k), scales.reshape(n, -1))
    # Q4_K, Q5_K: d, dmin (fp16), 12 bytes of 6-bit sub-block scales and mins, [high bits (32)], low bits (128)
    d, dmin = half(blocks[..., 0:2]).float(), half(blocks[..., 2:4]).float()
    sc, m = _scale_min(blocks[..., 4:16])
    low = nibbles(blocks[..., -128:].reshape(n, -1, 4, 32))  # [n, blocks, 4, 2, 32]: sub-block 2j + h
    q = low.reshape(n, -1, 8, 32)
    kind = "q4_k"
    if type_name == "Q5_K":
        q = q | (_bits(blocks[..., 16:48]).transpose(-1, -2) << 4)  # sub-block i, element j: bit i of byte j
        kind = "q5_k"
    return cpu.quant_pack(kind, q.reshape(n, k), (d * sc).reshape(n, -1), (-(dmin * m)).reshape(n, -1))


def _bits(data: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., bytes]`` -> its bits, 0 or 1, ``[..., bytes, 8]``: bit i of byte j at ``[..., j, i]``."""
    return (data[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1


def _scale_min(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins of K-quant sub-blocks from their 12 packed bytes ``[..., 12]``, as float32."""
    d, m, md = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mins = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc.float(), mins.float()


def _unpermute(rows: int, cfg: ModelConfig, name: str) -> torch.Tensor:
    """The row order that undoes llama.cpp's q/k permutation for a matrix of ``rows`` rows: per head, its rows
    were stored as the interleave of the two rotary halves."""
    heads = cfg.heads if rows == cfg.heads * cfg.head_dim else cfg.kv_heads
    if rows != heads * cfg.head_dim:
        expected = f"{cfg.heads * cfg.head_dim} or {cfg.kv_heads * cfg.head_dim}"
        raise ModelFileError(f"tensor {name} has {rows} rows, expected {expected}")
    # stored row (h, j, half) holds model row (h, half, j): list the stored rows in model order
    return torch.arange(rows).view(heads, cfg.head_dim // 2, 2).transpose(1, 2).reshape(-1)
