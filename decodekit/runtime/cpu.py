"""Hand-written CPU kernels for the decode hot path (``kernels/*.cpp``, one torch extension).

A decode step pushes a few rows (1 for plain decoding, 8-81 for a draft tree) through every weight matrix and
over the whole KV cache. Torch's kernels are built for many rows; these are built for few, and for one
invariant: **a row's result never depends on the other rows** (nor on their number, the thread count, or the
ISA path), so decoding one token and verifying it in a tree give bitwise identical floats.

- ``linear`` (``small_gemm.cpp``, AVX2 + FMA, AVX-512 where the CPU has it): streams each cold weight once,
  at close to memory bandwidth, and does all the rows while a piece of it is in cache. It needs the weight in
  its own layout: ``pack(w)`` once (at load time, like oneDNN's reorder), then ``linear(x, packed)``::

      packed = cpu.pack(layer.weight)        # PackedWeight, same memory as the weight (+ padding)
      y = cpu.linear(x, packed, layer.bias)  # x [..., K] -> y [..., N]

  Each ``y[m, n]`` is ``fma``-accumulated over ``k = 0 .. K-1`` in order in one float32 accumulator, then
  ``+ bias[n]``. (Not bitwise ``torch.nn.functional.linear``, which sums in another order; equal to float32
  rounding.) A bfloat16 weight streams half the bytes and is widened to float32 exactly as it is read, so the
  same holds; with bfloat16 x, y is bfloat16, rounded once from that float32 result. Except where the CPU
  has AVX-512 BF16 (Zen 4, Sapphire Rapids): there bfloat16 x and weights multiply as bf16 pairs
  (``vdpbf16ps``, twice the fma rate, which is what bounds a tree of more than a few rows), so the sums differ
  from the float32 kernel's in their last bits, while each row is still its own fixed sequence; and where it
  also has AMX (Sapphire Rapids and later), on the tile unit, whose far higher rate makes a tree's extra rows
  nearly free (another fixed sequence per row, other last bits again).
- ``quant_linear`` (``quant_gemm.cpp``, AVX2, AVX-512 VNNI where the CPU has it): the same for weights kept in
  their GGUF blocks (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K; ``quant_pack`` lays them out, ``dequantize``
  gives their floats back as gguf-py does). Each row of x is rounded to 8 bits per block of 32 and multiplied as
  exact integer sums, one float multiply-add per block in a fixed order: a row's result never depends on the
  other rows, and both paths give the same bits.
- ``attention`` (``attention.cpp``, AVX2 + FMA; float32 or bfloat16, computed in float32): a few queries over
  the cache, each query on its own: its
  visible slots gathered in order, exact two-pass softmax, fixed summation order. A query's output depends only
  on the keys and values it sees, in slot order. The heads of a group share each key and value load; for 1-10
  queries it takes 10-40% less time than torch's CPU flash attention, about the same at 64.
- ``rms_norm``, ``rope_``, ``silu_mul`` (``elementwise.cpp``): a block's elementwise steps, one op each where
  torch takes 3-8 small ones (at a few rows an op costs its dispatch, not its arithmetic). Each row on its own,
  in a fixed order. Gemma's variants: ``rms_norm(..., unit_offset=True)`` (``x * (1 + weight)``),
  ``rms_norm_heads_`` (the per-head q and k norms, in place) and ``gelu_tanh_mul`` (GeGLU).
- ``fused_block`` (``block.cpp``): a whole decoder block as one call, the ops above in the order the block's
  Python forward calls them (bitwise its result), its weights bound once. At a few rows the Python side of a
  block's ~15 ops costs about as much as their work; one call per block leaves the work.

The extension is compiled on first use (``available()``; one warning when it starts and one with the time it
took), into torch's extension cache (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), in a
directory of its own per key (sources, flags, torch and Python versions); later processes load the finished
library directly and silently. ``available()`` is False, and callers keep their PyTorch path, where
``$DECODEKIT_KERNELS`` is ``0``, on a CPU without AVX2/FMA, or where the build fails: a failure is recorded in
that directory (``decodekit.failed``), so later processes skip the build and say once why (delete that file to
retry). Inference only: the ops have no autograd formula.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

from decodekit.errors import InvalidParameter

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger(__name__)

KERNEL_FILES = ("small_gemm.cpp", "quant_gemm.cpp", "attention.cpp", "elementwise.cpp", "block.cpp")
SOURCES = [Path(__file__).parent / "kernels" / name for name in KERNEL_FILES]
NAME = "decodekit_cpu"  # the extension's name and its op namespace (torch.ops.decodekit_cpu)
OPS = ("linear", "quant_linear", "attention", "rms_norm", "rms_norm_heads_", "rope_", "silu_mul", "gelu_tanh_mul")
# -mavx2 -mfma rather than -march=native: the build may be cached and reused on another machine of the fleet;
# the AVX-512 path is compiled for that ISA by a function attribute and taken only where the CPU has it.
# -fopenmp: at::parallel_for is inlined from ATen's headers and runs on one thread without it (the OpenMP
# runtime itself comes from torch's own libgomp, already loaded).
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp"]
SWITCH = "DECODEKIT_KERNELS"  # "0": never build nor load the kernels; read once, at the first available()
# in the build directory: BUILT holds the key (_key) of the last good build; FAILED that of a failed one, then
# the reason (one line), then the whole error
BUILT, FAILED = "decodekit.built", "decodekit.failed"

_lock = threading.Lock()
_state: bool | None = None  # None: not tried yet


class PackedWeight(NamedTuple):
    """A weight ``w [n, k]`` in the kernel's layout: ``data [ceil(n / 16), k, 16]``, ``data[p, j, i] = w[16p + i, j]``
    (rows past ``n`` are zero), of w's dtype; or, for the AMX path, the tile unit's pair layout
    ``data [ceil(n / 32) * 2, kp / 2, 16, 2]``, ``data[p, r, i, j] = w[16p + i, 2r + j]`` (``kp``: k rounded up to
    32, zeros past n and k)."""

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
    """True if the kernels can be used here: builds them, or loads the cached build, on the first call.

    False, without raising, where ``$DECODEKIT_KERNELS`` is ``0``, on a CPU without AVX2/FMA, or where the build
    fails now or failed in an earlier process with the same key (one warning says why). Raises InvalidParameter
    if ``$DECODEKIT_KERNELS`` is set to anything but ``0`` or ``1``.
    """
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _load()
    return _state


def _load() -> bool:
    switch = os.environ.get(SWITCH, "1")
    if switch not in ("0", "1"):
        raise InvalidParameter(f"{SWITCH} must be 0 (kernels off) or 1, not {switch!r}")
    if switch == "0":
        return False
    if not cpu_supported():
        log.warning("this CPU lacks AVX2/FMA: the CPU decode kernels are off; decoding takes the PyTorch path")
        return False
    try:
        build = build_directory()
        with _build_lock(build):
            return _build_once(build)
    except OSError as e:  # an unwritable cache: nowhere to build, nor to record the failure
        log.warning("the CPU decode kernels are unavailable (%s); decoding takes the PyTorch path", _why(e))
        return False


def build_directory() -> Path:
    """Where this build lives: torch's extension cache ($TORCH_EXTENSIONS_DIR, else torch's default), in a
    directory named after the build's key (sources, flags, torch and Python versions), so checkouts or versions
    with other kernels keep builds of their own side by side. (torch's own lookup of that cache imports
    cpp_extension: ~0.2 s of every start.)"""
    from torch._appdirs import user_cache_dir

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or user_cache_dir(appname="torch_extensions"))
    build = root / f"{NAME}-{_key()}"
    build.mkdir(parents=True, exist_ok=True)
    return build


@contextmanager
def _build_lock(build: Path) -> Iterator[None]:
    """Hold the build directory alone among processes.

    torch guards a build with a plain ``lock`` file and waits forever while it exists, so a process killed
    mid-build (Ctrl-C on a first run) would hang every later one. Where fcntl exists this holds an flock instead
    (released by the OS when its holder dies) and, holding it, removes a torch ``lock`` left in the directory as
    stale. Without fcntl (Windows) only torch's lock guards the build.
    """
    if fcntl is None:
        yield
        return
    with open(build / "decodekit.flock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (build / "lock").unlink(missing_ok=True)
        yield


def _build_once(build: Path) -> bool:
    """Load the finished build in ``build``, or build it there, unless a failure is recorded there; record a new
    one. A first build is announced and timed."""
    built, failed, library = build / BUILT, build / FAILED, build / f"{NAME}.so"
    if built.exists() and library.exists() and not failed.exists():
        try:
            torch.ops.load_library(library)  # what torch's load does once it has checked the build (~0.2 s)
            if _registered():
                return True
        except OSError:  # a damaged build: build it again
            pass
    if failed.exists():
        reason = _read(failed).partition("\n")[0]
    else:
        fresh = not built.exists()
        if fresh:
            log.warning("compiling the CPU decode kernels, once (about a minute); later runs load the cached build")
            start = time.monotonic()
        try:
            _build(build)
        except Exception as e:  # no compiler, no ninja, a compile error, ...: fall back
            reason = _why(e)
            failed.write_text(f"{reason}\n{e}\n")
        else:
            if fresh:
                built.write_text(_key())
                log.warning("compiled the CPU decode kernels in %.0f s", time.monotonic() - start)
            return True
    log.warning(
        "the CPU decode kernels are unavailable (%s); decoding takes the PyTorch path. The build is not retried "
        "while %s exists: delete it to retry",
        reason,
        failed,
    )
    return False


def _build(build: Path) -> None:
    """Compile (or load the up-to-date build in ``build``) and check that every op registered."""
    from torch.utils.cpp_extension import load

    load(
        name=NAME,
        sources=[str(path) for path in SOURCES],
        extra_cflags=CFLAGS,
        build_directory=str(build),
        is_python_module=False,
    )
    if not _registered():
        raise RuntimeError(f"the build of {NAME} lacks ops: {', '.join(OPS)} expected")


def _registered() -> bool:
    """True if every op of OPS and the FusedBlock class are registered (the library is loaded)."""
    try:
        getattr(torch.classes, NAME).FusedBlock  # noqa: B018 (raises where the class is not registered)
    except (AttributeError, RuntimeError):
        return False
    return all(hasattr(getattr(torch.ops, NAME), op) for op in OPS)


def _key() -> str:
    """What a build depends on: the kernel sources and headers, the flags, torch's and Python's versions."""
    digest = hashlib.sha256(repr((CFLAGS, torch.__version__, sys.version_info[:2])).encode())
    for path in sorted(SOURCES[0].parent.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _why(e: Exception) -> str:
    """One line on why a build failed: the compiler's first error where there is one."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
    error = (line for line in lines[1:] if "error" in line.lower() or "not found" in line)
    return f"{type(e).__name__}: {next(error, lines[-1])}"[:300]


