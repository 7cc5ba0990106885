"""The C++ CPU kernels as torch custom ops, for ``torch.compile`` and ``torch.export``.

A quantized layer calls the extension directly when it runs eagerly: a custom op's dispatch costs
microseconds, which a one-row decode of a small layer cannot spare. While a graph is being traced
(``torch.compiler.is_compiling()``) it calls these instead, so the trace holds one opaque node per
kernel call (no graph break) with a fake implementation for shapes: the compiled graph runs the same
kernels, hence the same numbers.

- ``lightning_gptq::packed_matmul``: :func:`lightning_gptq.kernels.cpu_gemm.matmul` (``gemm``,
  ``blocked``, ``int8``, ``int8x2``), fp32 ``[..., K] → [..., n_out]``.
- ``lightning_gptq::packed_dequant_t``: :func:`lightning_gptq.kernels.cpu_gemm.dequantize_t` into a new
  tensor (the eager path writes into a reused per-thread workspace, which a graph must not alias).

Neither mutates or aliases its inputs; both return new tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gptq.kernels import cpu_gemm

__all__ = ["packed_dequant_t", "packed_matmul", "tracing"]


def tracing() -> bool:
    """Whether a graph is being traced now (``torch.compile``, ``torch.export``)."""
    return torch.compiler.is_compiling()


@torch.library.custom_op("lightning_gptq::packed_matmul", mutates_args=(), device_types="cpu")
def packed_matmul(x: Tensor, perm: Tensor | None, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Tensor | None,
                  bits: int, group_size: int, n_out: int, kernel: int) -> Tensor:
    return cpu_gemm.matmul(x, perm, qweight, scales, zeros, bias, bits, group_size, n_out, kernel)


@packed_matmul.register_fake
def _(x, perm, qweight, scales, zeros, bias, bits, group_size, n_out, kernel):
    return x.new_empty((*x.shape[:-1], n_out))


@torch.library.custom_op("lightning_gptq::packed_dequant_t", mutates_args=(), device_types="cpu")
def packed_dequant_t(qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int,
                     dtype: torch.dtype) -> Tensor:
    return cpu_gemm.dequantize_t(qweight, scales, zeros, bits, group_size, dtype)


@packed_dequant_t.register_fake
def _(qweight, scales, zeros, bits, group_size, dtype):
    tiles, words, _ = qweight.shape
    return qweight.new_empty((words * 32 // bits, tiles * cpu_gemm.TILE_N), dtype=dtype)
