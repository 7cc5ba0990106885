"""The CPU backend built on PyTorch's int4 matmul (``lightning_gptq.kernels.cpu_int4``).

At ``post_init`` the packed ``qweight`` is converted once into the kernel's layout and dropped:
act-order columns are permuted so every group is a contiguous run (the input is permuted the same
way on each call), the input dimension is zero-padded to whole kernel groups (a ragged last group
such as SmolLM2's 576 = 4·128 + 64) and the output dimension to the kernel's 64-row blocks.
``state_dict`` rebuilds the ecosystem's ``qweight`` from that layout, so a saved model is unchanged.

Kernels: ``int4`` (bf16 activations through the int4 kernel: the decode path), ``dense-bf16`` and
``dense-fp32`` (dequantize, then one dense matmul: the prefill paths; bf16 is fast on CPUs with
AMX or AVX512-BF16 and slow elsewhere, which is why ``auto`` measures instead of assuming).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_gptq.kernels import cpu_int4
from lightning_gptq.kernels.packing import pack_rows, unpack_rows

from .quant_linear import LayerSpec, QuantLinear, register_quant_linear


@register_quant_linear("cpu-int4")
class CpuInt4QuantLinear(QuantLinear):
    kernels = ("int4", "dense-bf16", "dense-fp32")
    #: bf16 activations, scales and offsets each round at 2⁻⁹ relative; measured worst cases stay below 1%.
    tolerance = 1e-2

    @classmethod
    def unsupported(cls, spec: LayerSpec) -> str | None:
        if spec.device != "cpu":
            return "CPU only"
        if spec.bits > 4:
            return "bits > 4"
        if cpu_int4.kernel_group(spec.group_size, spec.in_features) is None:
            return f"group size {spec.group_size} is not a multiple of 32"
        if not cpu_int4.is_available():
            return "torch's int4 CPU kernel is missing or its layout changed"
        return None

    def post_init(self) -> None:
        if self.qweight is None:  # already converted (e.g. a repeated post_init)
            return
        k_group = cpu_int4.kernel_group(self.group_size, self.in_features)
        width = self.group_size if self.group_size > 0 else self.in_features
        perm = None
        if self.contiguous_group_size() is None:
            perm = torch.argsort(self.g_idx.long(), stable=True)
            if not torch.equal(self.g_idx.long()[perm], torch.arange(self.in_features, device=perm.device) // width):
                raise ValueError(f"{self.backend}: g_idx does not form groups of {width} columns; use backend='torch'")
        codes = unpack_rows(self.qweight, self.bits, self.in_features).T.to(torch.int32)  # [out, in]
        if perm is not None:
            codes = codes[:, perm]
        n_pad = -(-self.out_features // cpu_int4.ROW_BLOCK) * cpu_int4.ROW_BLOCK
        k_pad = -(-self.in_features // k_group) * k_group
        # Centre narrower codes on the kernel's 8: its offset z' = s·(8 − offset − z) then stays as small
        # as the weight itself instead of cancelling against (q − 8)·s in bf16 (2-bit error 2% → 0.5%).
        self.k_offset = 8 - (1 << (self.bits - 1))
        codes = F.pad(codes + self.k_offset, (0, k_pad - self.in_features, 0, n_pad - self.out_features))
        self.k_group, self.k_pad, self.n_pad = k_group, k_pad, n_pad
        # kernel group j covers sorted columns [j·k_group, (j+1)·k_group), all inside GPTQ group j·k_group // width
        src = torch.clamp(torch.arange(k_pad // k_group) * k_group // width, max=self.scales.shape[0] - 1).to(self.scales.device)
        self.register_buffer("k_src_group", src, persistent=False)
        self.register_buffer("k_perm", perm, persistent=False)
        self.register_buffer("k_weight", cpu_int4.pack(codes), persistent=False)
        scales, zeros = self._kernel_grid(torch.float32)
        self.register_buffer("k_scales_zeros", cpu_int4.scales_and_zeros(scales, zeros), persistent=False)
        self.qweight = None  # one copy: the kernel layout

    def _kernel_grid(self, dtype) -> tuple[Tensor, Tensor]:
        """Per kernel group: scales and zeros in the kernel's code space [k_pad/k_group, n_pad]."""
        pad = (0, self.n_pad - self.out_features)
        zeros = self.zero_points()[self.k_src_group].to(dtype) + self.k_offset
        return F.pad(self.scales[self.k_src_group].to(dtype), pad), F.pad(zeros, pad)

    # -- the ecosystem layout back ----------------------------------------------------------------
    def _kernel_codes(self) -> Tensor:
        return cpu_int4.unpack(self.k_weight, self.n_pad, self.k_pad)  # [n_pad, k_pad], sorted columns, offset

    def packed_tensors(self) -> dict[str, Tensor]:
        codes = self._kernel_codes()[: self.out_features, : self.in_features] - self.k_offset
        if self.k_perm is not None:
            codes = codes[:, torch.argsort(self.k_perm)]
        return {"qweight": pack_rows(codes.T, self.bits), "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "qweight"] = self.packed_tensors()["qweight"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "qweight"
        if key in state_dict:  # back to the ecosystem layout, then convert again
            self.qweight = torch.empty_like(state_dict[key], device=self.scales.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- compute ----------------------------------------------------------------------------------
    def _rows(self, x: Tensor) -> Tensor:
        """``x`` [..., in] → [m, k_pad] in the kernel's column order."""
        if x.device.type != "cpu":
            raise RuntimeError(f"{self.backend} runs on CPU only; load the model with backend='auto' on {x.device}")
        x = x.reshape(-1, self.in_features)
        if self.k_perm is not None:
            x = x.index_select(1, self.k_perm)
        return x if self.k_pad == self.in_features else F.pad(x, (0, self.k_pad - self.in_features))

    def dequantize_kernel_layout(self, dtype: torch.dtype) -> Tensor:
        """Dense ``W`` [n_pad, k_pad] in the kernel's column order."""
        scales, zeros = self._kernel_grid(dtype)
        c = self._kernel_codes().to(dtype).view(self.n_pad, -1, self.k_group)
        return ((c - zeros.T[..., None]) * scales.T[..., None]).view(self.n_pad, self.k_pad)

    def run(self, kernel: str, x: Tensor) -> Tensor:
        shape, dtype = x.shape, x.dtype
        rows = self._rows(x)
        if kernel == "int4":
            y = cpu_int4.matmul(rows.to(torch.bfloat16).contiguous(), self.k_weight, self.k_group, self.k_scales_zeros)
        elif kernel == "dense-bf16":
            y = F.linear(rows.to(torch.bfloat16), self.dequantize_kernel_layout(torch.bfloat16))
        elif kernel == "dense-fp32":
            y = F.linear(rows.float(), self.dequantize_kernel_layout(torch.float32))
        else:
            raise ValueError(f"{self.backend} has no kernel {kernel!r}; it has {self.kernels}")
        if self.n_pad != self.out_features:
            y = y[:, : self.out_features]
        y = y.to(dtype)
        if self.bias is not None:
            y += self.bias
        return y.view(*shape[:-1], self.out_features)
