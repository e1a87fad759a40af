"""GGUF-quantized weights: read as stored, de-quantized exactly as gguf-py does, multiplied by a kernel whose rows do
not depend on each other, and loaded from a GGUF file (errors named)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from decodekit import ModelFileError, UnsupportedArchitecture
from decodekit.runtime import cpu
from decodekit.runtime.config import ModelConfig
from decodekit.runtime.model import Linear
from decodekit.runtime.quantized import PACKED_FILE, QUANT_TYPES, load_gguf_weights, parse_blocks, read_gguf_weights

needs_kernels = pytest.mark.skipif(not cpu.available(), reason="the quantized kernel needs the CPU kernels")


QUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q8_0")  # gguf-py quantizes these; the K-quants get random blocks


def quantized(type_name: str, n: int, k: int, seed: int = 0) -> tuple[cpu.QuantWeight, np.ndarray]:
    """A random [n, k] matrix of GGML type ``type_name``: our packed weight, and its raw blocks."""
    rng = np.random.default_rng(seed)
    qtype = GGMLQuantizationType[type_name]
    if type_name in QUANTIZABLE:
        values = rng.standard_normal((n, k)).astype(np.float32)
        values[0, :32] = 0.0  # an all-zero block: scale 0
        raw = quantize(values, qtype)
    else:  # random bits, with sane float16 super-block scales (d, and dmin where there is one)
        elements, size = QUANT_TYPES[type_name]
        raw = rng.integers(0, 256, (n, k // elements, size), dtype=np.uint8)
        scales = (rng.random((n, k // elements, 2)) * 0.01).astype(np.float16).view(np.uint8)
        if type_name == "Q6_K":
            raw[..., 208:210] = scales[..., 0:2]
        else:
            raw[..., 0:4] = scales.reshape(n, k // elements, 4)
        raw = raw.reshape(n, -1)
    return parse_blocks(torch.from_numpy(raw.copy()), type_name, k), raw


@pytest.mark.parametrize("type_name", list(QUANT_TYPES))
def test_dequantization_is_gguf_py_bit_for_bit(type_name):
    weight, raw = quantized(type_name, 40, 512)  # 40 rows: the last panel half full
    expected = torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]))
    assert torch.equal(cpu.dequantize(weight), expected)
    rows = torch.tensor([39, 0, 17, 17])
    assert torch.equal(cpu.dequantize(weight, rows), expected[rows])


def activations(m: int, k: int) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    x[0] *= 1e3  # rows of very different scales
    if m > 2:
        x[1] = 0.0  # and a zero row
    return x


@needs_kernels
@pytest.mark.parametrize("type_name", list(QUANT_TYPES))
def test_a_row_is_computed_as_if_alone(type_name):
    weight, _ = quantized(type_name, 40, 256)
    bias = torch.randn(40)
    x = activations(37, 256)
    together = cpu.quant_linear(x, weight, bias)
    alone = torch.cat([cpu.quant_linear(x[i : i + 1], weight, bias) for i in range(len(x))])
    assert torch.equal(together, alone)
    assert torch.equal(cpu.quant_linear(x[5:9], weight, bias), together[5:9])
    assert cpu.quant_linear(x[:0], weight).shape == (0, 40)


@needs_kernels
@pytest.mark.parametrize("type_name", list(QUANT_TYPES))
def test_every_isa_gives_the_same_bits(type_name):
    if not cpu.has_avx512_vnni():
        pytest.skip("this CPU has only the AVX2 path")
    weight, _ = quantized(type_name, 48, 256)
    x = activations(9, 256)
    assert torch.equal(cpu.quant_linear(x, weight, isa="avx2"), cpu.quant_linear(x, weight, isa="avx512_vnni"))


@needs_kernels
@pytest.mark.parametrize("type_name", list(QUANT_TYPES))
def test_error_stays_within_the_stated_bound(type_name):
    """|y - x @ w.T| <= sum over blocks of d_x / 2 * sum |w| (x rounded to 8 bits per block of 32), plus float
    rounding."""
    weight, _ = quantized(type_name, 64, 256, seed=1)
    w = cpu.dequantize(weight).double()
    x = activations(7, 256)
    exact = x.double() @ w.T
    d_x = x.abs().view(7, -1, 32).amax(-1).double() / 127  # [m, blocks]
    bound = torch.einsum("mb,nb->mn", d_x / 2, w.abs().view(64, -1, 32).sum(-1))
    error = (cpu.quant_linear(x, weight).double() - exact).abs()
    assert (error <= bound + 1e-5 * (x.double().abs() @ w.abs().T) + 1e-6).all()
    assert error.max() > 0  # x really was quantized: this is not the float product


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        cpu.quant_pack("q5_1", torch.zeros(16, 32, dtype=torch.uint8), torch.zeros(16, 1))
    with pytest.raises(ValueError, match="multiple of 32"):
        cpu.quant_pack("q8_0", torch.zeros(16, 40, dtype=torch.int8), torch.zeros(16, 1))
    with pytest.raises(ValueError, match="mins for q4_1, q4_k and q5_k only"):
        cpu.quant_pack("q4_1", torch.zeros(16, 32, dtype=torch.uint8), torch.zeros(16, 1))


# ---- reading a GGUF file ----------------------------------------------------------------------------------------

HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 64, 96, 40, 2, 1, 32


def tiny_config() -> ModelConfig:
    return ModelConfig(
        architecture="llama",
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        layers=1,
        heads=HEADS,
        kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        norm_eps=1e-5,
        qkv_bias=False,
        tie_embeddings=True,
        context_window=64,
        layer_windows=(None,),
        rope_inv_freq=torch.ones(HEAD_DIM // 2),
        rope_scale=1.0,
    )


def write_gguf(path, types: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """A one-layer llama GGUF (tensors only) with q and k rows permuted as llama.cpp's converter stores them;
    returns the float weights in the model's row order. ``types``: tensor name -> GGML type (default Q4_1, and
    Q8_0 for the embedding)."""
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (VOCAB, HIDDEN),
        "blk.0.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
        "blk.0.ffn_gate.weight": (INTERMEDIATE, HIDDEN),
        "blk.0.ffn_up.weight": (INTERMEDIATE, HIDDEN),
        "blk.0.ffn_down.weight": (HIDDEN, INTERMEDIATE),
    }
    types = {"token_embd.weight": "Q8_0"} | (types or {})
    writer = GGUFWriter(str(path), "llama")
    weights = {}
    for name, shape in shapes.items():
        weights[name] = rng.standard_normal(shape).astype(np.float32)
        stored = weights[name]
        if name.endswith(("attn_q.weight", "attn_k.weight")):  # llama.cpp's permutation of the rotary halves
            heads = shape[0] // HEAD_DIM
            stored = stored.reshape(heads, 2, HEAD_DIM // 2, -1).swapaxes(1, 2).reshape(shape)
        qtype = GGMLQuantizationType[types.get(name, "Q4_1")]
        writer.add_tensor(name, quantize(stored, qtype), raw_dtype=qtype)
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
        weights[name] = rng.standard_normal(HIDDEN).astype(np.float32)
        writer.add_tensor(name, weights[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def test_a_gguf_file_is_read_into_the_runtime_layout(tmp_path):
    path = tmp_path / "tiny.gguf"
    written = write_gguf(path)
    weights = read_gguf_weights(path, tiny_config())
    assert weights["lm_head.weight"] is weights["embed.weight"]  # tied: one table
    assert {w.kind for w in weights.values() if isinstance(w, cpu.QuantWeight)} == {"q4_1", "q8_0"}
    qkv = cpu.dequantize(weights["blocks.0.wqkv.weight"])
    reference = np.concatenate([written[f"blk.0.attn_{p}.weight"] for p in "qkv"])
    # de-quantized rows are close to the written ones only if the permutation was undone
    assert torch.allclose(qkv, torch.from_numpy(reference), atol=0.5)
    assert torch.equal(weights["blocks.0.mlp_norm.weight"], torch.from_numpy(written["blk.0.ffn_norm.weight"]))


def test_an_unsupported_type_is_named(tmp_path):
    path = tmp_path / "q5.gguf"
    write_gguf(path, {"blk.0.ffn_down.weight": "Q5_1"})
    with pytest.raises(UnsupportedArchitecture, match=r"blk\.0\.ffn_down\.weight is Q5_1.*--dtype float32"):
        read_gguf_weights(path, tiny_config())


def test_fused_parts_share_a_form_or_stay_apart(tmp_path):
    """q|k|v of one kernel form (Q5_0 is stored as Q8_0) become one weight; of different forms, a list whose
    products are concatenated."""
    path = tmp_path / "fused.gguf"
    write_gguf(path, {"blk.0.attn_q.weight": "Q5_0", "blk.0.attn_k.weight": "Q5_0", "blk.0.attn_v.weight": "Q8_0"})
    fused = read_gguf_weights(path, tiny_config())["blocks.0.wqkv.weight"]
    assert fused.kind == "q5_0+q8_0" and fused.n == (HEADS + 2 * KV_HEADS) * HEAD_DIM
    path = tmp_path / "mixed.gguf"
    write_gguf(path, {"blk.0.attn_v.weight": "Q8_0"})  # q and k Q4_1
    parts = read_gguf_weights(path, tiny_config())["blocks.0.wqkv.weight"]
    assert [part.kind for part in parts] == ["q4_1", "q4_1", "q8_0"]
    if cpu.available():
        layer = Linear(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM, bias=False)
        layer.quantized(parts)
        x = torch.randn(3, HIDDEN)
        expected = torch.cat([cpu.quant_linear(x, part) for part in parts], dim=-1)
        assert torch.equal(layer(x), expected)


def test_a_truncated_or_incomplete_file_is_a_model_file_error(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="cannot read GGUF file"):
        read_gguf_weights(truncated, tiny_config())
    with pytest.raises(ModelFileError, match=r"lacks tensor blk\.1\.attn_norm\.weight"):
        read_gguf_weights(path, tiny_config().__class__(**{**tiny_config().__dict__, "layers": 2}))


@pytest.mark.slow
def test_the_default_files_weights_equal_transformers_conversion(default_model):
    """Every tensor of the default GGUF, read natively and de-quantized, is bitwise the float32 checkpoint that
    transformers converted from the same file (so the q/k row order and every scale are right)."""
    from decodekit.runtime.loader import _fuse_weights, _read_safetensors

    native = read_gguf_weights(default_model.source, default_model.cfg)
    converted = _fuse_weights(_read_safetensors(default_model.path), default_model.cfg)
    assert native.keys() == converted.keys()
    for name, weight in native.items():
        values = cpu.dequantize(weight) if isinstance(weight, cpu.QuantWeight) else weight
        assert torch.equal(values.reshape(converted[name].shape), converted[name]), name


def test_packed_weights_are_kept_and_read_back(tmp_path, caplog):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, {"blk.0.attn_v.weight": "Q8_0"})  # q|k|v a list of two forms
    cache = tmp_path / "cache"
    cache.mkdir()
    first = load_gguf_weights(path, tiny_config(), cache)
    assert (cache / PACKED_FILE).is_file()
    again = load_gguf_weights(path, tiny_config(), cache)
    assert again["lm_head.weight"] is again["embed.weight"]
    assert first.keys() == again.keys()
    for name, value in first.items():
        parts = value if isinstance(value, list) else [value]
        kept = again[name] if isinstance(again[name], list) else [again[name]]
        assert type(value) is type(again[name]), name
        for a, b in zip(parts, kept, strict=True):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), name
            else:
                assert (a.kind, a.form, a.n, a.k) == (b.kind, b.form, b.n, b.k), name
                assert torch.equal(cpu.dequantize(a), cpu.dequantize(b)), name
    (cache / PACKED_FILE).write_bytes(b"not safetensors")
    assert load_gguf_weights(path, tiny_config(), cache).keys() == first.keys()
    assert "ignoring" in caplog.text
    assert load_gguf_weights(path, tiny_config(), cache)["blocks.0.wqkv.weight"][2].kind == "q8_0"  # rewritten
