"""Triton kernels for the GPTQ packed layout (``packing``): any bits 2–8, groups, ``g_idx``, ragged groups.

* ``decode_matmul``: batch 1–16. Split-K GEMV: each program owns ``BLOCK_N`` outputs of one input
  row (or of 16 rows, through ``tl.dot``) and a slice of the input dimension, dequantizes its weight
  tile in registers and adds its partial sums atomically. The dense weight never exists.
* ``prefill_matmul``: many rows. Tiled GEMM: each program dequantizes ``[BLOCK_K, BLOCK_N]`` weight
  tiles on the fly and accumulates ``tl.dot`` in fp32.
* ``dequantize_t``: the dense ``Wᵀ`` in one launch, for a following dense matmul when the rows are
  so many that dequantizing once beats dequantizing per row tile.

Both read codes as a bit stream, so a 3-bit value that straddles two int32 words is assembled
from both. On CPU they run only under ``TRITON_INTERPRET=1`` (set before this module is imported),
which is how the tests check them against the torch reference. On a GPU each kernel times its
launch configurations per weight shape at first use (``triton.autotune``) and keeps the fastest.
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

# Launch configurations, chosen per (N, K[, row bucket]) by timing them on the GPU at first use.
# The interpreter (CPU tests) gets one small configuration: there is nothing to time.
_DECODE_CONFIGS = [triton.Config({"BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 1})] if _INTERPRET else [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s}, num_warps=w)
    for n, k, s, w in [(64, 64, 1, 4), (64, 64, 4, 4), (64, 128, 8, 4), (128, 64, 2, 4), (128, 64, 4, 4),
                       (128, 128, 4, 4), (128, 128, 8, 8), (256, 64, 4, 8), (256, 64, 8, 8), (256, 128, 16, 8),
                       (32, 128, 4, 2), (64, 256, 16, 4)]
][: None if _TUNE else 1]
_PREFILL_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32})] if _INTERPRET else [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
    for m, n, k, w, st in [(32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 32, 4, 4), (128, 128, 32, 8, 3),
                           (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 32, 8, 4), (16, 128, 128, 4, 3)]
][: None if _TUNE else 1]


@triton.jit
def _extract(ptr, bitpos, base, stride, mask, BITS: tl.constexpr):
    """Codes at stream bit ``bitpos`` of the words at ``ptr + base + word·stride``."""
    word = bitpos // 32
    off = bitpos % 32
    w0 = tl.load(ptr + base + word * stride, mask=mask, other=0).to(tl.uint32, bitcast=True)
    if 32 % BITS == 0:  # 2/4/8 bits: a code never straddles two words
        value = w0 >> off.to(tl.uint32)
    else:
        spill = (off + BITS) > 32
        w1 = tl.load(ptr + base + (word + 1) * stride, mask=mask & spill, other=0).to(tl.uint32, bitcast=True)
        value = (w0 >> off.to(tl.uint32)) | tl.where(spill, w1 << ((32 - off) % 32).to(tl.uint32), 0)
    return (value & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, N, K, zero_words,
                  BITS: tl.constexpr):
    """``Wᵀ`` tile [len(offs_k), len(offs_n)] in fp32; zero outside the matrix."""
    mask_k = offs_k < K
    mask = mask_k[:, None] & (offs_n < N)[None, :]
    q = _extract(qweight_ptr, offs_k[:, None] * BITS, offs_n[None, :], N, mask, BITS)
    g = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
    z = _extract(qzeros_ptr, offs_n[None, :] * BITS, g[:, None] * zero_words, 1, mask, BITS)
    s = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    return (q - z).to(tl.float32) * s


@triton.autotune(configs=_DECODE_CONFIGS, key=["N", "K", "BLOCK_M"], reset_to_zero=["out_ptr"])
@triton.jit
def _decode_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr, M, N, K, zero_words,
                   BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                   SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    if BLOCK_M == 1:  # one row: a multiply and a reduction, no tensor cores to pad for
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + pid_m * K + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            w = _dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, N, K, zero_words, BITS)
            acc += tl.sum(x[:, None] * w, axis=0)
        tl.atomic_add(out_ptr + pid_m * N + offs_n, acc, mask=offs_n < N)
    else:  # up to BLOCK_M rows share each dequantized tile (tl.dot pads them to the MMA shape)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                        mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0)
            w = _dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, N, K, zero_words, BITS)
            acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
        tl.atomic_add(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc,
                      mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.autotune(configs=_PREFILL_CONFIGS, key=["N", "K", "m_bucket"])
@triton.jit
def _prefill_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr, M, N, K, zero_words, m_bucket,
                    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m < M)[:, None] & (offs_k < K)[None, :],
                    other=0.0)
        w = _dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, N, K, zero_words, BITS)
        acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_kernel(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr, N, K, zero_words,
                    BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, N, K, zero_words, BITS)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: Tensor, qweight: Tensor, scales: Tensor) -> tuple[int, int, int]:
    if x.dim() != 2:
        raise ValueError(f"x must be [rows, in_features], got {tuple(x.shape)}")
    return x.shape[0], scales.shape[1], x.shape[1]


def decode_matmul(x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int) -> Tensor:
    """``x`` [M, K] (M small) → ``x @ Wᵀ`` [M, N] in ``x.dtype``. One row per program for M = 1, else
    16 rows (``tl.dot``'s smallest tile) share each dequantized weight tile."""
    M, N, K = _check(x, qweight, scales)
    x = x.contiguous()
    block_m = 1 if M == 1 else 16
    out = torch.zeros(M, N, device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"], triton.cdiv(M, block_m))
    _decode_kernel[grid](x, qweight, qzeros, scales, g_idx, out, M, N, K, qzeros.shape[1], BITS=bits, BLOCK_M=block_m)
    return out.to(x.dtype)


def prefill_matmul(x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int) -> Tensor:
    """``x`` [M, K] → ``x @ Wᵀ`` [M, N] in ``x.dtype`` (tiled dequantize + ``tl.dot``)."""
    M, N, K = _check(x, qweight, scales)
    x = x.contiguous()
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))
    _prefill_kernel[grid](x, qweight, qzeros, scales, g_idx, out, M, N, K, qzeros.shape[1],
                          triton.next_power_of_2(M), BITS=bits)
    return out


def dequantize_t(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int, in_features: int,
                 dtype: torch.dtype) -> Tensor:
    """Dense ``Wᵀ`` [in, out] in ``dtype``, one launch (for many rows: then one dense matmul)."""
    N, K = scales.shape[1], in_features
    out = torch.empty(K, N, device=qweight.device, dtype=dtype)
    grid = (triton.cdiv(K, 32), triton.cdiv(N, 128))
    _dequant_kernel[grid](qweight, qzeros, scales, g_idx, out, N, K, qzeros.shape[1], BITS=bits, BLOCK_K=32,
                          BLOCK_N=128)
    return out
