"""Torch-level model access: loading, architecture adapters, block-input capture and replay."""

from lightning_gptq.models.adapters import (
    ArchitectureAdapter,
    UnsupportedArchitectureError,
    get_adapter,
    is_conv1d,
    is_linear,
    linear_in_features,
    linear_out_features,
    linear_weight,
    register_adapter,
    set_weight_out_in,
    weight_out_in,
)
from lightning_gptq.models.capture import (
    BlockInputs,
    capture_block_inputs,
    check_replay,
    estimate_activation_bytes,
    forward_blocks,
    run_block,
)
from lightning_gptq.models.experts import ExpertBank, unfuse_experts
from lightning_gptq.models.loading import ModelLoadError, load_causal_lm

__all__ = [
    "ArchitectureAdapter",
    "BlockInputs",
    "ExpertBank",
    "ModelLoadError",
    "UnsupportedArchitectureError",
    "capture_block_inputs",
    "check_replay",
    "estimate_activation_bytes",
    "forward_blocks",
    "get_adapter",
    "is_conv1d",
    "is_linear",
    "linear_in_features",
    "linear_out_features",
    "linear_weight",
    "load_causal_lm",
    "register_adapter",
    "run_block",
    "set_weight_out_in",
    "unfuse_experts",
    "weight_out_in",
]
