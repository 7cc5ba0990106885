"""Models bigger than memory: a skeleton on the meta device, real weights one block at a time.

``skeleton(folder)`` builds the model from its config with every parameter on the meta device (no
memory; buffers such as rotary tables stay real). ``WeightSource`` reads a local folder's
safetensors (one file, or shards with an index) and ``materialize``s the parameters of one module
(an embedding stage, a decoder block) from them; ``release`` sends a module's tensors back to the
meta device. Reading uses plain file I/O into freshly allocated tensors (no memory maps), so the pages read are
never counted in the process's resident memory and nothing is read twice. ``QuantizedWeightSource``
does the same for a quantized checkpoint (HF GPTQ layout), so it can be scored block by block.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch
from torch import nn

from lightning_gptq.checkpoint.shards import Shards

__all__ = ["QuantizedWeightSource", "StreamingError", "WeightSource", "release", "skeleton"]


class StreamingError(ValueError):
    """The model cannot be streamed (not a local folder with safetensors, or a tensor is missing)."""


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


class WeightSource:
    """The weights of a local Hugging Face folder, read tensor by tensor."""

    def __init__(self, folder: str | os.PathLike, dtype: torch.dtype):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise StreamingError(f"Streaming reads a local model folder with safetensors; {str(self.folder)!r} is not one.")
        try:
            self.shards = Shards(self.folder)
        except Exception as error:  # noqa: BLE001 - say what streaming needs, with the reader's reason
            raise StreamingError(f"Streaming needs the model as safetensors files: {error}") from None
        self.dtype = dtype

    def names(self) -> list[str]:
        return list(self.shards.shapes)

    def get(self, name: str) -> torch.Tensor:
        tensor = self.shards.read(name)  # plain file reads: nothing stays mapped into this process
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def chunks(self, name: str, dtype: torch.dtype | None = None):
        """``name``'s bytes in pieces (cast to ``dtype``, default the model dtype for floating tensors)."""
        source = self.shards.dtype_of(name)
        target = (dtype or self.dtype) if source.is_floating_point else None
        return self.shards.chunks(name, target)

    def dtype_of(self, name: str, dtype: torch.dtype | None = None) -> torch.dtype:
        source = self.shards.dtype_of(name)
        return (dtype or self.dtype) if source.is_floating_point else source

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self.shards.shapes[name])

    def materialize(self, model: nn.Module, module: nn.Module, device: torch.device | str = "cpu") -> None:
        """Give every meta parameter (and persistent meta buffer) of ``module`` its value from the files."""
        prefix = next((n for n, m in model.named_modules() if m is module), None)
        if prefix is None:
            raise StreamingError(f"{type(module).__name__} is not part of the model")
        tied = {}
        embeddings = model.get_input_embeddings()
        if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
            tied[id(model.get_output_embeddings().weight)] = embeddings
        try:
            for owner_name, owner in module.named_modules():
                for leaf, param in list(owner._parameters.items()):
                    if param is None or param.device.type != "meta":
                        continue
                    full = ".".join(p for p in (prefix, owner_name, leaf) if p)
                    if full in self.shards.shapes:
                        value = self.get(full)
                    elif id(param) in tied:  # a tied head: the input embedding's weight
                        if embeddings.weight.device.type == "meta":
                            self.materialize(model, embeddings, device)
                        owner._parameters[leaf] = embeddings.weight
                        continue
                    else:
                        raise StreamingError(f"{self.folder}: no tensor {full!r} in the safetensors files")
                    if tuple(value.shape) != tuple(param.shape):
                        raise StreamingError(f"{self.folder}: {full!r} has shape {tuple(value.shape)}, the model "
                                             f"expects {tuple(param.shape)}")
                    owner._parameters[leaf] = nn.Parameter(value.to(device), requires_grad=False)
                for leaf, buffer in list(owner._buffers.items()):
                    full = ".".join(p for p in (prefix, owner_name, leaf) if p)
                    if buffer is not None and buffer.device.type == "meta" and full in self.shards.shapes:
                        owner._buffers[leaf] = self.get(full).to(device)
        finally:
            self.shards.close()  # unmap: pages read must not stay resident


class QuantizedWeightSource:
    """A quantized checkpoint folder (HF GPTQ layout) read one module at a time.

    ``model`` is its architecture with every parameter on the meta device; ``materialize`` reads one
    module (a block: its quantized layers rebuilt from the packed tensors as the oracle ``QuantLinear``:
    block-by-block scoring runs under ``exact_kernels`` anyway, so no faster backend is worth timing),
    ``release`` frees it again. Every header is checked when the source is opened.
    """

    def __init__(self, folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
        from lightning_gptq.checkpoint.hf import GPTQReader

        self.reader = GPTQReader(folder, dtype=dtype, trust_remote_code=trust_remote_code, plain_io=True)
        self.folder = Path(folder)

    @property
    def model(self) -> nn.Module:
        return self.reader.model

    def tokenizer(self):
        return self.reader.tokenizer()

    def materialize(self, model: nn.Module, module: nn.Module, device: torch.device | str = "cpu") -> None:
        if model is not self.reader.model:
            raise StreamingError(f"{self.folder} is read into its own model (QuantizedWeightSource.model)")
        if all(not t.is_meta for t in [*module.parameters(), *module.buffers()]):
            return  # already read (materialize is idempotent, as WeightSource's is)
        self.reader.fill(module)
        module.to(device)