def _ops():  # the torch.ops namespace of the extension (called per op: the common case is one global read)
    if _state is not True and not available():
        raise RuntimeError("decodekit.runtime.cpu: the decode kernels are not available on this machine")
    return getattr(torch.ops, NAME)


WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


def pack(w: torch.Tensor, amx: bool | None = None) -> PackedWeight:
    """Pack a float32 or bfloat16 CPU weight ``w [N, K]`` (``nn.Linear.weight`` layout) for ``linear``. ``amx``:
    lay a bfloat16 weight out for the AMX path (then only that path reads it); None: where the CPU has AMX."""
    if w.dim() != 2 or w.dtype not in WEIGHT_DTYPES or w.device.type != "cpu":
        raise ValueError(
            f"cpu.pack: need a float32 or bfloat16 CPU [N, K] weight, got {w.dtype} {tuple(w.shape)} on {w.device}"
        )
    if amx is None:
        amx = w.dtype == torch.bfloat16 and has_amx()
    if amx and (w.dtype != torch.bfloat16 or not has_amx()):
        raise ValueError("cpu.pack: the AMX layout needs a bfloat16 weight and a CPU with AMX")
    return PackedWeight(_ops().pack(w.detach(), amx), w.shape[0], w.shape[1])


def has_avx512() -> bool:
    """True if the kernel takes its AVX-512 path on this CPU."""
    return bool(_ops().has_avx512())


