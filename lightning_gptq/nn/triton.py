"""The CUDA backend on our Triton kernels (``lightning_gptq.kernels.triton_tiled``), over a layout made for them.

At load the codes are repacked once (``ConvertedQuantLinear``): act-order removed (columns sorted so
groups are contiguous; the input is permuted per call), each output row's codes contiguous along the
input dimension, 2–4-bit codes as nibbles and 5–8-bit as bytes, scales and zeros as fp32 ``[out,
groups]``. Kernels: ``fused`` (the weight dequantized in registers: a split-K GEMV for one row, ``tl.dot``
tiles for more) and ``dequant`` (the dense weight in one launch, then cuBLAS); ``auto`` times both at
each row count and dispatches between them. The checkpoint layout is what ``state_dict`` gives back.
"""

from __future__ import annotations

import importlib.util

import torch.nn.functional as F
from torch import Tensor

from . import ops
from .converted import ConvertedQuantLinear
from .quant_linear import Capabilities, register_quant_linear


def _kernels():
    from lightning_gptq.kernels import triton_tiled  # imports triton: only when this backend runs

    return triton_tiled


@register_quant_linear("triton")
class TritonQuantLinear(ConvertedQuantLinear):
    # the tests run it on CPU under TRITON_INTERPRET=1, built directly (never an `auto` candidate there)
    capabilities = Capabilities(devices=("cuda",), rounding="fp16/bf16 activations: the weight tile in their dtype")
    kernels = ("fused", "dequant")
    exact = ("fused", "dequant")
    #: fp32 accumulation; fp16/bf16 activations round the dequantized tile to their dtype before ``tl.dot``.
    tolerance = 1e-5

    @classmethod
    def unavailable(cls) -> str | None:
        return None if importlib.util.find_spec("triton") is not None else "triton is not installed"

    def convert(self, codes: Tensor) -> None:
        k = _kernels()
        self.k_pad = k.padded_k(self.in_features)
        self.n_pad = self.out_features
        codes = F.pad(codes, (0, self.k_pad - self.in_features))
        self.register_buffer("k_words", k.repack(codes, self.bits), persistent=False)
        self.k_group = self.group_size if self.group_size > 0 else k.PER_ROW
        groups = -(-self.k_pad // self.k_group)  # the padded columns' groups get scale 0: they add nothing
        grid = lambda t: F.pad(t.T.float(), (0, groups - t.shape[0])).contiguous()
        self.register_buffer("k_scales", grid(self.scales), persistent=False)
        self.register_buffer("k_zeros", grid(self.zero_points()), persistent=False)

    def kernel_codes(self) -> Tensor:
        return _kernels().unpack(self.k_words, self.bits)

    def compute(self, kernel: str, rows: Tensor, hot: dict[str, Tensor]) -> Tensor:
        if ops.tracing():  # the same launches as dispatcher ops: dynamo cannot trace Triton's launch wrappers
            matmul, dequantize = ops.triton_matmul, ops.triton_dequantize
        else:
            matmul, dequantize = _kernels().matmul, _kernels().dequantize
        if kernel == "fused":
            return matmul(rows, hot["k_words"], hot["k_scales"], hot["k_zeros"], self.bits, self.k_group)
        if kernel == "dequant":
            w = dequantize(hot["k_words"], hot["k_scales"], hot["k_zeros"], self.bits, self.k_group, self.k_pad, rows.dtype)
            return F.linear(rows, w)
        raise ValueError(f"{self.backend} has no kernel {kernel!r}; it has {self.kernels}")
