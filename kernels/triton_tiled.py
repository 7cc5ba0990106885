"""Triton kernels over a layout repacked for them at load (the ``triton`` backend's kernels).

The layout (:func:`repack`): codes of each output row contiguous along the input dimension, act-order
already removed (columns sorted so groups are contiguous; the caller permutes the input), eight 4-bit
codes per int32 for 2–4 bits (four bytes for 5–8), ``K`` zero-padded to whole words of ``BLOCK``
columns; scales and zero codes as fp32 ``[N, groups]``, row-major, so a tile that lies inside one group
reads one scale and one zero per output row. A weight tile ``[BLOCK_N, BLOCK_K]`` is
``BLOCK_N × BLOCK_K/8`` consecutive words per row: 16-byte vector loads, no ``g_idx``, no bit stream.

* ``matmul`` with ``BLOCK_M = 1``: a GEMV (one input row), multiply and reduce, split-K so that a
  few hundred output rows still fill the GPU; partial sums added atomically.
* ``matmul`` with ``BLOCK_M`` 16 or 64: ``tl.dot`` tiles (tensor cores) on the dequantized weight tile,
  split-K as well; for 2–64 rows.
* ``dequantize``: the dense weight in one launch, for a following cuBLAS matmul (many rows).

Autotuned per (row bucket, N, K, group) on the GPU and kept there (``cache_results``); the interpreter
(CPU tests, ``TRITON_INTERPRET=1``) gets one small configuration.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
#: ``LIGHTNING_GPTQ_TRITON_AUTOTUNE=0`` keeps the first configuration of each kernel (no timing at first use).
_TUNE = os.environ.get("LIGHTNING_GPTQ_TRITON_AUTOTUNE", "1") != "0"
K_MULTIPLE = 64  # K is padded to this: whole words for every BLOCK_K (tiles past K are masked)
MAX_DOT_ROWS = 64  # rows above this: dequantize + cuBLAS


def _configs(small: dict, grid: list[tuple]) -> list:
    if _INTERPRET:
        return [triton.Config(small)]
    names = list(small)
    configs = [triton.Config(dict(zip(names, c[:-1])), num_warps=c[-1]) for c in grid]
    return configs if _TUNE else configs[:1]


_GEMV_CONFIGS = _configs({"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2}, [  # few: each costs a compile at first use
    (64, 128, 4, 4), (128, 128, 2, 4), (32, 256, 4, 4), (64, 256, 8, 4), (256, 64, 4, 8), (128, 256, 8, 8)])
_DOT_CONFIGS = _configs({"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2}, [
    (64, 64, 1, 4), (64, 128, 2, 4), (128, 64, 2, 4), (128, 128, 4, 8), (64, 128, 4, 4)])


@triton.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, offs_n, k0, N, KW, G, GROUP: tl.constexpr, BITS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dequantized ``W[offs_n, k0:k0+BLOCK_K]`` in fp32 ``[BLOCK_N, BLOCK_K]`` (zero outside the matrix)."""
    PER_WORD: tl.constexpr = 32 // BITS
    words = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
    mask_n = offs_n < N
    w = tl.load(w_ptr + offs_n[:, None] * KW + words[None, :], mask=mask_n[:, None] & (words < KW)[None, :], other=0)
    shifts = tl.arange(0, PER_WORD) * BITS
    q = (w[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    q = tl.reshape(q, (BLOCK_N, BLOCK_K)).to(tl.float32)
    if GROUP % BLOCK_K == 0:  # the tile lies in one group: one scale and one zero per output row
        g = k0 // GROUP
        s = tl.load(s_ptr + offs_n * G + g, mask=mask_n, other=0.0)
        z = tl.load(z_ptr + offs_n * G + g, mask=mask_n, other=0.0)
        return (q - z[:, None]) * s[:, None]
    g = (k0 + tl.arange(0, BLOCK_K)) // GROUP
    mask = mask_n[:, None] & (g < G)[None, :]
    s = tl.load(s_ptr + offs_n[:, None] * G + g[None, :], mask=mask, other=0.0)
    z = tl.load(z_ptr + offs_n[:, None] * G + g[None, :], mask=mask, other=0.0)
    return (q - z) * s


@triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "GROUP"], reset_to_zero=["out_ptr"], cache_results=True)
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K, KW, G, GROUP: tl.constexpr, BITS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """One input row: ``out[0, n] += Σ_k x[k] · W[n, k]`` over this program's slice of K."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(pid_k * per_split, tl.minimum(K, (pid_k + 1) * per_split), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        w = _weight_tile(w_ptr, s_ptr, z_ptr, offs_n, k0, N, KW, G, GROUP, BITS, BLOCK_N, BLOCK_K)
        acc += tl.sum(w * x[None, :], axis=1)
    tl.atomic_add(out_ptr + offs_n, acc, mask=offs_n < N)


@triton.autotune(configs=_DOT_CONFIGS, key=["BLOCK_M", "N", "K", "GROUP"], reset_to_zero=["out_ptr"], cache_results=True)
@triton.jit
def _dot_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, KW, G, GROUP: tl.constexpr, BITS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """``BLOCK_M`` input rows: ``tl.dot`` of the rows with each dequantized weight tile (in the rows' dtype)."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * per_split, tl.minimum(K, (pid_k + 1) * per_split), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m < M)[:, None] & (offs_k < K)[None, :],
                    other=0.0)
        w = _weight_tile(w_ptr, s_ptr, z_ptr, offs_n, k0, N, KW, G, GROUP, BITS, BLOCK_N, BLOCK_K)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision="ieee")
    tl.atomic_add(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, KW, G, GROUP: tl.constexpr, BITS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w = _weight_tile(w_ptr, s_ptr, z_ptr, offs_n, k0, N, KW, G, GROUP, BITS, BLOCK_N, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# -- the layout --------------------------------------------------------------------------------------
def stored_bits(bits: int) -> int:
    """Bits per code in the kernel layout: 4 for 2–4-bit codes, 8 for 5–8."""
    return 4 if bits <= 4 else 8


def padded_k(in_features: int) -> int:
    return -(-in_features // K_MULTIPLE) * K_MULTIPLE


def repack(codes: Tensor, bits: int) -> Tensor:
    """Codes ``[N, K]`` (K a multiple of ``K_MULTIPLE``, columns in group order) → int32 ``[N, K·b/32]``,
    code ``k`` of a row in bits ``(k mod 32/b)·b`` of word ``k // (32/b)``, ``b = stored_bits(bits)``."""
    b = stored_bits(bits)
    per_word = 32 // b
    c = codes.to(torch.int64).view(codes.shape[0], -1, per_word)
    words = (c << (torch.arange(per_word, device=codes.device) * b)).sum(-1)
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32)  # the same 32 bits, as int32


def unpack(words: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`repack` → int32 ``[N, K]``."""
    b = stored_bits(bits)
    shifts = torch.arange(0, 32, b, device=words.device, dtype=torch.int32)
    return ((words[..., None] >> shifts) & ((1 << b) - 1)).reshape(words.shape[0], -1)


# -- launches ----------------------------------------------------------------------------------------
#: the ``group`` for one grid per row: every column's group index is 0, and it is one compiled variant for any K
PER_ROW = 1 << 30


def matmul(x: Tensor, words: Tensor, scales: Tensor, zeros: Tensor, bits: int, group: int) -> Tensor:
    """``x`` [M, K] (K padded, columns in group order) → ``x @ Wᵀ`` [M, N] fp32; ``scales``/``zeros`` fp32
    ``[N, groups]``; ``group``: columns per group (``PER_ROW`` for one per row). One row: the GEMV; more: ``tl.dot``
    tiles of 16 or 64 rows (``auto`` prefers ``dequantize``
    + cuBLAS where that is faster, typically above ``MAX_DOT_ROWS``)."""
    M, K = x.shape
    N, G = scales.shape
    x = x.contiguous()
    out = torch.zeros(M, N, device=x.device, dtype=torch.float32)
    b = stored_bits(bits)
    if M == 1:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])
        _gemv_kernel[grid](x, words, scales, zeros, out, N, K, words.shape[1], G, GROUP=group, BITS=b)
    else:
        block_m = 16 if M <= 16 else 64  # two compiled variants
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"], triton.cdiv(M, block_m))
        _dot_kernel[grid](x, words, scales, zeros, out, M, N, K, words.shape[1], G, GROUP=group, BITS=b, BLOCK_M=block_m)
    return out


def dequantize(words: Tensor, scales: Tensor, zeros: Tensor, bits: int, group: int, k: int,
               dtype: torch.dtype) -> Tensor:
    """The dense ``W`` [N, K] in ``dtype``, one launch."""
    N, G = scales.shape
    out = torch.empty(N, k, device=words.device, dtype=dtype)
    block_k = 64
    grid = (triton.cdiv(N, 64), triton.cdiv(k, block_k))
    _dequant_kernel[grid](words, scales, zeros, out, N, k, words.shape[1], G, GROUP=group,
                          BITS=stored_bits(bits), BLOCK_N=64, BLOCK_K=block_k)
    return out
