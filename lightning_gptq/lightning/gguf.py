"""``GGUFExport``: the fit's quantized model also written as GGUF (llama.cpp, ollama, LM Studio), under ``gguf:``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gptq.checkpoint.gguf_export import (GGUFExportError, config_refusal, save_gguf, source_gguf,
                                                   template_mismatch)

from .callbacks import GPTQCallback
from .module import GPTQModule

__all__ = ["GGUFExport"]


class GGUFExport(Callback):
    """Writes the quantized model as GGUF once ``fit`` has written its folder (``lightning_gptq.save_gguf``: each
    layer's codes as ``Q4_0``/``Q4_1``/``Q8_0`` blocks, exactly, read back before the file is renamed into place).

    Args:
        path: the ``.gguf`` file to write; ``auto``: ``<output_dir>/model.gguf``; null (default): no GGUF.
        template: the model's source as GGUF, for tokenizer, metadata and the tensors GPTQ left alone (default: the
            ``.gguf`` file the fit read; a model from a Hugging Face folder needs one, e.g. from llama.cpp's
            ``convert_hf_to_gguf.py``).

    Settings GGUF cannot hold (group sizes not a multiple of 32, act-order without ``static_groups``, 8-bit
    asymmetric grids), streaming, and a template missing or not the model's source are refused when the fit starts.
    """

    def __init__(self, path: str | None = None, template: str | None = None) -> None:
        self.path, self.template = path, template
        self.written: Path | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not self.path:
            return
        if not isinstance(pl_module, GPTQModule):
            raise MisconfigurationException("GGUFExport writes what GPTQModule's fit quantized; in your own module call "
                                            "lightning_gptq.save_gguf(model, path, template) once fit has ended")
        hp = pl_module.hparams
        if hp.streaming:
            raise MisconfigurationException("gguf.path needs the whole model in memory: with model.streaming, export "
                                            "the written folder afterwards (python -m lightning_gptq.export_gguf)")
        if self.template is None:
            source = source_gguf(str(hp.model), hp.gguf_file)
            if source is None:
                raise MisconfigurationException(f"gguf.path: the model ({hp.model}) was not read from a .gguf file; "
                                                "set gguf.template to its source as GGUF")
            self.template = str(source)
        if not Path(self.template).is_file():
            raise MisconfigurationException(f"gguf.template {self.template} is not a file")
        if why := template_mismatch(pl_module.lm, self.template):
            raise MisconfigurationException(f"gguf.template: {why}")
        for callback in (cb for cb in trainer.callbacks if isinstance(cb, GPTQCallback)):
            settings = [("", callback.quant)] + [(f" (dynamic {key!r})", replace(callback.quant, **overrides))
                                                 for key, skip, _, overrides in callback.rules.rules if not skip]
            for where, quant in settings:
                why = config_refusal(quant)
                if why:
                    raise MisconfigurationException(f"gguf.path: {why}{where}")

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.path or not trainer.is_global_zero or not pl_module.completed:
            return  # (a dry run, or another process of a distributed fit)
        path = Path(pl_module.output_dir()) / "model.gguf" if self.path == "auto" else Path(self.path).expanduser()
        try:
            report = save_gguf(pl_module.lm, path, self.template)
        except GGUFExportError as error:
            if not pl_module.hparams.save_quantized:
                raise
            raise GGUFExportError(f"{error} (the GPTQ folder {pl_module.output_dir() / 'model'} is written)") from None
        self.written = path
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(report.types.items()))
        rank_zero_info(f"GGUF written to {path}: {kinds} layers, {report.copied} tensors from {Path(self.template).name}, "
                       f"{report.bytes / 2**20:.1f} MiB")
