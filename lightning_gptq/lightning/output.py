"""Where a fit's quantized model goes: a Hugging Face GPTQ folder, ``<output_dir>/model``.

In memory, the model is written whole once ``fit`` ends (``save``). Streaming writes each block as
soon as it is quantized (``add_block``: staged on disk, then freed) and ``save`` finishes the folder
from the staged blocks and the source's files. The writer's state is part of a resume point.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from lightning_gptq.checkpoint import save_quantized
from lightning_gptq.checkpoint.compressed_tensors import FORMAT as CT_FORMAT, save_compressed_tensors
from lightning_gptq.checkpoint.gptq_format import V2, ZeroPointError
from lightning_gptq.checkpoint.hf_streaming import StreamingWriter
from lightning_gptq.quant.rules import LayerRules

__all__ = ["QuantizedOutput", "checkpoint_settings"]

log = logging.getLogger("lightning_gptq")


def checkpoint_settings(report: dict, source_model: str, true_sequential: bool, gguf_file: str | None = None) -> dict:
    """Our settings recorded in the checkpoint (``meta.lightning_gptq``), from the callbacks' report."""
    hessian = report.get("hessian") or {}
    source = {"source_model": source_model} | ({"source_gguf_file": gguf_file} if gguf_file else {})
    return {"method": report["method"], "quant": report["quant"].to_dict(), **source,
            "true_sequential": true_sequential, "dynamic": report.get("dynamic") or {}, "sink_tokens": hessian.get("sink_tokens"),
            "sink_weight": hessian.get("sink_weight"), "sink_layers": hessian.get("sink_layers"),
            "sink_probe_windows": hessian.get("sink_probe_windows"),
            "sink_block_weights": dict(hessian.get("block_weights", {}))}


class QuantizedOutput:
    """The quantized folder ``folder``, written as ``options`` (``GPTQModule``'s hparams) say: ``checkpoint_format``,
    ``checkpoint_names``, ``max_shard_size``, ``save_dtype``."""

    def __init__(self, folder: Path, options) -> None:
        self.folder = folder
        self.checkpoint_format, self.max_shard_size, self.save_dtype = (options.checkpoint_format, options.max_shard_size,
                                                                        options.save_dtype)
        self.names = getattr(options, "checkpoint_names", "files")  # (hparams of runs saved before the option)
        self.writer: StreamingWriter | None = None

    def add_block(self, prefix: str, block: nn.Module) -> None:
        """Stage quantized ``block`` (at ``prefix`` in the model) on disk."""
        if self.writer is None:
            self.writer = StreamingWriter(self.folder, checkpoint_format=self.checkpoint_format, dtype=self.save_dtype)
        self.writer.add_block(prefix, block)

    def save(self, lm: nn.Module, tokenizer, source, report: dict, settings: dict) -> Path:
        """Write the folder: from the staged blocks when streaming, else ``lm`` whole. A model that ``gptq`` (v1)
        cannot store (a zero point of 0, known only once solved) is written as ``gptq_v2``, with a warning, rather
        than lost."""
        try:
            return self._save(lm, tokenizer, source, report, settings)
        except ZeroPointError as error:
            log.warning("%s: written as checkpoint_format 'gptq_v2' instead, so the run is not lost (a v1 reader "
                        "cannot load it; --model.checkpoint_format=auto picks v1 whenever it can)", error)
            self.checkpoint_format = V2
            if self.writer is not None:
                self.writer.format = V2
            return self._save(lm, tokenizer, source, report, settings)

    def _save(self, lm: nn.Module, tokenizer, source, report: dict, settings: dict) -> Path:
        quant = report["quant"]
        true_sequential = settings["true_sequential"]
        dynamic = LayerRules(report.get("dynamic")).layout_rules()  # the rules the layers were quantized by
        if self.writer is not None:
            self.writer.finish(lm, tokenizer, source.files, damp_percent=quant.damp, static_groups=quant.static_groups,
                               true_sequential=true_sequential, settings={**settings, "streamed": True}, dynamic=dynamic,
                               names=self.names)
        elif self.checkpoint_format == CT_FORMAT:
            save_compressed_tensors(lm.to("cpu"), tokenizer, self.folder, max_shard_size=self.max_shard_size,
                                    dtype=self.save_dtype, settings=settings, names=self.names)
        else:
            save_quantized(lm.to("cpu"), tokenizer, self.folder, checkpoint_format=self.checkpoint_format,
                           max_shard_size=self.max_shard_size, damp_percent=quant.damp,
                           static_groups=quant.static_groups, true_sequential=true_sequential, settings=settings,
                           dtype=self.save_dtype, dynamic=dynamic, names=self.names)
        return self.folder

    def state_dict(self) -> dict | None:
        return self.writer.state_dict() if self.writer is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        """Restore a killed run's writer (``CheckpointError`` when a staged block is missing or altered)."""
        self.writer = StreamingWriter.restore(state) if state is not None else None
