"""Saving and loading quantized models.

``save_quantized`` writes the Hugging Face GPTQ layout (``hf``), which transformers/GPTQModel/vLLM
load; ``save_compressed_tensors`` llm-compressor's layout (asymmetric grids vLLM serves); ``load_quantized`` reads
both (ours and other tools'), and the interim layouts earlier versions of this project wrote (``interim``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from lightning_gptq.nn import AUTO, check_backend, device_at_hand, place

from .gptq_format import V1, V2, CheckpointError, GPTQSettings
from .compressed_tensors import (
    CompressedTensorsReader,
    is_compressed_tensors_folder,
    load_compressed_tensors,
    save_compressed_tensors,
)
from .gguf_export import GGUFExportError, save_gguf
from .hf import GPTQReader, is_gptq_folder, load_gptq, read_dtype, read_settings, save_gptq
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
log = logging.getLogger("lightning_gptq")

__all__ = [
    "FORMAT", "FORMAT_V0", "MANIFEST", "V1", "V2", "WEIGHTS", "CheckpointError", "GGUFExportError", "GPTQSettings", "is_quantized_checkpoint",
    "load_compressed_tensors", "load_gptq", "load_interim", "load_quantized", "read_settings", "reader_for",
    "save_compressed_tensors", "save_gguf", "save_gptq", "save_interim", "save_quantized",
]


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a quantized checkpoint (HF GPTQ layout, compressed-tensors
    ``pack-quantized``, or our interim one)."""
    path = Path(os.path.expanduser(path))
    return path.is_dir() and (is_interim_checkpoint(path) or is_gptq_folder(path) or is_compressed_tensors_folder(path))


def reader_for(folder: str | os.PathLike) -> type[GPTQReader]:
    """The reader of ``folder``'s layout: compressed-tensors or the HF GPTQ one."""
    return CompressedTensorsReader if is_compressed_tensors_folder(Path(os.path.expanduser(folder))) else GPTQReader


def load_quantized(folder: str | os.PathLike, *, backend: str = AUTO, dtype: torch.dtype | str | None = None,
                   verify: bool = True, trust_remote_code: bool = False, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` from a quantized checkpoint folder: HF GPTQ layout (``load_gptq``), compressed-tensors
    (``load_compressed_tensors``) or our interim layouts (``load_interim``).

    ``dtype``: of every unquantized tensor and the scales (default: fp32, or the dtype an interim folder was saved in).
    ``device``: where the model goes; the layers' kernels (``backend``) are chosen there, after the move."""
    check_backend(backend)
    dtype = None if dtype is None else read_dtype(dtype)  # (a misspelt name fails before the folder is read)
    folder = Path(os.path.expanduser(folder))
    # kernels are chosen where the layers run, in the dtype they run in: read in the checkpoint layout first
    # when the model moves, or when an interim folder (saved in its own dtype) is cast after reading
    recast = dtype is not None and is_interim_checkpoint(folder)
    elsewhere = device_at_hand(device).type != "cpu"
    read_as = "torch" if elsewhere or recast else backend
    if is_interim_checkpoint(folder):
        model, tokenizer = load_interim(folder, backend=read_as, trust_remote_code=trust_remote_code)
        if recast:
            model.to(dtype)
    elif not folder.is_dir():
        raise CheckpointError(f"{folder} does not exist or is not a folder")
    else:
        load = load_compressed_tensors if is_compressed_tensors_folder(folder) else load_gptq
        model, tokenizer = load(folder, backend=read_as, verify=verify, trust_remote_code=trust_remote_code,
                                **({} if dtype is None else {"dtype": dtype}))
    if tokenizer is None:
        log.warning("%s holds no tokenizer files: load_quantized returns tokenizer=None (copy the original model's "
                    "tokenizer files into the folder, or save it with save_quantized(model, tokenizer, folder))", folder)
    if elsewhere or recast:
        place(model, device, backend, choose=True)
    return model, tokenizer
