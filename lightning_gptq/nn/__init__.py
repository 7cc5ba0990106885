"""Torch modules that hold quantized weights, their backends, and ``auto`` backend selection."""

from . import cpu_int4 as _cpu_int4  # noqa: F401  (registers the "cpu-int4" backend)
from . import cpu_packed as _cpu_packed  # noqa: F401  (registers the "cpu-packed" backend)
from . import triton as _triton  # noqa: F401  (registers the "triton" backend)
from .autotune import Choice, build, choices, choose, make_quant_linear, random_layer, to_backend
from .head import GemvHead, speed_up_head
from .quant_linear import (
    AUTO,
    LayerSpec,
    QuantLinear,
    backends,
    check_backend,
    exact_kernels,
    quant_linear_class,
    register_quant_linear,
    replace_submodule,
)

__all__ = [
    "AUTO", "Choice", "GemvHead", "LayerSpec", "QuantLinear", "backends", "build", "check_backend", "choices", "choose", "exact_kernels",
    "make_quant_linear", "quant_linear_class", "random_layer", "register_quant_linear", "replace_submodule",
    "speed_up_head", "to_backend",
]
