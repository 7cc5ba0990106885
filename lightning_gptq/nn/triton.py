"""The CUDA backend: Triton kernels over the ecosystem's packed layout (``lightning_gptq.kernels.triton_gptq``).

It keeps the checkpoint buffers as they are. Kernels: ``decode`` (split-K GEMV for a few rows,
weights dequantized in registers), ``prefill`` (tiled dequantize + ``tl.dot``) and ``dequant``
(the dense weight in one launch, then a dense matmul); ``auto`` times them at each row count and
dispatches between them.
"""

from __future__ import annotations

import importlib.util

from torch import Tensor

from .quant_linear import Capabilities, QuantLinear, register_quant_linear


def _kernels():
    from lightning_gptq.kernels import (
        triton_gptq,  # imports triton: only when this backend runs
    )

    return triton_gptq


@register_quant_linear("triton")
class TritonQuantLinear(QuantLinear):
    # the tests run it on CPU under TRITON_INTERPRET=1, built directly (never an `auto` candidate there)
    capabilities = Capabilities(devices=("cuda",), rounding="fp16/bf16 activations: the weight tile in their dtype")
    kernels = ("decode", "prefill", "dequant")
    exact = ("decode", "prefill", "dequant")
    #: fp32 accumulation; fp16/bf16 activations round the dequantized tile to their dtype before ``tl.dot``.
    tolerance = 1e-5

    @classmethod
    def unavailable(cls) -> str | None:
        return None if importlib.util.find_spec("triton") is not None else "triton is not installed"

    def run(self, kernel: str, x: Tensor) -> Tensor:
        k = _kernels()
        rows = x.reshape(-1, self.in_features)
        if kernel == "decode":
            y = k.decode_matmul(rows, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits)
        elif kernel == "prefill":
            y = k.prefill_matmul(rows, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits)
        elif kernel == "dequant":
            y = rows @ k.dequantize_t(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.in_features,
                                      rows.dtype)
        else:
            raise ValueError(f"{self.backend} has no kernel {kernel!r}; it has {self.kernels}")
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)
