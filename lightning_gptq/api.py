"""One call: ``quantize(model, calibration, QuantConfig(...)) -> quantized model``.

It runs the same Lightning ``fit`` as ``python -m lightning_gptq fit`` (``GPTQModule`` with
``HessianCapture`` and ``GPTQCallback``), with no logger and no resume points, and hands back the
Hugging Face model with its linears replaced by quantized ones.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from lightning_gptq.checkpoint import load_quantized, save_compressed_tensors, save_gguf, save_quantized
from lightning_gptq.quant import QuantConfig

__all__ = ["load_quantized", "quantize", "save_compressed_tensors", "save_gguf", "save_quantized"]


def quantize(
    model: str | os.PathLike | nn.Module,
    calibration: torch.Tensor | str | os.PathLike,
    config: QuantConfig | None = None,
    *,
    tokenizer=None,
    method: str = "gptq",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    batch_size: int = 1,
    sink_weight: float | str = 1.0,
    sink_tokens: int = 1,
    sink_layers: str = "all",
    sink_probe_windows: int | None = None,
    asymmetric: bool = False,
    dynamic: dict | None = None,
    equalize: list[float] | None = None,
    equalize_layers: str | None = None,
    backend: str = "auto",
    output_dir: str | os.PathLike | None = None,
    gguf: str | os.PathLike | None = None,
    gguf_template: str | os.PathLike | None = None,
    accelerator: str = "auto",
    progress: bool = False,
    **module_options,
) -> nn.Module:
    r"""Quantize ``model`` with GPTQ (or round to nearest) and return it.

    Args:
        model: a Hugging Face causal LM (``nn.Module``), or what ``GPTQModule.model`` takes: hub id,
            local folder, ``.gguf`` file (give ``gguf_file=`` for one inside a folder).
        calibration: token windows ``[n, seqlen]`` (used as given: ``nsamples``/``seqlen``/``seed``
            are then ignored), a text file, a folder of ``.txt`` files, or a dataset name
            (``"c4"``, ``"wikitext2"``, ``"ptb"``), cut into ``nsamples`` windows of ``seqlen`` tokens.
        config: bits, group size, act-order, damping... (default ``QuantConfig()``: 4-bit, g128).
        tokenizer: needed with an ``nn.Module`` and text calibration (a path brings its own).
        method: ``"gptq"`` or ``"rtn"``.
        sink_weight, sink_tokens, sink_layers, sink_probe_windows: the attention-sink rule
            (``HessianCapture``; the default 1.0 is the reference GPTQ Hessian, ``"attention"``
            measures it per block as ``configs/smollm2-135m.yaml`` does).
        asymmetric: GPTAQ's asymmetric calibration (``HessianCapture(asymmetric=True)``): each layer
            also corrects the error earlier quantized blocks left, weighed by ``config.gptaq_alpha``.
        dynamic: per-layer settings by layer-name pattern (``GPTQCallback``'s; e.g. ``{r"+:.*\.down_proj$": {"bits":
            8}, "-:.*\.o_proj$": {}}``), recorded in the checkpoint as GPTQModel's ``dynamic``.
        equalize: per-channel input scaling before the solve, the exponents to try besides 0
            (``GPTQCallback``'s; e.g. ``[0.25, 0.5]``; default off); ``equalize_layers``: a regular expression of the
            layers to scale (e.g. ``r".*\.down_proj$"``; default: every layer that can be).
        backend: the quantized layers' kernel (``"auto"`` times the candidates on this machine).
        output_dir: also write the Hugging Face GPTQ folder to ``<output_dir>/model`` and the run
            summary to ``output_dir`` (default: nothing is written).
        gguf: also write the model as GGUF for llama.cpp to this file (``GGUFExport``; ``"auto"``:
            ``<output_dir>/model.gguf``), with ``gguf_template`` (default: the ``.gguf`` file ``model`` names) for
            metadata and the tensors GPTQ left alone; settings GGUF cannot hold are refused before calibrating.
        accelerator: Lightning's (``"auto"``, ``"cpu"``, ``"gpu"``); the model is returned on that device.
        progress: show progress bars.
        module_options: any other ``GPTQModule`` argument (``dtype``, ``true_sequential``,
            ``activation_dtype``, ``checkpoint_format``, ``save_dtype``, ``eval_after``...).

    The returned model carries the run summary as ``model.gptq_summary`` (the dict ``summary.json`` holds: per-layer
    losses and times under ``"layers"``, settings, timings, peak memory), whether or not ``output_dir`` is given.
    """
    from lightning.pytorch import Trainer
    from lightning.pytorch.utilities import rank_zero_info

    from lightning_gptq.lightning import CalibrationDataModule, GGUFExport, GPTQCallback, GPTQModule, HessianCapture
    from lightning_gptq.lightning.hooks import run_report
    from lightning_gptq.lightning.output import checkpoint_settings
    from lightning_gptq.models.inputs import check_token_ids
    from lightning_gptq.nn import place

    if config is not None and not isinstance(config, QuantConfig):
        raise TypeError(f"quantize(config=...) takes a lightning_gptq.QuantConfig, got {type(config).__name__}")
    if module_options.get("streaming"):
        raise ValueError("quantize() returns the model in memory; for a model bigger than memory use "
                         "`python -m lightning_gptq fit --model.streaming=true` (it writes the folder block by block)")
    if str(gguf) == "auto" and output_dir is None:
        raise ValueError("quantize(gguf='auto') writes <output_dir>/model.gguf: give output_dir, or a file for gguf")
    with tempfile.TemporaryDirectory(prefix="lightning-gptq-") as scratch:
        out = Path(output_dir) if output_dir is not None else Path(scratch)
        options = {"eval_after": False, "latency": False, "backend": backend, **module_options,
                   "save_quantized": output_dir is not None, "output_dir": str(out)}
        if isinstance(model, nn.Module) and tokenizer is None and not isinstance(calibration, torch.Tensor):
            raise ValueError("quantize(nn.Module, text calibration) needs tokenizer=; or pass token windows [n, seqlen]")
        module = GPTQModule(model if isinstance(model, nn.Module) else str(model), **options)
        if tokenizer is not None:
            module.tokenizer = tokenizer
        eval_sets = {"eval_datasets": []} if not (options["eval_after"] or options.get("eval_before")) else {}
        if isinstance(calibration, torch.Tensor):
            check_token_ids(calibration, module.lm, "calibration windows hold token id")
            data = CalibrationDataModule.from_windows(calibration, batch_size=batch_size, **eval_sets)
        else:
            data = CalibrationDataModule(calibration=str(calibration), nsamples=nsamples, seqlen=seqlen, seed=seed,
                                         batch_size=batch_size, **eval_sets)
        callbacks = [GPTQCallback(config or QuantConfig(), method=method, backend=backend, dynamic=dynamic,
                                  equalize=equalize, equalize_layers=equalize_layers),
                     HessianCapture(sink_tokens=sink_tokens, sink_weight=sink_weight, sink_layers=sink_layers,
                                    sink_probe_windows=sink_probe_windows, asymmetric=asymmetric)]
        if gguf is not None:
            callbacks.append(GGUFExport(str(gguf), None if gguf_template is None else str(gguf_template)))
        trainer = Trainer(accelerator=accelerator, devices=1, max_epochs=-1, logger=False, enable_checkpointing=False,
                          enable_model_summary=False, enable_progress_bar=progress, num_sanity_val_steps=0,
                          default_root_dir=scratch, callbacks=callbacks)
        module.summary_on_disk = output_dir is not None
        trainer.fit(module, datamodule=data)
        device = trainer.strategy.root_device
        module.lm.gptq_summary = module.summary
        if output_dir is None:
            rank_zero_info("run summary: kept as the returned model's gptq_summary (no output_dir given)")
    if dynamic:  # what save_quantized writes by default: without them a layer left dense everywhere (a "-:" rule)
        module.lm.gptq_dynamic = callbacks[0].rules.layout_rules()  # would be built quantized by other tools
    # what save_quantized records of the run by default (method, QuantConfig, sinks, source), as fit's folder does
    module.lm.gptq_settings = checkpoint_settings(run_report(trainer), str(module.hparams.model),
                                                  module.hparams.true_sequential, module.hparams.gguf_file)
    return place(module.lm, device, backend)  # where it was calibrated: Lightning's teardown moved it to the CPU
