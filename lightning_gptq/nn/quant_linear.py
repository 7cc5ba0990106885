"""Quantized replacements for ``nn.Linear`` (and GPT-2's ``Conv1D``) and the registry that picks one.

A backend is a ``QuantLinear`` subclass registered under a name; the callbacks only ever call
``make_quant_linear(..., backend=name)``, so a kernel-backed layer drops in by registering itself.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from lightning_gptq.kernels import torch_ref


class QuantLinear(nn.Module):
    """A linear layer whose weight is held as GPTQ codes; computes ``x @ Wᵀ + b``.

    Buffers: ``codes`` uint8 [out, in], ``scales`` [out, n_groups], ``zeros`` int32 [out, n_groups],
    ``g_idx`` int32 [in], ``bias`` [out] or None. This base class dequantizes the whole weight on each
    call with the plain-torch reference; faster backends override ``forward``.
    """

    backend = "torch"

    def __init__(self, in_features: int, out_features: int, n_groups: int, *, bits: int, group_size: int,
                 sym: bool, bias: bool, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.int32, device=device))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_quantized(cls, qweight, bias: Tensor | None = None) -> "QuantLinear":
        """Build from a solver result (anything with codes/scales/zeros/g_idx/bits/group_size/sym/dtype)."""
        out_features, in_features = qweight.codes.shape
        layer = cls(in_features, out_features, qweight.scales.shape[1], bits=qweight.bits, group_size=qweight.group_size,
                    sym=qweight.sym, bias=bias is not None, dtype=qweight.dtype, device=qweight.codes.device)
        layer.codes.copy_(qweight.codes)
        layer.scales.copy_(qweight.scales.to(qweight.dtype))
        layer.zeros.copy_(qweight.zeros)
        layer.g_idx.copy_(qweight.g_idx)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def weight(self) -> Tensor:
        """The dequantized weight [out, in], for code that reads ``.weight`` (a fresh tensor each time)."""
        return self.dequantize()

    def contiguous_group_size(self) -> int | None:
        """The group width when ``g_idx`` is the plain ``i // group_size`` (no act-order reordering)."""
        width = self.group_size if self.group_size > 0 else self.in_features
        natural = torch.arange(self.in_features, device=self.g_idx.device) // width
        return width if torch.equal(self.g_idx.long(), natural) else None

    def dequantize(self) -> Tensor:
        """The dense weight [out, in] this layer represents."""
        return torch_ref.dequantize(self.codes, self.scales, self.zeros, self.g_idx, group_size=self.contiguous_group_size())

    def forward(self, x: Tensor) -> Tensor:
        return torch_ref.quant_matmul(x, self.codes, self.scales, self.zeros, self.g_idx, self.bias,
                                      group_size=self.contiguous_group_size())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, bias={self.bias is not None}, backend={self.backend}")


_BACKENDS: dict[str, type[QuantLinear]] = {"torch": QuantLinear}


def register_quant_linear(name: str) -> Callable[[type[QuantLinear]], type[QuantLinear]]:
    """Class decorator: make a ``QuantLinear`` subclass selectable as ``backend=name``."""

    def register(cls: type[QuantLinear]) -> type[QuantLinear]:
        cls.backend = name
        _BACKENDS[name] = cls
        return cls

    return register


def quant_linear_class(backend: str) -> type[QuantLinear]:
    if backend not in _BACKENDS:
        raise ValueError(f"unknown quantized-linear backend {backend!r}; available: {sorted(_BACKENDS)}")
    return _BACKENDS[backend]


def make_quant_linear(original: nn.Module, qweight, backend: str = "torch") -> QuantLinear:
    """A quantized layer standing in for ``original`` (``nn.Linear`` or GPT-2 ``Conv1D``)."""
    bias = getattr(original, "bias", None)
    return quant_linear_class(backend).from_quantized(qweight, bias)


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted path ``name`` under ``root``; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
