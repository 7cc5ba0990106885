"""Torch modules that hold quantized weights."""

from .quant_linear import QuantLinear, make_quant_linear, quant_linear_class, register_quant_linear, replace_submodule

__all__ = ["QuantLinear", "make_quant_linear", "quant_linear_class", "register_quant_linear", "replace_submodule"]
