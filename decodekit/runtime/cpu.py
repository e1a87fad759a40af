"""Small-M float32 linear layers for CPU decoding: an AVX2 + FMA kernel, AVX-512 where the CPU has it
(``kernels/small_gemm.cpp``).

A decode step multiplies a few rows of activations (1 for plain decoding, 8-81 for a draft tree) by every
weight matrix, and the weights are cold in memory. The kernel streams each weight once, at close to memory
bandwidth, and does all the rows while a piece of it is in cache. It needs the weight in its own layout:
``pack(w)`` once (at load time, like oneDNN's reorder), then ``linear(x, packed)`` per call::

    packed = fastlinear.pack(layer.weight)        # PackedWeight, same memory as the weight (+ padding)
    y = fastlinear.linear(x, packed, layer.bias)  # x [..., K] -> y [..., N], float32

Exactness invariant: each output ``y[m, n]`` is ``fma``-accumulated over ``k = 0 .. K-1`` in order, in one
float32 accumulator, then ``+ bias[n]``, whatever the number of rows, the other rows of ``x``, the thread count
or how the work is split. So ``linear(x, w)[i]`` is bitwise equal to ``linear(x[i:i+1], w)[0]``: decoding one
token and verifying it in a tree give identical floats, and the AVX2 and AVX-512 paths give the same floats too.
(The result is not bitwise equal to
``torch.nn.functional.linear``, which sums in another order; it agrees to float32 rounding.)

The extension is compiled on first use (``available()``), into torch's extension cache
(``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``); later processes load the cached build. On a CPU
without AVX2/FMA, or if the build fails, ``available()`` is False (with one logged warning) and callers keep
their default path. Inference only: the op has no autograd formula.
"""

from __future__ import annotations

import logging
import platform
import threading
from pathlib import Path
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "small_gemm.cpp"
NAME = "decodekit_small_gemm"  # the extension's name and its op namespace (torch.ops.decodekit_small_gemm)
# -mavx2 -mfma rather than -march=native: the build may be cached and reused on another machine of the fleet;
# the AVX-512 path is compiled for that ISA by a function attribute and taken only where the CPU has it.
# -fopenmp: at::parallel_for is inlined from ATen's headers and runs on one thread without it (the OpenMP
# runtime itself comes from torch's own libgomp, already loaded).
CFLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"]

_lock = threading.Lock()
_state: bool | None = None  # None: not tried yet


class PackedWeight(NamedTuple):
    """A weight ``w [n, k]`` in the kernel's layout: ``data [ceil(n / 16), k, 16]``, ``data[p, j, i] = w[16p + i, j]``
    (rows past ``n`` are zero)."""

    data: torch.Tensor
    n: int
    k: int


def cpu_supported() -> bool:
    """True if this CPU has AVX2 and FMA (x86-64 only)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return "avx2" in flags and "fma" in flags
    except OSError:
        pass
    # no /proc/cpuinfo: trust what ATen dispatches to (AVX2 implies FMA on every CPU that has both)
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    except (AttributeError, RuntimeError):
        return False


def available() -> bool:
    """True if the kernel can be used here: compiles (or loads the cached build) on the first call.

    False, without raising, on a CPU without AVX2/FMA or when the build fails (one warning is logged).
    """
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _load()
    return _state


def _load() -> bool:
    if not cpu_supported():
        log.warning("decodekit.fastlinear: this CPU lacks AVX2/FMA; the small-M kernel is disabled")
        return False
    try:
        from torch.utils.cpp_extension import load

        load(name=NAME, sources=[str(SOURCE)], extra_cflags=CFLAGS, is_python_module=False, verbose=False)
        getattr(torch.ops, NAME).linear  # noqa: B018 (raises if the library did not register its ops)
    except Exception as e:  # no compiler, no ninja, a compile error, ...: fall back
        log.warning(
            "decodekit.fastlinear: could not build the small-M kernel (%s: %s); it is disabled",
            type(e).__name__,
            str(e).strip().splitlines()[-1] if str(e).strip() else "",
        )
        return False
    return True


def _ops():  # the torch.ops namespace of the extension
    if not available():
        raise RuntimeError("decodekit.fastlinear: the small-M kernel is not available on this machine")
    return getattr(torch.ops, NAME)


def pack(w: torch.Tensor) -> PackedWeight:
    """Pack a float32 CPU weight ``w [N, K]`` (``nn.Linear.weight`` layout) for ``linear``."""
    if w.dim() != 2 or w.dtype != torch.float32 or w.device.type != "cpu":
        raise ValueError(
            f"fastlinear.pack: need a float32 CPU [N, K] weight, got {w.dtype} {tuple(w.shape)} on {w.device}"
        )
    return PackedWeight(_ops().pack(w.detach()), w.shape[0], w.shape[1])


def has_avx512() -> bool:
    """True if the kernel takes its AVX-512 path on this CPU."""
    return bool(_ops().has_avx512())


def linear(
    x: torch.Tensor, w: PackedWeight | torch.Tensor, bias: torch.Tensor | None = None, isa: str = "auto"
) -> torch.Tensor:
    """``x @ w.T + bias`` for float32 CPU tensors: x ``[..., K]``, w ``PackedWeight`` of ``[N, K]`` (or the raw
    ``[N, K]`` weight, packed on every call: fine for tests, slow in a loop), bias ``[N]`` or None; returns
    ``[..., N]``. Row ``i`` of the result depends only on row ``i`` of x (bitwise; see the module docstring).
    ``isa``: ``"auto"`` (AVX-512 where the CPU has it), ``"avx2"`` or ``"avx512"``; every choice gives the same
    bits.
    """
    packed = w if isinstance(w, PackedWeight) else pack(w)
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] != packed.k:
        raise ValueError(
            f"fastlinear.linear: need float32 CPU x [..., {packed.k}], got {x.dtype} {tuple(x.shape)} on {x.device}"
        )
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (packed.n,)):
        raise ValueError(f"fastlinear.linear: need a float32 bias [{packed.n}], got {bias.dtype} {tuple(bias.shape)}")
    if isa not in ("auto", "avx2", "avx512"):
        raise ValueError(f"fastlinear.linear: isa must be auto, avx2 or avx512, not {isa!r}")
    x2 = x.reshape(-1, packed.k).contiguous()
    y = _ops().linear(x2, packed.data, packed.n, None if bias is None else bias.detach().contiguous(), isa)
    return y.reshape(*x.shape[:-1], packed.n)
