"""Where a model's weights come from, behind one interface.

A *weight source* holds the model (``model``, ``tokenizer``) and makes one module's weights real
before the module runs (``fetch``) and drops them after (``free``):

    LoadedModel      the whole model in memory (fetch and free do nothing)
    StreamedModel    a full-precision folder of safetensors; the model is a meta-device skeleton and
                     each module is read from the files when its turn comes, then freed
    StreamedGPTQ     a quantized folder (HF GPTQ layout) read the same way, for block-by-block scoring

``open_model`` picks the right one from a path and the ``streaming`` flag. The readers underneath,
``WeightSource`` (a folder's safetensors, one file or shards with an index) and
``QuantizedWeightSource`` (a GPTQ folder), use plain file I/O into freshly allocated tensors (no
memory maps), so the pages read are never counted in the process's resident memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lightning_gptq.checkpoint import is_quantized_checkpoint, load_quantized
from lightning_gptq.models.loading import gguf_cache_folder, load_causal_lm, resolve_dtype
from lightning_gptq.checkpoint.names import model_names
from lightning_gptq.checkpoint.shards import Shards
from lightning_gptq.models.adapters import UnsupportedArchitectureError
from lightning_gptq.models.experts import fused_expert_banks
from lightning_gptq.models.streaming import release, skeleton
from lightning_gptq.nn import QuantLinear, check_backend, place

__all__ = ["LoadedModel", "QuantizedWeightSource", "StreamedGPTQ", "StreamedModel", "StreamingError", "WeightSource",
           "open_model"]


class StreamingError(ValueError):
    """The model cannot be streamed (not a local folder with safetensors, or a tensor is missing)."""


class WeightSource:
    """The weights of a local Hugging Face folder, read tensor by tensor, by the names a ``model_type`` model gives
    them (``checkpoint.names``: GPT-NeoX's files say ``embed_out`` for ``lm_head``)."""

    def __init__(self, folder: str | os.PathLike, dtype: torch.dtype, model_type: str | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise StreamingError(f"Streaming reads a local model folder with safetensors; {str(self.folder)!r} is not one.")
        try:
            self.shards = Shards(self.folder, rename=model_names(model_type))
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
    """A quantized checkpoint folder (HF GPTQ or compressed-tensors layout) read one module at a time.

    ``model`` is its architecture with every parameter on the meta device; ``materialize`` reads one
    module (a block: its quantized layers rebuilt from the packed tensors as the oracle ``QuantLinear``:
    block-by-block scoring runs under ``exact_kernels`` anyway, so no faster backend is worth timing),
    ``release`` frees it again. Every header is checked when the source is opened.
    """

    def __init__(self, folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
        from lightning_gptq.checkpoint import reader_for

        self.reader = reader_for(folder)(folder, dtype=dtype, trust_remote_code=trust_remote_code, plain_io=True)
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


class LoadedModel:
    """A model held whole in memory."""

    streams = False

    def __init__(self, model: nn.Module, tokenizer=None, *, kernels_pending: bool = False) -> None:
        """``kernels_pending``: the quantized layers were read in the checkpoint layout; :meth:`place` chooses their
        kernels on the device they will run on."""
        self.model, self.tokenizer, self.kernels_pending = model, tokenizer, kernels_pending

    @property
    def quantized(self) -> bool:
        return any(isinstance(m, QuantLinear) for m in self.model.modules())

    def fetch(self, module: nn.Module, device: torch.device | str = "cpu") -> None:
        pass

    def free(self, module: nn.Module) -> None:
        pass

    def place(self, device: torch.device | str, backend: str) -> nn.Module:
        """The whole model on ``device`` (``nn.place``), the kernels it waits for chosen there, once."""
        model = place(self.model, device, backend, choose=self.kernels_pending)
        self.kernels_pending = False
        return model


class _Streamed:
    """What the streamed sources share: ``model`` is a skeleton whose modules ``files`` fills one at a time."""

    streams = True

    def fetch(self, module: nn.Module, device: torch.device | str = "cpu") -> None:
        self.files.materialize(self.model, module, device)

    def free(self, module: nn.Module) -> None:
        release(module)

    def place(self, device: torch.device | str, backend: str) -> nn.Module:
        raise StreamingError("a streamed model is never held whole; this needs it whole (model.streaming=false)")


class StreamedModel(_Streamed):
    """A full-precision model read from a local folder's safetensors one module at a time.

    ``files`` is the folder's ``WeightSource`` (the streaming writer copies the unquantized
    tensors from it)."""

    quantized = False

    def __init__(self, folder: str | os.PathLike, *, dtype: torch.dtype, trust_remote_code: bool = False) -> None:
        self.model, self.tokenizer = skeleton(folder, dtype=dtype, trust_remote_code=trust_remote_code)
        banks = fused_expert_banks(self.model)
        if banks:
            raise UnsupportedArchitectureError(
                f"streaming a mixture-of-experts model is not supported yet ({banks[0]}, ...: its files hold each "
                "expert bank in a layout transformers converts at load); quantize it in memory (model.streaming=false)")
        self.files = WeightSource(folder, dtype=dtype, model_type=self.model.config.model_type)



class StreamedGPTQ(_Streamed):
    """A quantized checkpoint folder read one module at a time (its quantized layers rebuilt as the
    oracle ``QuantLinear``); every header is checked when it is opened."""

    quantized = True

    def __init__(self, folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False) -> None:
        self.files = QuantizedWeightSource(folder, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model, self.tokenizer = self.files.model, self.files.tokenizer()



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
    ``backend``: the quantized-linear backend of a quantized folder loaded whole, chosen when
    ``LoadedModel.place`` puts it on its device."""
    torch_dtype = resolve_dtype(dtype)
    if streaming and is_quantized_checkpoint(model):
        return StreamedGPTQ(os.path.expanduser(model), dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if streaming:
        folder = streaming_folder(model, gguf_file, dtype, trust_remote_code)
        return StreamedModel(folder, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if is_quantized_checkpoint(model):  # ("auto": the loader's fp32, as for any checkpoint whose dtype is unknown)
        check_backend(backend)  # (read in the checkpoint layout: the compute device is known only when it is placed)
        return LoadedModel(*load_quantized(os.path.expanduser(model), backend="torch", trust_remote_code=trust_remote_code,
                                           **({} if torch_dtype == "auto" else {"dtype": torch_dtype})), kernels_pending=True)
    return LoadedModel(*load_causal_lm(model, gguf_file=gguf_file, dtype=dtype, trust_remote_code=trust_remote_code,
                                       revision=revision))
