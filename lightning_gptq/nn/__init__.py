"""Torch modules that hold quantized weights, their backends, and ``auto`` backend selection.

``quant_linear``: the layer, its spec and the backend registry; ``cpu_int4``/``cpu_packed``/``cuda_int4``/``triton``/
``converted``: the other backends; ``timing``: how ``auto`` times a candidate; ``selection``: which backend
and kernels a layer spec gets (``autotune_cache``: those choices on disk); ``build``: making layers and
putting them into a model; ``head``: the LM head's decode GEMV (fp32, or int8 rows as an option)."""

from . import cpu_int4 as _cpu_int4  # noqa: F401  (registers the "cpu-int4" backend)
from . import cpu_packed as _cpu_packed  # noqa: F401  (registers the "cpu-packed" backend)
from . import cuda_int4 as _cuda_int4  # noqa: F401  (registers the "cuda-int4" backend)
from . import triton as _triton  # noqa: F401  (registers the "triton" backend)
from .build import build, device_at_hand, make_quant_linear, place, to_backend
from .head import GemvHead, Int8Head, int8_head, int8_head_unsupported, speed_up_head
from .quant_linear import (
    AUTO,
    LayerSpec,
    QuantLinear,
    backend_unavailable_on,
    backends,
    check_backend,
    exact_kernels,
    quant_linear_class,
    register_quant_linear,
    replace_submodule,
)
from .selection import Choice, choices, choose

__all__ = [
    "AUTO", "Choice", "GemvHead", "Int8Head", "LayerSpec", "QuantLinear", "backend_unavailable_on", "backends", "build", "check_backend", "choices", "choose", "exact_kernels",
    "int8_head", "int8_head_unsupported", "make_quant_linear", "quant_linear_class", "register_quant_linear", "replace_submodule",
    "device_at_hand", "place", "speed_up_head", "to_backend",
]
