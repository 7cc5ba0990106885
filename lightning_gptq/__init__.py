"""lightning-gptq: GPTQ post-training quantization of causal LMs as a PyTorch Lightning fit loop."""

from ._unshadow import import_hf_kernels_first

import_hf_kernels_first()  # before anything imports transformers

from .quant import (
    DampingIncreasedWarning,
    HessianAccumulator,
    HessianNotPositiveDefiniteError,
    MismatchAccumulator,
    NonFiniteError,
    QuantConfig,
    QuantConfigError,
    QuantizedWeight,
    gptq_quantize,
    rtn_quantize,
)

from .api import load_quantized, quantize, save_compressed_tensors, save_gguf, save_quantized

__version__ = "0.1.0"

__all__ = [
    "DampingIncreasedWarning",
    "HessianAccumulator",
    "HessianNotPositiveDefiniteError",
    "MismatchAccumulator",
    "NonFiniteError",
    "QuantConfig",
    "QuantConfigError",
    "QuantizedWeight",
    "__version__",
    "gptq_quantize",
    "load_quantized",
    "quantize",
    "rtn_quantize",
    "save_compressed_tensors",
    "save_gguf",
    "save_quantized",
]
