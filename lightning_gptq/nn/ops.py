"""Our kernels as dispatcher operators (``lightning_gptq::``), for ``torch.compile`` and ``torch.export``.

``kernels/cpu_gemm.cpp`` defines them in C++ (``lightning_gptq::``) when the kernel library first loads, with fake
implementations for shapes, so a traced graph holds one opaque node per kernel call (no graph break) and the
compiled code calls the C++ kernel through the dispatcher with no Python in between: the same kernels, hence the
same numbers. A quantized layer running eagerly calls the extension directly instead (cheaper still by a few
microseconds, which a one-row decode of a small layer notices); while a graph is traced
(``torch.compiler.is_compiling()``) it calls these.

- ``packed_matmul``: :func:`lightning_gptq.kernels.cpu_gemm.matmul` (``gemm``, ``blocked``, ``int8``, ``int8x2``),
  fp32 ``[..., K] → [..., n_out]``.
- ``packed_dequant_t``: :func:`lightning_gptq.kernels.cpu_gemm.dequantize_t` into a new tensor (the eager path
  writes into a reused per-thread workspace, which a graph must not alias).
- ``dense_gemv``, ``int8_row_gemv``: the LM head's decode kernels (:mod:`lightning_gptq.nn.head`).

- ``triton_matmul``, ``triton_dequantize``: the Triton kernels (:mod:`lightning_gptq.kernels.triton_tiled`),
  defined here in Python. Dynamo cannot trace a Triton launch wrapper with autotuning and split-K zeroing
  (nor the interpreter the CPU tests run it under), so a compiled decode holds each as one opaque node,
  and on CUDA ``mode="reduce-overhead"`` captures the launches in a CUDA graph (autotuning happens in the
  warm-up call, before capture).

None mutates or aliases its inputs; each returns a new tensor. Using the C++ ones needs the kernel built
(``cpu_gemm.unavailable()`` is None), which every layer that calls them has checked; the Triton ones need
``triton`` (a CUDA device, or ``TRITON_INTERPRET=1`` on CPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dense_gemv", "int8_row_gemv", "packed_dequant_t", "packed_matmul", "tracing", "triton_dequantize",
           "triton_matmul"]


def tracing() -> bool:
    """Whether a graph is being traced now (``torch.compile``, ``torch.export``)."""
    return torch.compiler.is_compiling()


def packed_matmul(x: Tensor, perm: Tensor | None, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Tensor | None,
                  bits: int, group_size: int, n_out: int, kernel: int) -> Tensor:
    return torch.ops.lightning_gptq.packed_matmul(x, perm, qweight, scales, zeros, bias, bits, group_size, n_out, kernel)


def packed_dequant_t(qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int,
                     dtype: torch.dtype) -> Tensor:
    return torch.ops.lightning_gptq.packed_dequant_t(qweight, scales, zeros, bits, group_size, dtype)


def dense_gemv(x: Tensor, weight: Tensor) -> Tensor:
    return torch.ops.lightning_gptq.dense_gemv(x, weight)


def int8_row_gemv(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    return torch.ops.lightning_gptq.int8_row_gemv(x, q, scale)


@torch.library.custom_op("lightning_gptq::triton_matmul", mutates_args=())
def triton_matmul(x: Tensor, words: Tensor, scales: Tensor, zeros: Tensor, bits: int, group: int) -> Tensor:
    """:func:`lightning_gptq.kernels.triton_tiled.matmul`: ``x`` [M, K] → fp32 [M, N]."""
    from lightning_gptq.kernels import triton_tiled  # imports triton: only when the op runs

    return triton_tiled.matmul(x, words, scales, zeros, bits, group)


@triton_matmul.register_fake
def _(x, words, scales, zeros, bits, group):
    return x.new_empty(x.shape[0], scales.shape[0], dtype=torch.float32)


@torch.library.custom_op("lightning_gptq::triton_dequantize", mutates_args=())
def triton_dequantize(words: Tensor, scales: Tensor, zeros: Tensor, bits: int, group: int, k: int,
                      dtype: torch.dtype) -> Tensor:
    """:func:`lightning_gptq.kernels.triton_tiled.dequantize`: the dense ``W`` [N, k] in ``dtype``."""
    from lightning_gptq.kernels import triton_tiled

    return triton_tiled.dequantize(words, scales, zeros, bits, group, k, dtype)


@triton_dequantize.register_fake
def _(words, scales, zeros, bits, group, k, dtype):
    return words.new_empty(scales.shape[0], k, dtype=dtype)