def has_avx512_bf16() -> bool:
    """True if the kernel multiplies bfloat16 x and weights as bf16 pairs on this CPU (AVX-512 BF16)."""
    return bool(_ops().has_avx512_bf16())


def has_amx() -> bool:
    """True if the kernel multiplies bfloat16 x and weights on the AMX tile unit on this CPU."""
    return bool(_ops().has_amx())


ISAS = ("auto", "avx2", "avx512", "avx512_bf16", "amx")
BF16_ONLY_ISAS = ("avx512_bf16", "amx")


def linear(
    x: torch.Tensor, w: PackedWeight | torch.Tensor, bias: torch.Tensor | None = None, isa: str = "auto"
) -> torch.Tensor:
    """``x @ w.T + bias`` on CPU tensors: x ``[..., K]``, w ``PackedWeight`` of ``[N, K]`` (or the raw ``[N, K]``
    weight, packed on every call: fine for tests, slow in a loop), bias ``[N]`` or None; returns ``[..., N]`` of
    x's dtype. x is float32, or bfloat16 with a bfloat16 weight; the bias float32 or bfloat16. Row ``i`` of the
    result depends only on row ``i`` of x (bitwise; see the module docstring). ``isa``: ``"auto"`` (a weight
    packed for AMX takes the tile unit; else the bf16 pair products for bfloat16 x and weights where the CPU has
    AVX-512 BF16, else AVX-512 where it has that), ``"avx2"``, ``"avx512"`` (these two give the same bits),
    ``"avx512_bf16"`` (bfloat16 x and weights) or ``"amx"`` (bfloat16 x, a weight packed for AMX).
    """
    if isinstance(w, PackedWeight):
        packed = w
    else:  # the layout that isa reads ("auto": AMX's where it serves, for bfloat16 x)
        packed = pack(w, (None if x.dtype == torch.bfloat16 else False) if isa == "auto" else isa == "amx")
    x_dtypes = (torch.float32, packed.data.dtype)
    if x.dtype not in x_dtypes or x.device.type != "cpu" or x.shape[-1] != packed.k:
        raise ValueError(
            f"cpu.linear: need CPU x [..., {packed.k}] of {' or '.join(map(str, set(x_dtypes)))}, "
            f"got {x.dtype} {tuple(x.shape)} on {x.device}"
        )
    if bias is not None and (bias.dtype not in WEIGHT_DTYPES or bias.shape != (packed.n,)):
        raise ValueError(
            f"cpu.linear: need a float32 or bfloat16 bias [{packed.n}], got {bias.dtype} {tuple(bias.shape)}"
        )
    if isa not in ISAS:
        raise ValueError(f"cpu.linear: isa must be one of {', '.join(ISAS)}, not {isa!r}")
    if isa in BF16_ONLY_ISAS and not (x.dtype == packed.data.dtype == torch.bfloat16):
        raise ValueError(f"cpu.linear: the {isa} path needs bfloat16 x and weights")
    amx_layout = packed.data.dim() == 4
    if amx_layout != (isa == "amx") and isa != "auto":
        raise ValueError(
            f"cpu.linear: isa {isa!r} does not read this layout: the amx path, and only it, reads pack(w, amx=True)"
        )
    if amx_layout and x.dtype != torch.bfloat16:
        raise ValueError("cpu.linear: a weight packed for AMX needs bfloat16 x")
    x2 = x.reshape(-1, packed.k).contiguous()
    y = _ops().linear(x2, packed.data, packed.n, None if bias is None else bias.detach().contiguous(), isa)
    return y.reshape(*x.shape[:-1], packed.n)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x**2, -1) + eps))`` for x ``[..., D]`` and weight ``[D]`` of x's dtype (float32 or
    bfloat16; statistics in float32, the normalized row rounded to the dtype before the weight, as the Llama
    reference). ``unit_offset``: Gemma's ``(x / sqrt(...)) * (1 + weight)`` instead, all in float32, rounded to the
    dtype once. Each row bitwise independent of the others."""
    return _ops().rms_norm(x.contiguous(), weight.detach(), eps, unit_offset)


def rms_norm_heads_(
    x: torch.Tensor, weight: torch.Tensor, eps: float, first: int, heads: int, unit_offset: bool = False
) -> None:
    """In place on heads ``[first, first + heads)`` of a contiguous ``x [..., all heads, d]``: each head's ``d``
    values normed as a row of :func:`rms_norm` (same bits), with ``weight [d]`` of x's dtype."""
    _ops().rms_norm_heads_(x, weight.detach(), eps, first, heads, unit_offset)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> None:
    """Rotate the first ``heads`` heads of a contiguous ``x [B, n, all heads, d]`` in place (rotary embedding,
    half-split convention): ``x * cos + rotate_half(x) * sin`` with cos, sin ``[B, n, d]`` (or ``[B, n, 1, d]``)
    of x's dtype; in float32 bitwise torch's mul, mul, add."""
    _ops().rope_(x, cos.contiguous(), sin.contiguous(), heads)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up [..., 2I]`` = (gate | up); returns ``[..., I]`` of its dtype."""
    return _ops().silu_mul(gate_up.contiguous())


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``gelu(gate, approximate="tanh") * up`` for ``gate_up [..., 2I]`` = (gate | up) (Gemma's GeGLU), computed as
    ``gate * sigmoid(2u)``, ``u = sqrt(2 / pi) (gate + 0.044715 gate**3)``, lane by lane; ``[..., I]`` of its
    dtype."""
    return _ops().gelu_tanh_mul(gate_up.contiguous())


