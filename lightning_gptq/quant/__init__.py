"""Pure GPTQ algorithm: grids, Hessians, the blocked Cholesky solver. No Lightning, no models."""

from .config import QuantConfig, QuantConfigError
from .gptq import (
    DampingIncreasedWarning,
    HessianNotPositiveDefiniteError,
    NonFiniteError,
    QuantizedWeight,
    gptq_quantize,
    inverse_hessian_cholesky,
    rtn_quantize,
)
from .grid import dequantize_codes, fit_grid, quantize_codes
from .hessian import HessianAccumulator, MismatchAccumulator

__all__ = [
    "DampingIncreasedWarning",
    "HessianAccumulator",
    "HessianNotPositiveDefiniteError",
    "MismatchAccumulator",
    "NonFiniteError",
    "QuantConfig",
    "QuantConfigError",
    "QuantizedWeight",
    "dequantize_codes",
    "fit_grid",
    "gptq_quantize",
    "inverse_hessian_cholesky",
    "quantize_codes",
    "rtn_quantize",
]
