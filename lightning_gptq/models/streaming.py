"""Models bigger than memory: a skeleton on the meta device, real weights one block at a time.

``skeleton(folder)`` builds the model from its config with every parameter on the meta device (no
memory; buffers such as rotary tables stay real); ``release`` sends a module's tensors back to the
meta device. What reads the weights in between is a weight source (``lightning_gptq.sources``).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch
from torch import nn


__all__ = ["release", "skeleton"]


def skeleton(folder: str | os.PathLike, *, dtype: torch.dtype, trust_remote_code: bool = False):
    """``(model, tokenizer)``: ``folder``'s causal LM with its parameters on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):  # buffers stay real: rotary tables are computed, in no file
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def release(module: nn.Module) -> None:
    """Free ``module``'s parameters and persistent buffers (they move to the meta device, shapes kept),
    and hand the freed heap back to the OS: glibc keeps freed blocks under 32 MB in its arenas, so
    without a trim the process's resident memory would ratchet up by about a block per block.
    Non-persistent buffers (rotary tables: computed, in no file) stay, so the module can be read again."""
    for owner in module.modules():
        for name, param in owner._parameters.items():
            if param is not None and not param.is_meta:
                owner._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        for name, buffer in owner._buffers.items():
            if buffer is not None and name not in owner._non_persistent_buffers_set:
                owner._buffers[name] = buffer.to("meta")
    _trim_heap()


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
