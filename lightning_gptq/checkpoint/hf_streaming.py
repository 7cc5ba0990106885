"""Writing the Hugging Face GPTQ layout block by block, for models that never sit in memory whole."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lightning_gptq.nn import QuantLinear

from . import shards as shard_io
from .gptq_format import (FORMATS, V1, V2, CheckpointError, GPTQSettings, ZeroPointError, layer_grids_rules,
                          words_to_file, zeros_to_file)
from .hf import AUTO_FORMAT, linear_shape, _meta, _warn_other_readers, _write_configs
from .folders import publish, staging_for
from .names import file_names_of

__all__ = ["StreamingWriter"]


class StreamingWriter:
    """Write a quantized model block by block, for models that never sit in memory whole.

    ``add_block`` stages one quantized block (its ``QuantLinear`` buffers as in memory, true zeros)
    right after it is quantized; ``finish`` picks the format (``auto``: v1 when every zero of every
    block is >= 1), converts each staged block into a final shard, copies the unquantized tensors
    (embeddings, final norm, head) tensor by tensor from ``source``, and writes the configs. One
    block's tensors are in memory at a time. The folder appears under its final name only at the end.
    """

    def __init__(self, folder: str | os.PathLike, *, checkpoint_format: str = AUTO_FORMAT,
                 dtype: torch.dtype | str | None = None) -> None:
        if checkpoint_format not in (AUTO_FORMAT, *FORMATS):
            raise ValueError(f"checkpoint_format must be 'auto', 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
        self.folder = Path(folder)
        self.staging = staging_for(self.folder)
        self.format = checkpoint_format
        self.cast = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.blocks: list[tuple[str, dict, str]] = []  # staged file, {layer name: (in, out, bits)}, sha256
        self.grids: dict[str, tuple[int, int, bool]] = {}  # layer name -> (bits, group_size, sym)
        self.dense: list[str] = []  # full-precision linears of the staged blocks (`-:` rules)
        self.act_order = False
        self.min_zero: int | None = None
        self.prefixes: list[str] = []

    def add_block(self, prefix: str, block: nn.Module) -> None:
        layers = {f"{prefix}.{n}": m for n, m in block.named_modules() if isinstance(m, QuantLinear)}
        state = {}
        for name, tensor in block.state_dict().items():
            tensor = tensor.detach().cpu()
            if self.cast is not None and tensor.is_floating_point():
                tensor = tensor.to(self.cast)
            state[f"{prefix}.{name}"] = tensor.contiguous()
        self.dense += [f"{prefix}.{n}" for n, m in block.named_modules() if linear_shape(m) is not None]
        for name, m in layers.items():
            self.grids[name] = (m.bits, m.group_size, m.sym)
            self.act_order |= m.act_order
            low = int(m.zero_points().min())
            self.min_zero = low if self.min_zero is None else min(self.min_zero, low)
        file = f"staged-{len(self.blocks):05d}.safetensors"
        shard_io.save_tensors(state, self.staging / file)
        self.blocks.append((file, {n: (m.in_features, m.out_features, m.bits) for n, m in layers.items()},
                            shard_io.sha256(self.staging / file)))
        self.prefixes.append(prefix + ".")

    def state_dict(self) -> dict:
        """What a resumed run needs to stage the remaining blocks beside the ones already staged."""
        return {"folder": str(self.folder), "format": self.format, "cast": self.cast, "blocks": list(self.blocks),
                "layer_grids": dict(self.grids), "dense_layers": list(self.dense), "act_order": self.act_order,
                "min_zero": self.min_zero, "prefixes": list(self.prefixes)}

    @classmethod
    def restore(cls, state: dict) -> "StreamingWriter":
        """The writer of a killed run, from :meth:`state_dict`; every staged block it names must be
        on disk with the sha256 recorded when it was staged (files of later blocks are overwritten)."""
        writer = cls.__new__(cls)
        writer.folder = Path(state["folder"])
        writer.staging = writer.folder.with_name(writer.folder.name + ".partial")
        for file, _, digest in state["blocks"]:
            path = writer.staging / file
            if not path.is_file():
                raise CheckpointError(f"the staged block {str(path)!r} of the interrupted run is missing")
            if shard_io.sha256(path) != digest:
                raise CheckpointError(f"the staged block {str(path)!r} does not match the sha256 recorded when it was "
                                      "written (altered or cut short)")
        writer.format, writer.cast = state["format"], state["cast"]
        writer.blocks = [tuple(b) for b in state["blocks"]]
        if "layer_grids" in state:
            writer.grids = {n: tuple(g) for n, g in state["layer_grids"].items()}
        else:  # a resume point of an earlier version: one grid for every layer
            (grid,) = state["grids"]
            writer.grids = {n: tuple(grid) for _, layers, _ in writer.blocks for n in layers}
        writer.dense = list(state.get("dense_layers", []))  # (not kept by earlier versions)
        writer.act_order, writer.min_zero = state["act_order"], state["min_zero"]
        writer.prefixes = list(state["prefixes"])
        return writer

    def finish(self, model: nn.Module, tokenizer, source_tensors, *, damp_percent: float = 0.01,
               static_groups: bool = False, true_sequential: bool = True, settings: dict | None = None,
               dynamic: dict | None = None, names: str = "files") -> Path:
        """``source_tensors``: the model's own files (``WeightSource``: ``names()``, ``dtype_of``,
        ``shape_of``, ``chunks``), for the unquantized tensors outside the blocks. ``dynamic``, ``names``: as
        ``save_gptq``'s."""
        rename = file_names_of(model, names)
        if not self.grids:
            raise ValueError("no quantized block was staged: nothing to write")
        (bits, group_size, sym), dynamic = layer_grids_rules({rename(n): g for n, g in self.grids.items()}, dynamic,
                                                             map(rename, self.dense))
        fmt = self.format
        if fmt == AUTO_FORMAT:
            fmt = V1 if self.min_zero >= 1 else V2
        elif fmt == V1 and self.min_zero < 1:
            raise ZeroPointError()
        _warn_other_readers(fmt, sym, dynamic)
        total = len(self.blocks) + 1
        names = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        weight_map, digests, size = {}, {}, 0
        for (staged, layers, _), file in zip(self.blocks, names):
            state = load_file(str(self.staging / staged))
            for name, (in_features, out_features, b) in layers.items():
                zeros = zeros_to_file(state[f"{name}.qzeros"], b, out_features, fmt)
                state[f"{name}.qzeros"] = words_to_file(zeros, out_features, b, dim=1)
                state[f"{name}.qweight"] = words_to_file(state[f"{name}.qweight"], in_features, b, dim=0)
            state = {rename(n): t for n, t in state.items()}
            shard_io.save_tensors(state, self.staging / file)
            (self.staging / staged).unlink()
            digests[file] = shard_io.sha256(self.staging / file)
            weight_map.update({n: file for n in state})
            size += sum(t.numel() * t.element_size() for t in state.values())
        # The unquantized tensors (embeddings, head: the largest tensors of a big model) go straight
        # from the source files to the last shard in pieces, never whole in memory.
        rest = [n for n in source_tensors.names() if not any(n.startswith(p) for p in self.prefixes)]
        entries = [(rename(n), source_tensors.dtype_of(n, self.cast), source_tensors.shape_of(n),
                    lambda n=n: source_tensors.chunks(n, self.cast)) for n in rest]
        shard_io.write_streamed(self.staging / names[-1], entries, metadata={"format": "pt"})
        digests[names[-1]] = shard_io.sha256(self.staging / names[-1])
        weight_map.update({e[0]: names[-1] for e in entries})
        rest_dtypes = [e[1] for e in entries]
        for _, dtype, shape, _ in entries:
            count = 1
            for d in shape:
                count *= d
            size += count * torch.empty((), dtype=dtype).element_size()
        index = {"metadata": {"total_size": size, "sha256": digests}, "weight_map": weight_map}
        (self.staging / shard_io.INDEX).write_text(json.dumps(index, indent=2))
        dtype = next((d for d in rest_dtypes if d.is_floating_point), torch.float32)
        gptq = GPTQSettings(bits=bits, group_size=group_size, desc_act=self.act_order, sym=sym, checkpoint_format=fmt,
                            damp_percent=damp_percent, static_groups=static_groups, true_sequential=true_sequential,
                            meta=_meta(settings, digests), dynamic=dynamic)
        _write_configs(self.staging, model, tokenizer, gptq, dtype)
        return publish(self.staging, self.folder)
