"""Saving and loading quantized models.

``save_quantized`` writes the Hugging Face GPTQ layout (``hf``), which transformers/GPTQModel/vLLM
load; ``save_compressed_tensors`` llm-compressor's layout (asymmetric grids vLLM serves); ``load_quantized`` reads
the GPTQ layout (ours and other tools'), and the interim layouts earlier versions
of this project wrote (``interim``).
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning_gptq.nn import AUTO

from .gptq_format import V1, V2, CheckpointError, GPTQSettings
from .compressed_tensors import save_compressed_tensors
from .hf import is_gptq_folder, load_gptq, read_settings, save_gptq
from .interim import (
    FORMAT,
    FORMAT_V0,
    MANIFEST,
    WEIGHTS,
    is_interim_checkpoint,
    load_interim,
    save_interim,
)

save_quantized = save_gptq

__all__ = [
    "FORMAT", "FORMAT_V0", "MANIFEST", "V1", "V2", "WEIGHTS", "CheckpointError", "GPTQSettings", "is_quantized_checkpoint",
    "load_gptq", "load_interim", "load_quantized", "read_settings", "save_compressed_tensors", "save_gptq", "save_interim", "save_quantized",
]


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a GPTQ checkpoint (HF layout, or our interim one)."""
    path = Path(os.path.expanduser(path))
    return path.is_dir() and (is_interim_checkpoint(path) or is_gptq_folder(path))


def load_quantized(folder: str | os.PathLike, *, backend: str = AUTO, verify: bool = True, trust_remote_code: bool = False,
                   **kwargs):
    """``(model, tokenizer)`` from a quantized checkpoint folder: HF GPTQ layout (``load_gptq``; its
    keyword arguments pass through) or our interim layouts (``load_interim``)."""
    folder = Path(os.path.expanduser(folder))
    if is_interim_checkpoint(folder):
        return load_interim(folder, backend=backend, trust_remote_code=trust_remote_code)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} does not exist or is not a folder")
    return load_gptq(folder, backend=backend, verify=verify, trust_remote_code=trust_remote_code, **kwargs)
