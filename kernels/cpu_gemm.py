"""Our C++ GPTQ matmul for CPUs (``cpu_gemm.cpp``), compiled on first use for the machine it runs on.

It is built with ``-march=native`` so the same source becomes AVX2 code on one CPU and AVX-512 on
another; the build is cached under torch's extension folder, keyed by the source and the CPU's
instruction-set flags so a cache shared between different machines never runs foreign code.
Needs a C++ compiler and ninja; :func:`unavailable` says why it cannot be used, and backends that
need it decline then (``auto`` falls back to the others).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

from .packing import pack_rows, unpack_rows

SOURCE = Path(__file__).with_name("cpu_gemm.cpp")
BITS = (2, 3, 4, 8)
TILE_N = 16  # output columns per tile (NB in the source)
KERNELS = {"gemm": 0, "int8": 1, "int8x2": 2, "blocked": 3}  # the C++ matmul's kernels, by id
# -march=native: the instruction set of the machine it runs on; GCC otherwise keeps AVX-512 code at 256 bits
CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"]
log = logging.getLogger("lightning_gptq")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() + platform.machine()


_BUILD_LOCK = threading.Lock()
_built: list = []  # the module, once built in this process


@functools.cache  # the hot path: one cache hit per kernel call
def _load():
    with _BUILD_LOCK:  # two threads' first calls: one builds, the other waits for it and imports nothing twice
        if not _built:
            module = _build()
            if module.register_ops():
                _register_fakes()
            _built.append(module)
        return _built[0]


def _register_fakes() -> None:
    """Shapes of the ``lightning_gptq::`` operators' outputs, for tracing (``torch.compile``, ``torch.export``)."""
    def packed_matmul(x, perm, qweight, scales, zeros, bias, bits, group_size, n_out, kernel):
        return x.new_empty((*x.shape[:-1], n_out))

    def packed_dequant_t(qweight, scales, zeros, bits, group_size, dtype):
        tiles, words, _ = qweight.shape
        return qweight.new_empty((words * 32 // bits, tiles * TILE_N), dtype=dtype)

    def gemv(x, weight, scale=None):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    def decode_attention(q, k, v, mask, scale):
        return q.new_empty((q.shape[0], 1, q.shape[1], q.shape[3]))

    def llama_decode_layer(x, cos, sin, k_cache, v_cache, length, position, ln1, ln2, eps, scale, linears, meta, dims):
        return torch.empty_like(x)

    def rms_norm(x, weight, eps):
        return torch.empty_like(x)

    for name, fake in (("packed_matmul", packed_matmul), ("packed_dequant_t", packed_dequant_t),
                       ("dense_gemv", gemv), ("int8_row_gemv", gemv), ("decode_attention", decode_attention),
                       ("llama_decode_layer", llama_decode_layer), ("rms_norm", rms_norm)):
        torch.library.register_fake(f"lightning_gptq::{name}", fake)


def build_name(source: Path = SOURCE) -> str:
    """The build's folder name under torch's extension cache: the source's bytes, the CPU's flags, torch, the
    compiler flags, and where the source and torch live. Two checkouts or environments on one machine write
    build files naming their own paths; under one name each would rebuild over the other's (about a minute)."""
    where = f"{source.resolve()}|{Path(torch.__file__).resolve().parent}"
    key = hashlib.sha256(source.read_bytes() + _cpu_flags().encode() + torch.__version__.encode()
                         + " ".join(CFLAGS).encode() + where.encode()).hexdigest()[:12]
    return f"lightning_gptq_cpu_gemm_{key}"


def _build():
    from torch.utils.cpp_extension import load

    start = time.perf_counter()
    module = load(name=build_name(), sources=[str(SOURCE)],
                  extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=False)
    log.info("CPU GPTQ kernel ready in %.1f s (built once per machine, then cached)", time.perf_counter() - start)
    return module


@functools.cache
def unavailable() -> str | None:
    """Why the kernel cannot be used here (no compiler, build failed), or None when it can."""
    try:
        _load()
    except Exception as error:  # noqa: BLE001 - any build failure means "use another backend"
        lines = str(error).strip().splitlines() or [type(error).__name__]
        detail = next((line.strip() for line in lines if "error:" in line), lines[0])[:300]
        log.warning("CPU GPTQ kernel unavailable (the other backends serve): %s", detail)
        return f"the C++ kernel could not be built: {detail}"
    return None


def tile(qweight: Tensor) -> Tensor:
    """Words [K_pad·bits/32, N_pad] → the kernel's tiles [N_pad/16, K_pad·bits/32, 16]."""
    words, n_pad = qweight.shape
    return qweight.view(words, n_pad // TILE_N, TILE_N).permute(1, 0, 2).contiguous()


def untile(tiled: Tensor) -> Tensor:
    """Inverse of :func:`tile`."""
    tiles, words, _ = tiled.shape
    return tiled.permute(1, 0, 2).reshape(words, tiles * TILE_N)


# 3-bit runs of 32 codes take three words, in one of two layouts; a build uses the one it decodes cheaply
# (:func:`three_bit_layout`; ``code_at`` in the C++ source).
# "tens" (AVX2-only builds): word b holds codes 10b + j at bit 3j (j < 10), so that 30 codes are masked and
# converted like 2-, 4- and 8-bit ones; the top two bits of words 0 and 1 hold the low bits of codes 30 and 31,
# and bits 30 and 31 of word 2 their high bits.
# "planes" (other builds): words 0 and 1 hold the low two bits of codes 0-15 and 16-31 as 2-bit codes, word 2
# the high bit of code 16b + 4t + j at bit 8t + 4b + j, where one shift lines the high bits of four codes up
# with their low bits, byte by byte (the int8 path's four codes per lane).
LAYOUTS = ("tens", "planes")
_HIGH_BIT = [8 * ((i % 16) // 4) + 4 * (i // 16) + i % 4 for i in range(32)]


def three_bit_layout() -> str:
    """How the kernel built here lays out 3-bit runs: ``tens`` or ``planes``."""
    return _load().three_bit_layout()


def pack(codes_t: Tensor, bits: int, layout: str | None = None) -> Tensor:
    """``codes_t`` [K_pad, N_pad] (K_pad a multiple of 32, N_pad of 16) → the kernel's int32 tiles; 3-bit runs in
    ``layout`` (default: this build's)."""
    if bits != 3:
        return tile(pack_rows(codes_t, bits))
    layout = layout or three_bit_layout()
    k_pad, n_pad = codes_t.shape
    runs = k_pad // 32
    c = codes_t.to(torch.int32).view(runs, 32, n_pad)
    if layout == "tens":
        shifts = 3 * torch.arange(10, dtype=torch.int32, device=codes_t.device).view(1, 1, 10, 1)
        words = (c[:, :30].view(runs, 3, 10, n_pad) << shifts).sum(dim=2, dtype=torch.int32)  # disjoint bits
        last = c[:, 30:]  # [runs, 2, N]
        words[:, :2] |= (last & 3) << 30  # int32: bit 31 wraps into the sign, as intended
        words[:, 2] |= ((last[:, 0] >> 2) << 30) | ((last[:, 1] >> 2) << 31)
    elif layout == "planes":
        low = pack_rows((c & 3).view(k_pad, n_pad), 2).view(runs, 2, n_pad)
        high = torch.zeros(runs, 1, n_pad, dtype=torch.int32, device=codes_t.device)
        for i, position in enumerate(_HIGH_BIT):
            high[:, 0] |= ((c[:, i] >> 2) & 1) << position  # int32: bit 31 wraps into the sign, as intended
        words = torch.cat([low, high], dim=1)
    else:
        raise ValueError(f"3-bit layout must be one of {LAYOUTS}, got {layout!r}")
    return tile(words.view(runs * 3, n_pad))


def unpack(tiled: Tensor, bits: int, k_pad: int, layout: str | None = None) -> Tensor:
    """Inverse of :func:`pack`: → uint8 [K_pad, N_pad]."""
    words = untile(tiled)
    if bits != 3:
        return unpack_rows(words, bits, k_pad)
    layout = layout or three_bit_layout()
    runs, n_pad = k_pad // 32, words.shape[1]
    if layout == "tens":
        w = words.view(runs, 3, 1, n_pad)
        shifts = 3 * torch.arange(10, dtype=torch.int32, device=words.device).view(1, 1, 10, 1)
        first = ((w >> shifts) & 7).view(runs, 30, n_pad)
        high = w[:, 2, 0]
        last = torch.stack([((w[:, 0, 0] >> 30) & 3) | (((high >> 30) & 1) << 2),
                            ((w[:, 1, 0] >> 30) & 3) | (((high >> 31) & 1) << 2)], dim=1)
        return torch.cat([first, last], dim=1).to(torch.uint8).view(k_pad, n_pad)
    if layout != "planes":
        raise ValueError(f"3-bit layout must be one of {LAYOUTS}, got {layout!r}")
    w = words.view(runs, 3, n_pad)
    low = unpack_rows(w[:, :2].reshape(runs * 2, n_pad), 2, k_pad).view(runs, 32, n_pad)
    high = torch.stack([(w[:, 2] >> position) & 1 for position in _HIGH_BIT], dim=1).to(torch.uint8)
    return (low | (high << 2)).view(k_pad, n_pad)


def matmul(x: Tensor, perm: Tensor | None, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Tensor | None,
           bits: int, group_size: int, n_out: int, kernel: int = 0) -> Tensor:
    """``x`` fp32 [..., K] (the leading dimensions are the rows) → fp32 [..., n_out] (+ ``bias``); ``perm`` int64 [K] or None: the kernel's column
    order (``x[:, perm]``, zero-padded to K_pad inside); ``qweight`` from :func:`pack`, ``scales``/``zeros``
    fp32 [G, N_pad]. ``kernel``, an id from :data:`KERNELS`: 0, ``gemm``: codes decoded in registers for each
    pass of a few rows; 3, ``blocked``: each 256×16 slice dequantized once into an L1 buffer, then a
    register-blocked fp32 loop over all rows (for many rows); both exact up to fp32 summation order. 1 and 2,
    ``int8``/``int8x2``: each run of 32 inputs of a row is rounded to one int8 digit (step max|x|/127, about
    2⁻⁸ relative) or two (about 2⁻¹⁵) for integer dot products (VNNI where the CPU has it, AVX2
    multiply-adds for codes of up to 4 bits otherwise)."""
    return _load().gptq_matmul(x, perm, qweight, scales, zeros, bias, bits, group_size, n_out, kernel)


def dense_gemv(x: Tensor, weight: Tensor) -> Tensor:
    """``x`` fp32 [..., K] (few rows) → ``x @ weight.T`` fp32 [..., N], ``weight`` fp32 contiguous [N, K] (a dense
    layer): each output a dot product along a weight row, the rows split between threads. Exact up to fp32
    summation order."""
    return _load().dense_gemv(x, weight)


def int8_row_gemv(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """``x`` fp32 [..., K] (few rows) → ``(x @ q.T) * scale`` fp32 [..., N]; ``q`` int8 contiguous [N, K], ``scale`` fp32
    [N]: a dense layer stored as int8 rows, one step per row. With AVX-512 VNNI each run of 32 inputs is rounded to
    two int8 digits for integer dot products (about 2⁻¹⁵ relative to the run's largest input); elsewhere codes widen
    to fp32 in registers (exact up to fp32 summation order for the int8 weight)."""
    return _load().int8_row_gemv(x, q, scale)


def int8_dot_isa() -> str:
    """The instruction set the ``int8`` path was built for here: ``avx512-vnni``, ``avx-vnni``, ``avx2`` or ``generic``."""
    return _load().int8_dot_isa()


def dequantize_t(qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int, dtype: torch.dtype,
                 out: Tensor | None = None) -> Tensor:
    """Dense ``Wᵀ`` [K_pad, N_pad] in fp32 or bf16 from the same buffers as :func:`gemm`, into ``out`` when given."""
    tiles, words, _ = qweight.shape
    if out is None:
        out = torch.empty(words * 32 // bits, tiles * TILE_N, dtype=dtype)
    return _load().gptq_dequant(qweight, scales, zeros, bits, group_size, out)


class Workspace:
    """One reusable buffer per thread (and dtype) for dense weights that live for one matmul.

    A fresh 30 MB tensor per call costs page faults that take longer than filling it; reusing one
    keeps the extra resident memory to the largest layer's dense weight, per thread that runs the dense
    kernels. Per thread, because two threads running a model at once would otherwise write their dense
    weights into the same buffer while the other's matmul reads it; a thread's buffers go when it ends."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
        buffers: dict[torch.dtype, Tensor] | None = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        buffer = buffers.get(dtype)
        if buffer is None or buffer.numel() < rows * cols:
            buffer = buffers[dtype] = torch.empty(rows * cols, dtype=dtype)
        return buffer[: rows * cols].view(rows, cols)


WORKSPACE = Workspace()
