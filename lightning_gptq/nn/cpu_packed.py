"""The CPU backend built on our own C++ kernel (``lightning_gptq.kernels.cpu_gemm``).

It computes straight from GPTQ-packed codes (the checkpoint's bit-stream layout, act-order
columns sorted, the input dimension padded to 32 and the output dimension to 16, cut into tiles
of 16 output columns stored one after another) with fp32
activations and fp32 accumulation: no rounding beyond fp32 summation order, for 2, 3, 4 and 8
bits. Kernels: ``gemm`` (codes decoded in registers once per tile of 16 outputs and reused for up
to 8 input rows: the decode path), ``dense-bf16`` and ``dense-fp32`` (the same code expanded into
a dense transposed weight by the kernel, then one library matmul: the prefill paths).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_gptq.kernels import cpu_gemm
from lightning_gptq.kernels.packing import pack_rows, unpack_rows

from .converted import ConvertedQuantLinear
from .quant_linear import Capabilities, register_quant_linear


@register_quant_linear("cpu-packed")
class CpuPackedQuantLinear(ConvertedQuantLinear):
    capabilities = Capabilities(bits=cpu_gemm.BITS, group_multiple=32, devices=("cpu",),
                                rounding="none for gemm and dense-fp32; bf16 weights and activations for dense-bf16")
    kernels = ("gemm", "dense-bf16", "dense-fp32")
    exact = ("gemm", "dense-fp32")
    #: ``gemm`` and ``dense-fp32`` are exact up to fp32 summation order; ``dense-bf16`` rounds weights
    #: and activations to bf16 (2⁻⁹ relative each).
    tolerance = 1e-2

    @classmethod
    def unavailable(cls) -> str | None:
        return cpu_gemm.unavailable()

    def convert(self, codes: Tensor) -> None:
        self.k_pad = -(-self.in_features // 32) * 32
        self.n_pad = -(-self.out_features // cpu_gemm.TILE_N) * cpu_gemm.TILE_N
        self.k_group = self.group_size if self.group_size > 0 else self.k_pad
        codes = F.pad(codes, (0, self.k_pad - self.in_features, 0, self.n_pad - self.out_features))
        self.register_buffer("k_qweight", cpu_gemm.tile(pack_rows(codes.T, self.bits)), persistent=False)
        n_groups = self.scales.shape[0]
        self.register_buffer("k_scales", self.kernel_group_rows(self.scales.float(), n_groups, self.k_group), persistent=False)
        self.register_buffer("k_zeros", self.kernel_group_rows(self.zero_points().float(), n_groups, self.k_group),
                             persistent=False)

    def kernel_codes(self) -> Tensor:
        return unpack_rows(cpu_gemm.untile(self.k_qweight), self.bits, self.k_pad).T

    def compute(self, kernel: str, rows: Tensor, hot: dict[str, Tensor]) -> Tensor:
        if kernel == "gemm":
            return cpu_gemm.gemm(rows.float().contiguous(), hot["k_qweight"], hot["k_scales"], hot["k_zeros"], self.bits,
                                 self.k_group, self.out_features)
        if kernel not in ("dense-bf16", "dense-fp32"):
            raise ValueError(f"{self.backend} has no kernel {kernel!r}; it has {self.kernels}")
        dtype = torch.bfloat16 if kernel == "dense-bf16" else torch.float32
        out = cpu_gemm.WORKSPACE.get(self.k_pad, self.n_pad, dtype)  # lives for this one matmul
        wt = cpu_gemm.dequantize_t(hot["k_qweight"], hot["k_scales"], hot["k_zeros"], self.bits, self.k_group, dtype, out)
        return torch.matmul(rows.to(dtype), wt)
