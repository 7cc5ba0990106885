"""The CPU backend built on PyTorch's int4 matmul (``lightning_gptq.kernels.cpu_int4``).

The codes go into the kernel's blocked 4-bit layout (2- and 3-bit codes are valid 4-bit codes),
the input dimension is padded to whole kernel groups and the output dimension to its 64-row
blocks (see ``converted``). Kernels: ``int4`` (bf16 activations through the int4 kernel: the
decode path), ``dense-bf16`` and ``dense-fp32`` (dequantize, then one dense matmul: the prefill
paths; bf16 is fast on CPUs with AMX or AVX512-BF16 and slow elsewhere, which is why ``auto``
measures instead of assuming).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_gptq.kernels import cpu_int4

from .converted import ConvertedQuantLinear
from .quant_linear import Capabilities, register_quant_linear


@register_quant_linear("cpu-int4")
class CpuInt4QuantLinear(ConvertedQuantLinear):
    capabilities = Capabilities(bits=(2, 3, 4), group_multiple=32, devices=("cpu",),
                                rounding="bf16 activations, scales and offsets (int4, dense-bf16)")
    kernels = ("int4", "dense-bf16", "dense-fp32")
    exact = ("dense-fp32",)
    #: bf16 activations, scales and offsets each round at 2⁻⁹ relative; measured worst cases stay below 1%.
    tolerance = 1e-2

    @classmethod
    def unavailable(cls) -> str | None:
        return None if cpu_int4.is_available() else "torch's int4 CPU kernel is missing or its layout changed"

    def convert(self, codes: Tensor) -> None:
        self.k_group = cpu_int4.kernel_group(self.group_size, self.in_features)
        self.k_pad = -(-self.in_features // self.k_group) * self.k_group
        self.n_pad = -(-self.out_features // cpu_int4.ROW_BLOCK) * cpu_int4.ROW_BLOCK
        # Centre narrower codes on the kernel's 8: its offset z' = s·(8 − offset − z) then stays as small
        # as the weight itself instead of cancelling against (q − 8)·s in bf16 (2-bit error 2% → 0.3%).
        self.k_offset = 8 - (1 << (self.bits - 1))
        codes = F.pad(codes + self.k_offset, (0, self.k_pad - self.in_features, 0, self.n_pad - self.out_features))
        self.register_buffer("k_weight", cpu_int4.pack(codes), persistent=False)
        scales, zeros = self._kernel_grid(torch.float32)
        self.register_buffer("k_scales_zeros", cpu_int4.scales_and_zeros(scales, zeros), persistent=False)

    def _kernel_grid(self, dtype) -> tuple[Tensor, Tensor]:
        """Per kernel group: scales and zeros in the kernel's code space [k_pad/k_group, n_pad]."""
        n = self.k_pad // self.k_group
        zeros = self.zero_points().to(dtype) + self.k_offset
        return self.kernel_group_rows(self.scales.to(dtype), n, self.k_group), self.kernel_group_rows(zeros, n, self.k_group)

    def kernel_codes(self) -> Tensor:
        return cpu_int4.unpack(self.k_weight, self.n_pad, self.k_pad) - self.k_offset

    def dequantize_kernel_layout(self, dtype: torch.dtype) -> Tensor:
        """Dense ``W`` [n_pad, k_pad] in the kernel's column order."""
        scales, zeros = self._kernel_grid(dtype)
        c = cpu_int4.unpack(self.k_weight, self.n_pad, self.k_pad).to(dtype).view(self.n_pad, -1, self.k_group)
        return ((c - zeros.T[..., None]) * scales.T[..., None]).view(self.n_pad, self.k_pad)

    def compute(self, kernel: str, rows: Tensor, hot: dict[str, Tensor]) -> Tensor:
        if kernel == "int4":
            return cpu_int4.matmul(rows.to(torch.bfloat16), hot["k_weight"], self.k_group, hot["k_scales_zeros"])
        if kernel == "dense-bf16":
            return F.linear(rows.to(torch.bfloat16), self.dequantize_kernel_layout(torch.bfloat16))
        if kernel == "dense-fp32":
            return F.linear(rows.float(), self.dequantize_kernel_layout(torch.float32))
        raise ValueError(f"{self.backend} has no kernel {kernel!r}; it has {self.kernels}")
