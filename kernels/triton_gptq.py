"""Triton kernels for the GPTQ packed layout (``packing``): any bits 2–8, groups, ``g_idx``, ragged groups.

* ``decode_matmul``: batch 1–16. Split-K GEMV: each program owns ``BLOCK_N`` outputs of one input
  row and a slice of the input dimension, dequantizes its weight tile in registers and adds its
  partial sums atomically. The dense weight never exists.
* ``prefill_matmul``: many rows. Tiled GEMM: each program dequantizes ``[BLOCK_K, BLOCK_N]`` weight
  tiles on the fly and accumulates ``tl.dot`` in fp32.

Both read codes as a bit stream, so a 3-bit value that straddles two int32 words is assembled
from both. On CPU they run only under ``TRITON_INTERPRET=1`` (set before this module is imported),
which is how the tests check them against the torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _extract(ptr, bitpos, base, stride, mask, BITS: tl.constexpr):
    """Codes at stream bit ``bitpos`` of the words at ``ptr + base + word·stride``."""
    word = bitpos // 32
    off = bitpos % 32
    w0 = tl.load(ptr + base + word * stride, mask=mask, other=0).to(tl.uint32, bitcast=True)
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


@triton.jit
def _decode_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr, N, K, zero_words, k_per_split,
                   BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * K + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        w = _dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, N, K, zero_words, BITS)
        acc += tl.sum(x[:, None] * w, axis=0)
    tl.atomic_add(out_ptr + row * N + offs_n, acc, mask=offs_n < N)


@triton.jit
def _prefill_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr, M, N, K, zero_words,
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


def _check(x: Tensor, qweight: Tensor, scales: Tensor) -> tuple[int, int, int]:
    if x.dim() != 2:
        raise ValueError(f"x must be [rows, in_features], got {tuple(x.shape)}")
    return x.shape[0], scales.shape[1], x.shape[1]


def decode_matmul(x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int,
                  *, block_k: int = 64, block_n: int = 64, split_k: int | None = None) -> Tensor:
    """``x`` [M, K] (M small) → ``x @ Wᵀ`` [M, N] in ``x.dtype``."""
    M, N, K = _check(x, qweight, scales)
    x = x.contiguous()
    if split_k is None:  # enough programs to fill a GPU even when N is narrow
        split_k = max(1, min(16, triton.cdiv(K, 4 * block_k)))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    out = torch.zeros(M, N, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(N, block_n), split_k, M)
    _decode_kernel[grid](x, qweight, qzeros, scales, g_idx, out, N, K, qzeros.shape[1], k_per_split,
                         BITS=bits, BLOCK_K=block_k, BLOCK_N=block_n)
    return out.to(x.dtype)


def prefill_matmul(x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int,
                   *, block_m: int = 32, block_n: int = 64, block_k: int = 32) -> Tensor:
    """``x`` [M, K] → ``x @ Wᵀ`` [M, N] in ``x.dtype`` (tiled dequantize + ``tl.dot``)."""
    M, N, K = _check(x, qweight, scales)
    x = x.contiguous()
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _prefill_kernel[grid](x, qweight, qzeros, scales, g_idx, out, M, N, K, qzeros.shape[1],
                          BITS=bits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
