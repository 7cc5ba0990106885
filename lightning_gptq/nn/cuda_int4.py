"""The CUDA backend built on PyTorch's int4 matmul (``lightning_gptq.kernels.cuda_int4``; torchao's int4
weight-only path runs on the same kernel).

As ``cpu-int4`` on CPU: the codes go into the kernel's tiled 4-bit layout once (2/3-bit codes as 4-bit
ones, centred on the kernel's 8), act-order is removed at load (columns sorted so groups are contiguous;
the input is permuted per call), the input dimension is padded to whole kernel tiles. Kernels: ``int4``
(bf16 activations through the int4 kernel), ``dense`` (the weight dequantized in the activations' dtype,
then one ``F.linear``: the dense fallback ``auto`` takes where the int4 kernel is slower) and
``dense-fp32`` (the exact path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_gptq.kernels import cuda_int4

from .converted import ConvertedQuantLinear
from .quant_linear import Capabilities, register_quant_linear


@register_quant_linear("cuda-int4")
class CudaInt4QuantLinear(ConvertedQuantLinear):
    capabilities = Capabilities(bits=(2, 3, 4), group_multiple=32, devices=("cuda",),
                                rounding="bf16 activations, scales and offsets (int4); the activations' dtype (dense)")
    kernels = ("int4", "dense", "dense-fp32")
    exact = ("dense-fp32",)
    #: bf16 activations, scales and offsets each round at 2⁻⁹ relative (as ``cpu-int4``).
    tolerance = 1e-2

    @classmethod
    def unavailable(cls) -> str | None:
        # checked on this process's GPU (each process of a run on several GPUs has its own), not on GPU 0
        return cuda_int4.unavailable(torch.cuda.current_device() if torch.cuda.is_available() else 0)

    def convert(self, codes: Tensor) -> None:
        self.k_group = cuda_int4.kernel_group(self.group_size, self.in_features)
        self.k_tiles, self.k_pad = cuda_int4.tiles_for(self.in_features, self.k_group)
        self.n_pad = -(-self.out_features // cuda_int4.ROW_MULTIPLE) * cuda_int4.ROW_MULTIPLE
        self.k_offset = 8 - (1 << (self.bits - 1))  # narrower codes centred on the kernel's 8 (see cpu_int4)
        codes = F.pad(codes + self.k_offset, (0, self.k_pad - self.in_features, 0, self.n_pad - self.out_features))
        self.register_buffer("k_weight", cuda_int4.pack(codes, self.k_tiles), persistent=False)
        cuda_int4.tile_order(self.k_tiles, codes.device)  # learned now, not inside a traced graph (a data-dependent check)
        scales, zeros = self._kernel_grid(torch.float32)
        self.register_buffer("k_scales_zeros", cuda_int4.scales_and_zeros(scales, zeros), persistent=False)

    def _kernel_grid(self, dtype) -> tuple[Tensor, Tensor]:
        """Per kernel group: scales and zeros in the kernel's code space [k_pad/k_group, n_pad]."""
        n = self.k_pad // self.k_group
        zeros = self.zero_points().to(dtype) + self.k_offset
        return self.kernel_group_rows(self.scales.to(dtype), n, self.k_group), self.kernel_group_rows(zeros, n, self.k_group)

    def kernel_codes(self) -> Tensor:
        return cuda_int4.unpack(self.k_weight, self.n_pad, self.k_pad, self.k_tiles).to(torch.int32) - self.k_offset

    def dequantize_kernel_layout(self, dtype: torch.dtype) -> Tensor:
        """Dense ``W`` [n_pad, k_pad] in the kernel's column order (for the dense kernels)."""
        scales, zeros = self._kernel_grid(dtype)
        c = cuda_int4.unpack(self.k_weight, self.n_pad, self.k_pad, self.k_tiles).to(dtype).view(self.n_pad, -1, self.k_group)
        return ((c - zeros.T[..., None]) * scales.T[..., None]).view(self.n_pad, self.k_pad)

    def compute(self, kernel: str, rows: Tensor, hot: dict[str, Tensor]) -> Tensor:
        if kernel == "int4":
            return cuda_int4.matmul(rows.to(torch.bfloat16).contiguous(), hot["k_weight"], self.k_group,
                                    hot["k_scales_zeros"])
        if kernel == "dense":
            return F.linear(rows, self.dequantize_kernel_layout(rows.dtype))
        if kernel == "dense-fp32":
            return F.linear(rows.float(), self.dequantize_kernel_layout(torch.float32))
        raise ValueError(f"{self.backend} has no kernel {kernel!r}; it has {self.kernels}")
