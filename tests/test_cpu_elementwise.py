"""The fused elementwise kernels (cpu.rms_norm, cpu.rope_, cpu.silu_mul, and Gemma's: rms_norm with a unit offset,
rms_norm_heads_, gelu_tanh_mul): agree with the model's torch code, and each row is bitwise independent of the other
rows and of their number, in float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from decodekit.runtime import cpu
from decodekit.runtime.model import GemmaRMSNorm, RMSNorm, rotate

pytestmark = pytest.mark.skipif(not cpu.available(), reason="AVX2/FMA kernels unavailable here")
DTYPES = (torch.float32, torch.bfloat16)
# one bfloat16 rounding of the result (2^-8 relative) where torch rounds at other points
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2**-7, "atol": 2**-7}}


def rows_alone(op, x: torch.Tensor) -> torch.Tensor:
    """op applied to each row of x [R, ...] on its own, stacked."""
    return torch.cat([op(x[i : i + 1]) for i in range(x.shape[0])])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", (576, 13))  # 13: the sum of squares' scalar tail
def test_rms_norm_matches_the_reference_and_rows_are_independent(dtype: torch.dtype, dim: int) -> None:
    g = torch.Generator().manual_seed(dim)
    norm = RMSNorm(dim, 1e-5)
    norm.weight.data = torch.randn(dim, generator=g)
    norm = norm.to(dtype)
    x = (3 * torch.randn(24, dim, generator=g)).to(dtype)
    with torch.inference_mode():
        reference = norm(x)
        fused = cpu.rms_norm(x, norm.weight, norm.eps)
    assert fused.dtype == dtype and fused.shape == x.shape
    torch.testing.assert_close(fused.float(), reference.float(), **TOLERANCE[dtype])
    assert torch.equal(rows_alone(lambda r: cpu.rms_norm(r, norm.weight, norm.eps), x), fused)
    assert torch.equal(cpu.rms_norm(x.view(4, 6, dim), norm.weight, norm.eps).view(24, dim), fused)
    assert torch.equal(cpu.rms_norm(x.t().contiguous().t(), norm.weight, norm.eps), fused)  # strided x is copied


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", (640, 13))
def test_gemma_rms_norm_matches_its_reference_and_rows_are_independent(dtype: torch.dtype, dim: int) -> None:
    """Gemma's ``x / rms * (1 + weight)``, all in float32 and rounded once; and in place on some heads of a row."""
    g = torch.Generator().manual_seed(dim)
    norm = GemmaRMSNorm(dim, 1e-6)
    norm.weight.data = torch.randn(dim, generator=g)
    norm = norm.to(dtype)
    x = (3 * torch.randn(24, dim, generator=g)).to(dtype)
    with torch.inference_mode():
        reference = norm(x)
        fused = cpu.rms_norm(x, norm.weight, norm.eps, unit_offset=True)
    assert fused.dtype == dtype
    torch.testing.assert_close(fused.float(), reference.float(), **TOLERANCE[dtype])
    assert torch.equal(rows_alone(lambda r: cpu.rms_norm(r, norm.weight, norm.eps, unit_offset=True), x), fused)
    heads = x.view(2, 3, 4, dim).clone()  # [B, n, heads, d]: heads 1 and 2 normed in place, the others kept
    cpu.rms_norm_heads_(heads, norm.weight, norm.eps, 1, 2, unit_offset=True)
    assert torch.equal(heads[:, :, 1:3], fused.view(2, 3, 4, dim)[:, :, 1:3])
    assert torch.equal(heads[:, :, [0, 3]], x.view(2, 3, 4, dim)[:, :, [0, 3]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_rotates_the_first_heads_in_place(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(2, 5, 15, 64, generator=g).to(dtype)
    cos, sin = (torch.randn(2, 5, 1, 64, generator=g).to(dtype) for _ in range(2))
    reference = rotate(qkv[:, :, :12], cos, sin)
    rotated = qkv.clone()
    cpu.rope_(rotated, cos, sin, 12)
    assert torch.equal(rotated[:, :, 12:], qkv[:, :, 12:])  # the value heads are left alone
    if dtype == torch.float32:  # products, then their sum: torch's mul, mul, add exactly
        assert torch.equal(rotated[:, :, :12], reference)
    else:  # one rounding instead of three
        torch.testing.assert_close(rotated[:, :, :12].float(), reference.float(), rtol=2**-6, atol=2**-6)
    alone = qkv[1:2, 3:4].clone()
    cpu.rope_(alone, cos[1:2, 3:4], sin[1:2, 3:4], 12)
    assert torch.equal(alone[0, 0], rotated[1, 3])


GATED = {  # a gated activation's kernel and its torch reference on (gate, up), at its model's inner size
    "silu_mul": (cpu.silu_mul, lambda gate, up: F.silu(gate) * up, 1536),
    "gelu_tanh_mul": (cpu.gelu_tanh_mul, lambda gate, up: F.gelu(gate, approximate="tanh") * up, 2048),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(GATED))
@pytest.mark.parametrize("small", (False, True))  # 13: a partial last vector of 8
def test_gated_activation_matches_torch_and_rows_are_independent(dtype: torch.dtype, name: str, small: bool) -> None:
    op, reference, inner = GATED[name]
    inner = 13 if small else inner
    g = torch.Generator().manual_seed(inner)
    gate_up = (4 * torch.randn(9, 2 * inner, generator=g)).to(dtype)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # saturated and zero gates
    fused = op(gate_up)
    assert fused.dtype == dtype and fused.shape == (9, inner)
    torch.testing.assert_close(fused.float(), reference(*gate_up.chunk(2, dim=-1)).float(), **TOLERANCE[dtype])
    assert torch.equal(rows_alone(op, gate_up), fused)
    assert torch.equal(op(gate_up.view(3, 3, 2 * inner)).view(9, inner), fused)


def test_bad_shapes_raise() -> None:
    with pytest.raises(RuntimeError):
        cpu.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError):
        cpu.rope_(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 8), torch.randn(1, 2, 8), 4)  # more heads than x has
    with pytest.raises(RuntimeError):
        cpu.silu_mul(torch.randn(2, 7))
    with pytest.raises(RuntimeError):
        cpu.gelu_tanh_mul(torch.randn(2, 7))
    with pytest.raises(RuntimeError):  # heads past the last
        cpu.rms_norm_heads_(torch.randn(1, 2, 3, 8), torch.ones(8), 1e-6, 2, 2)