ATTENTION_HEAD_DIMS = (64, 128, 256)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None = None
) -> torch.Tensor:
    """``softmax(scale * q k^T, masked) v`` per query, as ``F.scaled_dot_product_attention`` with a bool
    ``attn_mask`` and grouped queries: q ``[B, H, n, d]``, k and v ``[B, G, W, d]`` (all float32 or all bfloat16,
    computed in float32; H a multiple of G, d in
    ``ATTENTION_HEAD_DIMS``, unit stride in d: cache views are fine), mask bool ``[B, 1, n, W]`` (True = may
    attend) or None (all); scale defaults to ``d ** -0.5``. Returns ``[B, H, n, d]`` of q's dtype, a transposed
    view of a contiguous ``[B, n, H, d]`` (so ``.transpose(1, 2).reshape(B, n, H * d)`` does not copy). Query
    ``(b, h, r)`` is bitwise a function of its own visible keys and values in slot order (see the module
    docstring).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in WEIGHT_DTYPES or t.dtype != q.dtype or t.device.type != "cpu" or t.dim() != 4:
            raise ValueError(
                f"cpu.attention: {name} must be a 4-d float32 or bfloat16 CPU tensor of q's dtype, "
                f"got {t.dtype} {tuple(t.shape)}"
            )
    if q.shape[-1] not in ATTENTION_HEAD_DIMS:
        raise ValueError(f"cpu.attention: head_dim must be one of {ATTENTION_HEAD_DIMS}, not {q.shape[-1]}")
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"cpu.attention: mask must be bool, got {mask.dtype}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _ops().attention(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale)


# ---- GGUF-quantized weights (kernels/quant_gemm.cpp) ------------------------------------------------------------

QUANT_BLOCK = 32  # k per block of every supported kind
QUANT_PANEL = 16  # outputs per panel
# GGUF type -> the kernel's form of it (kernels/quant_gemm.cpp): Q5_0's integers, less 16, are stored as Q8_0's
QUANT_KINDS = {"q4_0": 0, "q4_1": 1, "q8_0": 2, "q5_0": 2, "q4_k": 3, "q5_k": 4, "q6_k": 5}
WIDE_FORMS = (2, 4, 5)  # 8-bit integers (stored + 128); the others 4-bit
FLOAT_SCALE_FORMS = (3, 4, 5)  # float32 scales (and mins); the others float16
MIN_FORMS = (1, 3, 4)
HALF_BLOCK_FORMS = (5,)  # a scale per 16 k (Q6_K); the others per 32


class QuantWeight(NamedTuple):
    """A GGUF-quantized weight ``w [n, k]`` in the kernel's layout (kernels/quant_gemm.cpp): ``qs`` uint8
    ``[ceil(n / 16), k / 32, 256 or 512]``, ``scales`` ``[ceil(n / 16), k / 32, 1 or 2, 16]`` and, where the form
    has them, ``mins`` ``[ceil(n / 16), k / 32, 16]`` (float16, or float32 for the K-quants). ``kind``: the GGUF
    type(s) it holds (``q4_1``; ``q5_0+q8_0`` for matrices fused from both); ``form``: the kernel's number for it.
    Each block is what GGUF defines: ``d * (q - 8)`` (q4_0), ``d * q + m`` (q4_1, q4_k, q5_k), ``d * q``
    (q8_0, q5_0 with q less 16, q6_k with q less 32 and a d per half block)."""

    kind: str
    form: int
    qs: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    n: int
    k: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.scales, self.mins) if t is not None)


def quant_pack(kind: str, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None) -> QuantWeight:
    """Lay out a quantized weight for :func:`quant_linear`: ``q [n, k]`` the integers as the module docstring's
    table has them (4-bit forms 0..15; q8_0 -128..127, q5_0 -16..15, q6_k -32..31, q5_k 0..31), ``scales``
    ``[n, k / 32]`` (q6_k: ``[n, k / 16]``) and, for q4_1, q4_k and q5_k, ``mins`` ``[n, k / 32]``, in float16
    (float32 for the K-quants). Pure torch: works where the kernels do not."""
    if kind not in QUANT_KINDS:
        raise ValueError(f"cpu.quant_pack: kind must be one of {', '.join(QUANT_KINDS)}, not {kind!r}")
    form = QUANT_KINDS[kind]
    n, k = q.shape
    blocks, halves = k // QUANT_BLOCK, 2 if form in HALF_BLOCK_FORMS else 1
    if k % QUANT_BLOCK or scales.shape != (n, blocks * halves) or (mins is not None) != (form in MIN_FORMS):
        raise ValueError(
            "cpu.quant_pack: need q [n, k] (k a multiple of 32), scales [n, k / 32] (q6_k: [n, k / 16]), mins for "
            "q4_1, q4_k and q5_k only"
        )
    scale_type = torch.float32 if form in FLOAT_SCALE_FORMS else torch.float16
    panels = -(-n // QUANT_PANEL)
    pad = panels * QUANT_PANEL - n

    def panel_major(t: torch.Tensor, per_block: int) -> torch.Tensor:  # [n, blocks * per] -> [panels, blocks, per, 16]
        t = torch.nn.functional.pad(t.to(scale_type), (0, 0, 0, pad))
        return t.view(panels, QUANT_PANEL, blocks, per_block).permute(0, 2, 3, 1).contiguous()

    # [n, k] -> [panels, blocks, 8 groups, 16 outputs, 4]
    groups = torch.nn.functional.pad(q, (0, 0, 0, pad)).view(panels, QUANT_PANEL, blocks, 8, 4).permute(0, 2, 3, 1, 4)
    if form in WIDE_FORMS:
        qs = (groups.to(torch.int16) + 128).to(torch.uint8)
    else:  # groups 2c and 2c + 1 in the low and high nibbles of chunk c
        pairs = groups.to(torch.uint8).reshape(panels, blocks, 4, 2, QUANT_PANEL, 4)
        qs = pairs[:, :, :, 0] | (pairs[:, :, :, 1] << 4)
    return QuantWeight(
        kind,
        form,
        qs.reshape(panels, blocks, -1).contiguous(),
        panel_major(scales, halves),
        None if mins is None else panel_major(mins, 1)[:, :, 0].contiguous(),
        n,
        k,
    )


def quant_cat(weights: list[QuantWeight]) -> QuantWeight:
    """Weights of one form stacked by rows (each ``n`` a multiple of 16, but the last), as one."""
    first = weights[0]
    if len({w.form for w in weights}) > 1 or any(w.n % QUANT_PANEL for w in weights[:-1]):
        raise ValueError("cpu.quant_cat: the weights must share a form and fill whole panels")
    kinds = "+".join(dict.fromkeys(w.kind for w in weights))
    qs, scales = torch.cat([w.qs for w in weights]), torch.cat([w.scales for w in weights])
    mins = None if first.mins is None else torch.cat([w.mins for w in weights])
    return QuantWeight(kinds, first.form, qs, scales, mins, sum(w.n for w in weights), first.k)


def dequantize(w: QuantWeight, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 rows ``rows`` (int64 ``[R]``; None: all) of a quantized weight, ``[R, k]``: GGUF's definition of
    each kind, bitwise what gguf-py's ``dequantize`` gives. Pure torch."""
    rows = torch.arange(w.n) if rows is None else rows.reshape(-1)
    panel, lane = rows // QUANT_PANEL, rows % QUANT_PANEL
    blocks = w.k // QUANT_BLOCK
    if w.form in WIDE_FORMS:
        q = w.qs.view(-1, blocks, 8, QUANT_PANEL, 4)[panel, :, :, lane].to(torch.int16) - 128
    else:
        chunks = w.qs.view(-1, blocks, 4, QUANT_PANEL, 4)[panel, :, :, lane]  # [R, blocks, 4, 4]
        q = torch.stack((chunks & 15, chunks >> 4), dim=3)
        if w.form == QUANT_KINDS["q4_0"]:
            q = q.to(torch.int16) - 8
    halves = w.scales.shape[2]
    q = q.reshape(len(rows), blocks, halves, QUANT_BLOCK // halves).float()
    d = w.scales[panel, :, :, lane].float()[..., None]  # [R, blocks, halves, 1]
    out = q * d if w.mins is None else d * q + w.mins[panel, :, lane].float()[..., None, None]
    return out.reshape(len(rows), w.k)


def quantize_q8_0(w: torch.Tensor) -> QuantWeight:
    """A float weight ``w [n, k]`` (``k`` a multiple of 32) in q8_0 blocks for :func:`quant_linear`: each block of
    32 scaled by its largest magnitude / 127 and rounded, as llama.cpp quantizes to Q8_0. Pure torch."""
    n, k = w.shape
    blocks = w.detach().float().reshape(n, k // QUANT_BLOCK, QUANT_BLOCK)
    d = (blocks.abs().amax(-1) / 127).half()
    q = torch.round(blocks / d.float().clamp(min=1e-30)[..., None]).clamp(-127, 127).to(torch.int8)
    return quant_pack("q8_0", q.reshape(n, k), d)


QUANT_ISAS = ("auto", "avx2", "avx512_vnni")


def has_avx512_vnni() -> bool:
    """True if the quantized kernel takes its AVX-512 VNNI path on this CPU."""
    return bool(_ops().has_avx512_vnni())


def quant_linear(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None, isa: str = "auto") -> torch.Tensor:
    """``x @ w.T + bias`` for float32 CPU x ``[..., k]`` and a quantized weight: ``[..., n]`` float32. x is quantized
    per row and block of 32 to 8 bits (as llama.cpp's activations), the block products summed as exact integers;
    row ``i`` of the result depends only on row ``i`` of x, bitwise, on every ``isa`` (``"auto"``, ``"avx2"``,
    ``"avx512_vnni"``). Error against the float32 product with the de-quantized weight: at most
    ``sum_b d_x[b] / 2 * sum_{k in b} |w[j, k]|`` (``d_x[b] = max |x| over block b / 127``), plus float rounding."""
    if x.dtype != torch.float32 or x.shape[-1] != w.k or isa not in QUANT_ISAS:  # the op checks the device
        raise ValueError(
            f"cpu.quant_linear: need float32 x [..., {w.k}] and isa in {QUANT_ISAS}, got {x.dtype} "
            f"{tuple(x.shape)}, {isa!r}"
        )
    return _ops().quant_linear(x.contiguous(), w.qs, w.scales, w.mins, w.form, w.n, bias, isa)


def fused_block(
    heads: int,
    kv_heads: int,
    head_dim: int,
    scale: float,
    eps: float,
    norms: list[torch.Tensor],
    projections: list[tuple[PackedWeight | QuantWeight | list[QuantWeight], torch.Tensor | None]],
) -> object:
    """A decoder block bound to its weights, as one op (``kernels/block.cpp``): ``norms`` the RMS norms' weights,
    ``[attention's, MLP's]`` for a Llama block or ``[attention's, MLP's, post-attention, post-MLP, q, k]`` for
    Gemma 3's (whose norms then take ``1 + weight``, its MLP GeGLU); ``projections`` (q|k|v, output, gate|up,
    down), each a weight and a bias or None. Its ``forward(x [B, n, hidden], cos, sin [B, n, 1, head_dim], kv
    [2, B, kv_heads, capacity, head_dim], lengths [B], width, mask [B, 1, n, width] or None)`` is bitwise
    ``model.Block.forward`` on the kernel path (keys and values written to ``kv`` as ``KVCache.write`` does)."""
    _ops()  # the kernels are built and loaded
    block = getattr(torch.classes, NAME).FusedBlock(
        heads, kv_heads, head_dim, scale, eps, len(norms) == 6, [norm.detach() for norm in norms]
    )
    for which, (weight, bias) in enumerate(projections):
        if isinstance(weight, PackedWeight):
            block.packed(which, weight.data, weight.n)
        else:
            for part in weight if isinstance(weight, list) else [weight]:
                block.quantized(which, part.qs, part.scales, part.mins, part.form, part.n)
        if bias is not None:
            block.bias(which, bias.detach())
    return block
