"""The CPU backend built on our own C++ kernel (``lightning_gptq.kernels.cpu_gemm``).

It computes straight from GPTQ-packed codes (the checkpoint's bit-stream layout, 3-bit runs in the
layout the build decodes cheaply (``cpu_gemm.three_bit_layout``), act-order columns sorted, the input dimension padded
to 32 and the output dimension to 16, cut into tiles of 16 output columns stored one after another)
with fp32 activations and fp32 accumulation: no rounding beyond fp32 summation order, for 2, 3, 4 and 8
bits. Kernels: ``gemm`` (codes decoded in registers once per tile of 16 outputs and reused for up
to 8 input rows: the decode path), ``blocked`` (each 256×16 slice of the weight dequantized once into an
L1 buffer, then a register-blocked fp32 loop runs every input row over it: the prefill path),
``int8x2`` and ``int8`` (the same tiles as ``gemm``, with each run of 32 inputs rounded to two int8
digits, or one, for integer dot products: one AVX-512 VNNI instruction per 64 products), ``dense-bf16``
and ``dense-fp32`` (the same codes expanded into a dense transposed weight by the kernel, then one
library matmul).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_gptq.kernels import cpu_gemm

from . import ops
from .converted import ConvertedQuantLinear
from .quant_linear import Capabilities, register_quant_linear


@register_quant_linear("cpu-packed")
class CpuPackedQuantLinear(ConvertedQuantLinear):
    capabilities = Capabilities(bits=cpu_gemm.BITS, group_multiple=32, devices=("cpu",),
                                rounding="none for gemm, blocked and dense-fp32; int8 activations per 32 inputs (two digits "
                                         "for int8x2, one for int8); bf16 weights and activations for dense-bf16")
    kernels = ("gemm", "blocked", "int8", "int8x2", "dense-bf16", "dense-fp32")
    exact = ("gemm", "blocked", "dense-fp32")
    #: ``gemm``, ``blocked`` and ``dense-fp32`` are exact up to fp32 summation order; ``dense-bf16`` rounds weights
    #: and activations to bf16 (2⁻⁹ relative each); ``int8x2`` rounds each input to a step of
    #: max|x|/(127·254) over its run of 32, ``int8`` to max|x|/127 (about 0.5% of a matmul on Gaussian
    #: inputs, up to 1.1% on a single 96-input row; too coarse for ``auto``, see ``AUTO_TOLERANCE``).
    tolerance = 2e-2
    kernel_tolerance = {"dense-bf16": 1e-2, "int8x2": 1e-4}

    @classmethod
    def unavailable(cls) -> str | None:
        return cpu_gemm.unavailable()

    def convert(self, codes: Tensor) -> None:
        self.k_pad = -(-self.in_features // 32) * 32
        self.n_pad = -(-self.out_features // cpu_gemm.TILE_N) * cpu_gemm.TILE_N
        self.k_group = self.group_size if self.group_size > 0 else self.k_pad
        codes = F.pad(codes, (0, self.k_pad - self.in_features, 0, self.n_pad - self.out_features))
        self.register_buffer("k_qweight", cpu_gemm.pack(codes.T, self.bits), persistent=False)
        n_groups = self.scales.shape[0]
        self.register_buffer("k_scales", self.kernel_group_rows(self.scales.float(), n_groups, self.k_group), persistent=False)
        self.register_buffer("k_zeros", self.kernel_group_rows(self.zero_points().float(), n_groups, self.k_group),
                             persistent=False)

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_shared", None)  # moved or cast: computes alone from here on
        return super()._apply(fn, *args, **kwargs)

    def kernel_codes(self) -> Tensor:
        return cpu_gemm.unpack(self.k_qweight, self.bits, self.k_pad).T

    def _cache_tensors(self) -> None:
        super()._cache_tensors()
        hot = self.__dict__["_hot"]
        bias = hot["bias"]
        # everything but x and the kernel id of a kernel call, prepared once: at one row on small layers the
        # Python around the kernel took as long as the kernel
        self.__dict__["_matmul_args"] = (hot["k_perm"], hot["k_qweight"], hot["k_scales"], hot["k_zeros"], bias,
                                         self.bits, self.k_group, self.out_features)
        self.__dict__["_fp32_bias"] = bias is None or bias.dtype == torch.float32

    def run(self, kernel: str, x: Tensor) -> Tensor:
        kernel_id = cpu_gemm.KERNELS.get(kernel)
        shared = self.__dict__.get("_shared")
        if (shared is not None and x.dtype == torch.float32 and x.numel() <= SharedInput.max_rows * self.in_features
                and (ops.tracing() or not x.is_inference())):  # (an inference tensor has no version to check: alone)
            return shared.output(x, self.__dict__["_shared_index"])
        if kernel_id is not None and x.dtype == torch.float32 and self.__dict__["_fp32_bias"]:
            # one call does the reshape, column order, padding, matmul and bias
            matmul = ops.packed_matmul if ops.tracing() else cpu_gemm.matmul
            return matmul(x, *self.__dict__["_matmul_args"], kernel_id)
        return super().run(kernel, x)

    def compute(self, kernel: str, rows: Tensor, hot: dict[str, Tensor]) -> Tensor:
        if kernel in cpu_gemm.KERNELS:
            matmul = ops.packed_matmul if ops.tracing() else cpu_gemm.matmul
            return matmul(rows.float().contiguous(), None, hot["k_qweight"], hot["k_scales"], hot["k_zeros"], None,
                          self.bits, self.k_group, self.out_features, cpu_gemm.KERNELS[kernel])
        if kernel not in ("dense-bf16", "dense-fp32"):
            raise ValueError(f"{self.backend} has no kernel {kernel!r}; it has {self.kernels}")
        dtype = torch.bfloat16 if kernel == "dense-bf16" else torch.float32
        if ops.tracing():
            wt = ops.packed_dequant_t(hot["k_qweight"], hot["k_scales"], hot["k_zeros"], self.bits, self.k_group, dtype)
            return torch.matmul(rows.to(dtype), wt)
        out = cpu_gemm.WORKSPACE.get(self.k_pad, self.n_pad, dtype)  # lives for this one matmul
        wt = cpu_gemm.dequantize_t(hot["k_qweight"], hot["k_scales"], hot["k_zeros"], self.bits, self.k_group, dtype, out)
        return torch.matmul(rows.to(dtype), wt)


class SharedInput:
    """Layers that read the same input (q/k/v, gate/up) computed by one kernel call for decode-sized inputs.

    The layers' tiles are laid end to end in one tensor (each layer's own ``k_qweight`` becomes a view of its
    slice, so the codes are held once); the first member called with an input computes every member's
    columns and keeps them until each member has taken its own. Each output column is computed as it would be
    alone (same kernel, same inputs), so outputs are bit-identical to separate calls; a member called with
    another input (or the same tensor changed in place) computes afresh, and one called with an inference tensor
    (``torch.inference_mode``: no version counter tells whether it changed) computes alone. Made by :meth:`join`."""

    max_rows = 4

    def __init__(self, layers: list[CpuPackedQuantLinear], kernel_id: int):
        first = layers[0]
        offsets = [0]
        for layer in layers:
            offsets.append(offsets[-1] + layer.out_features)
        self.bounds = list(zip(offsets[:-1], offsets[1:]))
        self.args = (first.k_perm, torch.cat([layer.k_qweight for layer in layers]),
                     torch.cat([layer.k_scales for layer in layers], dim=1).contiguous(),
                     torch.cat([layer.k_zeros for layer in layers], dim=1).contiguous(), None, first.bits,
                     first.k_group, offsets[-1], kernel_id)
        self.x, self.version, self.y, self.taken = None, None, None, set()

    @classmethod
    def join(cls, layers: list[CpuPackedQuantLinear]) -> "SharedInput | None":
        """Share ``layers``' input when they can be one call: the same input size, bits, groups and column order,
        no bias, widths that are whole tiles; otherwise None (nothing changes). Members whose one-row kernels differ
        (``auto`` times each shape on its own, so near-equal kernels split a group by noise) all take the one most of
        them chose (of the C++ kernels), which the shared call runs."""
        if len(layers) < 2 or any(type(layer) is not CpuPackedQuantLinear or "_shared" in layer.__dict__
                                  for layer in layers):
            return None
        first = layers[0]
        chosen = [layer.kernel_for(1) for layer in layers if layer.kernel_for(1) in cpu_gemm.KERNELS]
        if not chosen:
            return None
        kernel = max(chosen, key=lambda k: (chosen.count(k), -chosen.index(k)))
        same = all(layer.in_features == first.in_features and layer.bits == first.bits
                   and layer.k_group == first.k_group and layer.bias is None and layer.out_features % cpu_gemm.TILE_N == 0
                   and layer.k_scales.shape[0] == first.k_scales.shape[0]
                   and ((layer.k_perm is None and first.k_perm is None)
                        or (layer.k_perm is not None and first.k_perm is not None and torch.equal(layer.k_perm, first.k_perm)))
                   for layer in layers)
        if not same:
            return None
        for layer in layers:
            if layer.kernel_for(1) != kernel:  # the entry that serves one row names the group's kernel
                (rows, own), *rest = layer.dispatch
                layer.set_dispatch([(rows, kernel), *rest] if rows == 1 else [(1, kernel), (rows, own), *rest],
                                   layer.exact_dispatch)
        shared = cls(layers, cpu_gemm.KERNELS[kernel])
        qweight, start = shared.args[1], 0
        for index, layer in enumerate(layers):
            tiles = layer.k_qweight.shape[0]
            layer.register_buffer("k_qweight", qweight[start:start + tiles], persistent=False)  # a view: codes held once
            start += tiles
            layer._cache_tensors()
            layer.__dict__["_shared"], layer.__dict__["_shared_index"] = shared, index
        return shared

    def output(self, x: Tensor, index: int) -> Tensor:
        """Member ``index``'s output for input ``x`` [..., K]."""
        tracing = ops.tracing()
        if self.x is not x or (not tracing and self.version != x._version) or index in self.taken:
            self.y = (ops.packed_matmul if tracing else cpu_gemm.matmul)(x, *self.args)
            self.x, self.taken = x, set()
            self.version = None if tracing else x._version
        self.taken.add(index)
        start, stop = self.bounds[index]
        y = self.y[..., start:stop].contiguous()
        if len(self.taken) == len(self.bounds):  # every member served: let the tensors go
            self.x = self.y = None
        return y
