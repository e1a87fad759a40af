"""The small-M kernel (decodekit.runtime.cpu.linear): agrees with F.linear, and each output row is bitwise
independent of the other rows, of M, of the thread count (plain decoding vs tree verification) and of the ISA
path (AVX2 or AVX-512) that computes it; bfloat16 weights compute exactly as their float32 widening, except on
the AVX-512 BF16 path (bf16 pair products) and the AMX path (the tile unit), whose rows are again independent of
everything but themselves."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from decodekit.runtime import cpu

needs_kernel = pytest.mark.skipif(not cpu.available(), reason="AVX2/FMA kernel unavailable here")
ISAS = ("avx2", "avx512") if cpu.available() and cpu.has_avx512() else ("avx2",)

MS = (1, 2, 3, 7, 8, 9, 24, 81, 130)
KS = (576, 1536, 13, 64)
NS = (1, 7, 576, 1728, 3000)


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("k", "n"), list(itertools.product(KS, NS)))
def test_matches_f_linear(k: int, n: int, isa: str) -> None:
    g = torch.Generator().manual_seed(k * 10_000 + n)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    packed = cpu.pack(w)
    for m in MS:
        x = torch.randn(m, k, generator=g)
        for bias in (None, b):
            y = cpu.linear(x, packed, bias, isa)
            assert y.shape == (m, n) and y.dtype == torch.float32
            # float32 sums of K unit-variance products (outputs ~ sqrt(K)): rounding error grows like sqrt(K)
            atol = 5e-6 * k**0.5
            torch.testing.assert_close(y.double(), reference(x, w, bias), rtol=1e-5, atol=atol)
            torch.testing.assert_close(y, F.linear(x, w, bias), rtol=1e-4, atol=2 * atol)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k", (576, 1536, 13))
@pytest.mark.parametrize("bias", (False, True))
def test_rows_are_bitwise_independent_of_the_batch(k: int, bias: bool, isa: str) -> None:
    g = torch.Generator().manual_seed(k)
    n = 1000  # not a multiple of the 16-row panel: the last panel is partial
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    packed = cpu.pack(w)
    big = torch.randn(130, k, generator=g)
    singles = [cpu.linear(big[i : i + 1], packed, b, isa)[0] for i in range(big.shape[0])]
    for m in (1, 2, 5, 6, 7, 12, 13, 16, 24, 25, 81, 130):
        y = cpu.linear(big[:m], packed, b, isa)
        for i in range(m):
            assert torch.equal(y[i], singles[i]), (m, i)
    # the same row among different neighbours, at a different position
    other = torch.randn(24, k, generator=g)
    other[17] = big[3]
    assert torch.equal(cpu.linear(other, packed, b, isa)[17], singles[3])
    # prepacked and pack-on-the-fly are the same kernel
    assert torch.equal(cpu.linear(big[:9], w, b), cpu.linear(big[:9], packed, b))


@pytest.mark.skipif(len(ISAS) < 2, reason="this CPU has no AVX-512")
@pytest.mark.parametrize("n", (1, 16, 40, 1000))  # one panel, two, a pair and a half, many with a partial last
def test_avx2_and_avx512_give_the_same_bits(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    w, b = torch.randn(n, 576, generator=g), torch.randn(n, generator=g)
    packed = cpu.pack(w)
    for m in (1, 2, 11, 12, 13, 30):
        x = torch.randn(m, 576, generator=g)
        for bias in (None, b):
            assert torch.equal(cpu.linear(x, packed, bias, "avx2"), cpu.linear(x, packed, bias, "avx512"))


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("k", "n"), [(576, 1000), (1536, 576), (13, 7)])
def test_bfloat16_weights_compute_as_their_float32_widening(k: int, n: int, isa: str) -> None:
    """bf16 -> float32 is exact, so a bf16 weight gives bitwise the float32 kernel's sums on its widened copy;
    with bf16 x the result is those sums rounded to bf16 once (after the bias)."""
    g = torch.Generator().manual_seed(k + n)
    w, b = torch.randn(n, k, generator=g).bfloat16(), torch.randn(n, generator=g).bfloat16()
    packed, widened = cpu.pack(w, amx=False), cpu.pack(w.float())
    assert packed.data.dtype == torch.bfloat16
    for m in (1, 5, 12, 13, 30):
        x = torch.randn(m, k, generator=g).bfloat16()
        for bias in (None, b):
            wide_bias = None if bias is None else bias.float()
            exact = cpu.linear(x.float(), widened, wide_bias, isa)
            assert torch.equal(cpu.linear(x.float(), packed, bias, isa), exact)
            assert torch.equal(cpu.linear(x.float(), w, bias), exact)  # a raw weight, packed as float32 x reads it
            y = cpu.linear(x, packed, bias, isa)
            assert y.dtype == torch.bfloat16 and torch.equal(y, exact.bfloat16())
            singles = torch.cat([cpu.linear(x[i : i + 1], packed, bias, isa) for i in range(m)])
            assert torch.equal(y, singles)  # rows independent of the batch, as in float32


@pytest.mark.skipif(len(ISAS) < 2, reason="this CPU has no AVX-512")
def test_bfloat16_weights_give_the_same_bits_on_avx2_and_avx512() -> None:
    g = torch.Generator().manual_seed(11)
    packed = cpu.pack(torch.randn(40, 576, generator=g).bfloat16(), amx=False)
    x = torch.randn(13, 576, generator=g).bfloat16()
    assert torch.equal(cpu.linear(x, packed, isa="avx2"), cpu.linear(x, packed, isa="avx512"))


needs_bf16_products = pytest.mark.skipif(
    not (cpu.available() and cpu.has_avx512_bf16()), reason="this CPU has no AVX-512 BF16"
)


@needs_bf16_products
@pytest.mark.parametrize(("k", "n"), [(576, 1000), (1536, 576), (13, 7), (577, 40)])
def test_bfloat16_pair_products_rows_are_independent_of_the_batch(k: int, n: int) -> None:
    """bf16 x and weights multiply as bf16 pairs (an odd K pads its last pair with zeros): close to the exact
    product, each row bitwise the same alone or among any others, and what "auto" picks."""
    g = torch.Generator().manual_seed(k * 7 + n)
    w, b = torch.randn(n, k, generator=g).bfloat16(), torch.randn(n, generator=g).bfloat16()
    packed = cpu.pack(w, amx=False)
    big = torch.randn(130, k, generator=g).bfloat16()
    for bias in (None, b):
        singles = torch.cat([cpu.linear(big[i : i + 1], packed, bias, "avx512_bf16") for i in range(130)])
        exact = reference(big.double(), w, bias)
        assert singles.dtype == torch.bfloat16
        # float32 sums (error ~ sqrt(K) ulps of float32), then one rounding to bf16 (2^-8 of the value)
        torch.testing.assert_close(singles.double(), exact, rtol=2**-8, atol=1e-4 * k**0.5)
        for m in (1, 2, 11, 12, 13, 16, 25, 130):
            y = cpu.linear(big[:m], packed, bias, "avx512_bf16")
            assert torch.equal(y, singles[:m]), m
        assert torch.equal(cpu.linear(big[:9], packed, bias), singles[:9])  # "auto" on this layout


needs_amx = pytest.mark.skipif(not (cpu.available() and cpu.has_amx()), reason="this CPU has no AMX")


@needs_amx
@pytest.mark.parametrize(("k", "n"), [(576, 1000), (1536, 576), (13, 7), (577, 40), (31, 33)])
def test_amx_rows_are_independent_of_the_batch(k: int, n: int) -> None:
    """On the tile unit (K padded to 32-wide chunks, rows to 16-row tiles, N to 32-column panel pairs): close to
    the exact product, each row bitwise the same alone or among any others, and what "auto" picks for a weight
    packed by default on this CPU."""
    g = torch.Generator().manual_seed(k * 5 + n)
    w, b = torch.randn(n, k, generator=g).bfloat16(), torch.randn(n, generator=g).bfloat16()
    packed = cpu.pack(w)
    assert packed.data.dim() == 4  # the default layout here
    big = torch.randn(130, k, generator=g).bfloat16()
    for bias in (None, b):
        singles = torch.cat([cpu.linear(big[i : i + 1], packed, bias, "amx") for i in range(130)])
        assert singles.dtype == torch.bfloat16
        torch.testing.assert_close(singles.double(), reference(big.double(), w, bias), rtol=2**-8, atol=1e-4 * k**0.5)
        for m in (1, 2, 15, 16, 17, 31, 33, 130):
            assert torch.equal(cpu.linear(big[:m], packed, bias, "amx"), singles[:m]), m
        other = torch.randn(20, k, generator=g).bfloat16()
        other[17] = big[3]
        assert torch.equal(cpu.linear(other, packed, bias)[17], singles[3])  # "auto"


@needs_amx
def test_amx_layout_is_read_by_the_amx_path_only() -> None:
    w = torch.randn(40, 64).bfloat16()
    with pytest.raises(ValueError, match="does not read this layout"):
        cpu.linear(torch.randn(2, 64).bfloat16(), cpu.pack(w, amx=True), isa="avx512_bf16")
    with pytest.raises(ValueError, match="does not read this layout"):
        cpu.linear(torch.randn(2, 64).bfloat16(), cpu.pack(w, amx=False), isa="amx")
    with pytest.raises(ValueError, match="needs bfloat16 x"):
        cpu.linear(torch.randn(2, 64), cpu.pack(w, amx=True))
    with pytest.raises(ValueError, match="AMX layout needs a bfloat16 weight"):
        cpu.pack(w.float(), amx=True)


@needs_kernel
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_rows_do_not_depend_on_the_thread_count(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(3072, 576, generator=g).to(dtype)
    x = torch.randn(24, 576, generator=g).to(dtype)
    packed = cpu.pack(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.linear(x, packed)
        torch.set_num_threads(max(2, threads))
        many = cpu.linear(x, packed)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@needs_kernel
def test_leading_dims_and_edge_shapes() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 24, generator=g)
    b = torch.randn(40, generator=g)
    x = torch.randn(2, 3, 24, generator=g)
    y = cpu.linear(x, cpu.pack(w), b)
    assert y.shape == (2, 3, 40)
    assert torch.equal(y.reshape(6, 40), cpu.linear(x.reshape(6, 24), w, b))
    assert cpu.linear(torch.empty(0, 24), w).shape == (0, 40)
    # non-contiguous x is accepted (copied)
    xt = torch.randn(24, 5, generator=g).t()
    assert torch.equal(cpu.linear(xt, w), cpu.linear(xt.contiguous(), w))


@needs_kernel
def test_rejects_other_dtypes() -> None:
    w = torch.randn(16, 8)
    with pytest.raises(ValueError):
        cpu.linear(torch.randn(2, 8, dtype=torch.float64), w)
    with pytest.raises(ValueError):
        cpu.pack(w.half())
    with pytest.raises(ValueError):  # bf16 x needs a bf16 weight
        cpu.linear(torch.randn(2, 8).bfloat16(), w)
    with pytest.raises(ValueError):
        cpu.linear(torch.randn(2, 9), w)
    with pytest.raises(ValueError):
        cpu.linear(torch.randn(2, 8), w, isa="sse")
    if cpu.has_avx512_bf16():
        with pytest.raises(ValueError, match="bfloat16 x and weights"):
            cpu.linear(torch.randn(2, 8), w, isa="avx512_bf16")


def test_unavailable_without_avx2(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(cpu, "_state", None)
    monkeypatch.setattr(cpu, "cpu_supported", lambda: False)
    with caplog.at_level(logging.WARNING, logger=cpu.__name__):
        assert cpu.available() is False
        assert cpu.available() is False
    assert len(caplog.records) == 1
    with pytest.raises(RuntimeError):
        cpu.pack(torch.randn(4, 4))


def test_unavailable_when_the_build_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    bad = tmp_path / "broken.cpp"
    bad.write_text('#error "does not compile"\n')
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(cpu, "_state", None)
    monkeypatch.setattr(cpu, "cpu_supported", lambda: True)
    monkeypatch.setattr(cpu, "SOURCES", [bad])
    monkeypatch.setattr(cpu, "NAME", "decodekit_cpu_broken_test")
    with caplog.at_level(logging.WARNING, logger=cpu.__name__):
        assert cpu.available() is False
    compiling, unavailable = caplog.messages
    assert compiling.startswith("compiling") and "unavailable (RuntimeError: " in unavailable
    assert 'error: #error "does not compile"' in unavailable  # the compiler's own line


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """torch waits forever on a build directory's `lock` file; one left by a killed process is cleared first."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(cpu, "_state", None)
    monkeypatch.setattr(cpu, "cpu_supported", lambda: True)
    stale = cpu.build_directory() / "lock"
    stale.touch()
    seen = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: seen.append(stale.exists()))
    cpu.available()
    assert seen == [False]
