"""Where a model's weights come from, behind one interface.

A *weight source* holds the model (``model``, ``tokenizer``) and makes one module's weights real
before the module runs (``fetch``) and drops them after (``free``):

    LoadedModel      the whole model in memory (fetch and free do nothing)
    StreamedModel    a full-precision folder of safetensors; the model is a meta-device skeleton and
                     each module is read from the files when its turn comes, then freed
    StreamedGPTQ     a quantized folder (HF GPTQ layout) read the same way, for block-by-block scoring

``open_model`` picks the right one from a path and the ``streaming`` flag.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lightning_gptq.checkpoint import is_quantized_checkpoint, load_quantized
from lightning_gptq.models.loading import gguf_cache_folder, load_causal_lm, resolve_dtype
from lightning_gptq.models.streaming import QuantizedWeightSource, WeightSource, release, skeleton
from lightning_gptq.nn import QuantLinear

__all__ = ["LoadedModel", "StreamedGPTQ", "StreamedModel", "open_model"]


class LoadedModel:
    """A model held whole in memory."""

    streams = False

    def __init__(self, model: nn.Module, tokenizer=None) -> None:
        self.model, self.tokenizer = model, tokenizer

    @property
    def quantized(self) -> bool:
        return any(isinstance(m, QuantLinear) for m in self.model.modules())

    def fetch(self, module: nn.Module, device: torch.device | str = "cpu") -> None:
        pass

    def free(self, module: nn.Module) -> None:
        pass


class StreamedModel:
    """A full-precision model read from a local folder's safetensors one module at a time.

    ``files`` is the folder's ``WeightSource`` (the streaming writer copies the unquantized
    tensors from it)."""

    streams = True
    quantized = False

    def __init__(self, folder: str | os.PathLike, *, dtype: torch.dtype, trust_remote_code: bool = False) -> None:
        self.model, self.tokenizer = skeleton(folder, dtype=dtype, trust_remote_code=trust_remote_code)
        self.files = WeightSource(folder, dtype=dtype)

    def fetch(self, module: nn.Module, device: torch.device | str = "cpu") -> None:
        self.files.materialize(self.model, module, device)

    def free(self, module: nn.Module) -> None:
        release(module)


class StreamedGPTQ:
    """A quantized checkpoint folder read one module at a time (its quantized layers rebuilt as the
    oracle ``QuantLinear``); every header is checked when it is opened."""

    streams = True
    quantized = True

    def __init__(self, folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False) -> None:
        self.files = QuantizedWeightSource(folder, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model, self.tokenizer = self.files.model, self.files.tokenizer()

    def fetch(self, module: nn.Module, device: torch.device | str = "cpu") -> None:
        self.files.materialize(self.model, module, device)

    def free(self, module: nn.Module) -> None:
        release(module)


def streaming_folder(model: str, gguf_file: str | None, dtype: str, trust_remote_code: bool) -> Path:
    """The local folder whose safetensors streaming reads (a GGUF file is converted to one once)."""
    path = Path(os.path.expanduser(model))
    gguf = path / gguf_file if gguf_file else path if path.suffix.lower() == ".gguf" else None
    if gguf is None:
        return path
    folder = gguf_cache_folder(gguf)
    if not (folder / "config.json").is_file():  # the one-time conversion holds the model once
        load_causal_lm(model, gguf_file=gguf_file, dtype=dtype, trust_remote_code=trust_remote_code)
    return folder


def open_model(model: str, *, gguf_file: str | None = None, dtype: str = "float32", trust_remote_code: bool = False,
               revision: str | None = None, streaming: bool = False, backend: str = "auto"):
    """The weight source for ``model`` (hub id, local folder, ``.gguf`` file or quantized folder).

    ``streaming``: read block by block (``StreamedModel`` / ``StreamedGPTQ``) instead of loading whole;
    ``backend``: the quantized-linear backend of a quantized folder loaded whole."""
    torch_dtype = resolve_dtype(dtype)
    if streaming and is_quantized_checkpoint(model):
        return StreamedGPTQ(os.path.expanduser(model), dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if streaming:
        folder = streaming_folder(model, gguf_file, dtype, trust_remote_code)
        return StreamedModel(folder, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if is_quantized_checkpoint(model):
        return LoadedModel(*load_quantized(os.path.expanduser(model), backend=backend,
                                           trust_remote_code=trust_remote_code))
    return LoadedModel(*load_causal_lm(model, gguf_file=gguf_file, dtype=dtype, trust_remote_code=trust_remote_code,
                                       revision=revision))
