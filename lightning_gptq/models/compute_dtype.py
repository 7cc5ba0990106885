"""The dtype calibration passes run a block in: the model's own, or a faster one where this machine has it.

``calibration_dtype="auto"`` times one matmul of a block's MLP shape (``[2048, hidden] × [hidden,
intermediate]``) in fp32 and in bf16 on this machine and takes bf16 when it is at least
``AUTO_SPEEDUP`` times faster (AVX-512-BF16 / AMX CPUs, GPUs); elsewhere (AVX2-only CPUs run bf16
matmuls 10-100x slower than fp32) the model's dtype. ``running_in(block, dtype)`` runs a block in
another dtype without touching its weights: the solve still reads the model's own.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_gptq.nn.timing import time_call

from .capture import map_tensors, module_device_dtype

log = logging.getLogger("lightning_gptq")

#: bf16 must beat fp32 by this much on the block's matmul shape: the block's attention, norms and
#: activations gain less than its matmuls (SmolLM2 block at 2048 tokens: matmul 4.5x, whole block 2.1x).
AUTO_SPEEDUP = 2.0


@functools.lru_cache(maxsize=None)
def matmul_speedup(dtype: torch.dtype, rows: int, inner: int, cols: int, device: str = "cpu") -> float:
    """fp32 time / ``dtype`` time of a ``[rows, inner] × [inner, cols]`` matmul here (``time_call``'s median)."""
    def seconds(d: torch.dtype) -> float:
        a = torch.randn(rows, inner, device=device).to(d)
        b = torch.randn(inner, cols, device=device).to(d)
        return time_call(lambda: a @ b, device=device, budget_s=0.25)

    return seconds(torch.float32) / seconds(dtype)


def resolve_calibration_dtype(setting: str | None, model: nn.Module,
                              device: torch.device | str = "cpu") -> torch.dtype | None:
    """``None`` (run ``model``'s blocks as loaded), or the dtype ``setting`` (``None``, ``"float64"``,
    ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"``) asks for; ``auto`` decides by timing (module
    docstring). A dtype wider than the model's runs the whole calibration stream (``CalibrationDriver``)."""
    config, model_dtype = model.config, module_device_dtype(model)[1]
    if setting is None:
        return None
    names = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if setting in names:
        return None if names[setting] == model_dtype else names[setting]
    if setting != "auto":
        raise ValueError(f"calibration_dtype must be null, 'auto' or one of {sorted(names)}, got {setting!r}")
    if model_dtype != torch.float32:
        return None  # already a 16-bit model
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or 1024)
    inner = int(getattr(text, "intermediate_size", 0) or getattr(text, "ffn_dim", 0) or 4 * hidden)
    device = str(torch.device(device).type)
    speedup = matmul_speedup(torch.bfloat16, 2048, hidden, inner, device)
    chosen = torch.bfloat16 if speedup >= AUTO_SPEEDUP else None
    log.info("calibration_dtype auto: a [2048, %d] x [%d, %d] bf16 matmul is %.2fx fp32's speed here: %s",
             hidden, hidden, inner, speedup, "bfloat16" if chosen else "float32 (the model's dtype)")
    return chosen


@contextmanager
def running_in(module: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Inside, every floating parameter and buffer of ``module`` is a ``dtype`` copy; on exit the
    originals are put back (not the copies cast back: nothing is lost)."""
    if dtype is None:
        yield
        return
    saved = []
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point() and tensor.dtype != dtype:
            saved.append((tensor, tensor.data))
            tensor.data = tensor.data.to(dtype)
    try:
        yield
    finally:
        for tensor, data in saved:
            tensor.data = data


def floating_to(value: Any, dtype: torch.dtype | None) -> Any:
    """``value`` with every floating tensor inside (dicts, lists, tuples) cast to ``dtype``."""
    if dtype is None:
        return value
    return map_tensors(value, lambda t: t.to(dtype) if t.is_floating_point() else t)
