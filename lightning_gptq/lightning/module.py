"""``GPTQModule``: GPTQ calibration of a causal LM as a Lightning ``fit`` loop.

A thin stage machine over ``CalibrationDriver`` (``lightning_gptq/driver.py``, where the algorithm's
loop is): each fit *epoch* is one driver ``Stage`` (capture; calibrate block b [group g]; propagate
block b), each *step* one calibration batch. The driver fires the block hooks on the Trainer's
callbacks (``hooks.py``): ``HessianCapture`` accumulates, ``GPTQCallback.on_block_end`` solves and
swaps, ``BlockCheckpoint`` writes resume points. ``validate``/``test`` score the paper's perplexity on
the configured evaluation sets (``scoring.py``) and measure latency.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections import defaultdict
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_gptq.checkpoint import CheckpointError
from lightning_gptq.driver import CalibrationDriver
from lightning_gptq.models.compute_dtype import resolve_calibration_dtype
from lightning_gptq.models.latency import measure_latency
from lightning_gptq.models.loading import resolve_dtype
from lightning_gptq.models.spill import SpillFolder
from lightning_gptq.nn import AUTO, int8_head
from lightning_gptq.sources import LoadedModel, StreamedGPTQ, open_model

from .callbacks import HessianCapture
from .distributed import CalibrationDDPStrategy, without_padding
from .generation import Generation, GreedyPaths, complete
from .hooks import fire_block_hook, quantizes_layer, run_report
from .options import check_fit, check_options, max_positions
from .output import QuantizedOutput, checkpoint_settings
from .plan import measure_plan, memory_breakdown, spills_to_disk
from .progress import describe_progress
from .resume import restore_run, run_state
from .scoring import ScoringLoops
from .summary import write_summary


class GPTQModule(ScoringLoops, LightningModule):
    """A causal LM to quantize (``fit``) or score (``validate``/``test``).

    Args:
        model: hub id, local HF folder, ``.gguf`` file, or a folder saved by a previous ``fit``.
        gguf_file: GGUF file name inside ``model`` (a folder or hub repo).
        dtype: weights' dtype while calibrating and scoring (fp32 on CPUs without fast bf16).
        trust_remote_code: allow the model repository's own Python code.
        revision: hub revision.
        true_sequential: quantize a block's linears group by group (attention in → attention out →
            MLP in → MLP out), re-running the block in between so later groups see quantized inputs.
        activation_dtype: dtype of the cached block inputs (e.g. bfloat16 halves the cache).
        calibration_dtype: dtype of the passes that feed the Hessians: ``null`` (the model's), ``bfloat16`` or
            ``auto`` (bf16 where it times 2x faster here), propagating in the model's dtype; ``float64``: the whole
            stream and solve in fp64, codes independent of the CPU's kernels (docs/results.md).
        activation_storage: where the cache lives: ``memory``, ``disk`` (files in ``activation_dir``
            that the kernel pages out when memory runs short), or ``auto`` (disk when twice the
            cache, what the propagate stage holds, would take over half the memory available).
        activation_dir: folder for ``disk`` (default ``<trainer.default_root_dir>/activations``).
        eval_before: score perplexity of the full-precision model before quantizing.
        eval_after: score perplexity right after quantizing.
        output_dir: where the quantized model and run summary go (default: ``<log dir>/quantized``).
        save_quantized: write the quantized model after ``fit`` (Hugging Face GPTQ layout).
        checkpoint_format: ``"auto"`` (``gptq`` v1 when lossless, else ``gptq_v2``), ``"gptq"``, ``"gptq_v2"``
            or ``"compressed-tensors"`` (asymmetric grids vLLM serves; no act-order groups). See the README.
        checkpoint_names: tensor names as transformers' files spell them (``files``: vLLM) or ``modules`` (GPTQModel 7).
        max_shard_size: largest weight file written (e.g. ``"4GB"``); larger models are sharded.
        save_dtype: dtype of the saved unquantized tensors and scales (e.g. ``float16``); default: the model's own.
        latency: measure prefill and decode latency in ``validate``/``test`` (and after ``fit``).
        latency_prompt_tokens: prompt length for the prefill measurement.
        latency_decode_tokens: generated tokens for the decode measurement.
        latency_decode: ``eager``, ``compiled`` (static cache, step compiled once), ``fused`` (static cache, one C++
            call per LLaMA layer) or ``auto`` (eager and ``models.decode.static_path``'s; the faster reported).
        lm_head: ``fp32`` (as the model has it) or ``int8`` (the head computes with int8 rows, a quarter of the
            bytes per decode step; applied after quantizing; cost in docs/kernels.md).
        backend: quantized-linear backend for a loaded quantized model and whenever the model moves
            to another device (``"auto"``: time the candidates here; the fit's own layers follow
            ``GPTQCallback.backend``).
        generation: settings for ``predict`` (max_new_tokens, sampling, chat template...).
        streaming: for models bigger than memory: the model is built on the meta device and each
            block is read from the folder's safetensors when its turn comes, quantized, written to
            ``<output_dir>/model`` and freed; scoring goes block by block too (``validate`` streams a
            quantized folder the same way). Needs local safetensors (a ``.gguf`` is converted once);
            latency needs the whole model.
        dry_run: ``fit`` prints (and writes to ``plan.json``) the memory, disk and time it would need,
            then stops before any heavy work.
    """

    drives_blocks = True  # its driver fires the callbacks' block hooks (hooks.drives_blocks)
    summary_on_disk = True  # False: the summary is only kept as ``.summary`` (quantize() without output_dir)

    def __init__(
        self, model: str, gguf_file: str | None = None, dtype: str = "float32", trust_remote_code: bool = False,
        revision: str | None = None, true_sequential: bool = False, activation_dtype: str | None = None,
        calibration_dtype: str | None = None,
        activation_storage: str = "auto", activation_dir: str | None = None, eval_before: bool = False,
        eval_after: bool = True, output_dir: str | None = None, save_quantized: bool = True,
        checkpoint_format: str = "auto", max_shard_size: str = "4GB", save_dtype: str | None = None,
        latency: bool = True, latency_prompt_tokens: int = 128, latency_decode_tokens: int = 32,
        latency_decode: str = "auto", lm_head: str = "fp32", backend: str = AUTO,
        generation: Generation = Generation(),  # noqa: B008 (never mutated; jsonargparse shows its fields)
        streaming: bool = False, dry_run: bool = False, checkpoint_names: str = "files",
    ) -> None:
        super().__init__()
        loaded = None
        if isinstance(model, nn.Module):  # a model already in memory (``quantize``); hparams keep its name
            loaded, model = LoadedModel(model), getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.generation = generation
        self.save_hyperparameters()
        self.automatic_optimization = False
        check_options(self.hparams)
        try:
            self.source = loaded or open_model(model, gguf_file=gguf_file, dtype=dtype, trust_remote_code=trust_remote_code,
                                     revision=revision, streaming=streaming, backend=backend)
        except (CheckpointError, ValueError, OSError) as error:
            if not streaming:
                raise
            raise MisconfigurationException(f"streaming reads a local folder block by block: {error}") from None
        self.tokenizer = self.source.tokenizer
        object.__setattr__(self, "lm", self.source.model)  # not a submodule: Lightning must not move it whole
        self.driver: CalibrationDriver | None = None  # built by setup("fit")
        self.output: QuantizedOutput | None = None
        self.timings: dict[str, float] = defaultdict(float)
        self.results: dict[str, dict] = {}
        self.plan = self.summary = None  # (the summary: set at fit's end on the first process)
        self.memory: dict[str, int] = {}  # what the fit holds (plan.memory_breakdown), for the summary
        self.completed = False  # every stage of a fit ran
        self._stages, self._val_ppl, self._resumed_from, self._streamed_scores = [], [], None, {}

    @property
    def is_quantized(self) -> bool:
        return self.source.quantized

    def _place(self) -> nn.Module:
        """The whole model on the compute device (``LoadedModel.place``): a quantized folder's layers get their kernels
        there, and layers whose backend cannot run there (the int4 CPU layout on a GPU) are rebuilt with one that can."""
        self.source.place(self.device, self.hparams.backend)
        if self.hparams.lm_head == "int8" and (self.driver is None or self.completed):  # (not before quantizing)
            rank_zero_info(int8_head(self.lm))
        return self.lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits

    def configure_optimizers(self):
        return None  # calibration, not training: no optimizer, no gradients

    def configure_callbacks(self):
        return [] if any(isinstance(cb, HessianCapture) for cb in self.trainer.callbacks) else [HessianCapture()]

    def output_dir(self) -> Path:
        if self.hparams.output_dir:
            return Path(self.hparams.output_dir)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "quantized"

    # -- setup: the driver and its stages, one fit epoch each --------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        check_fit(self, stage, dm, max_positions(self.lm.config), isinstance(self.trainer.strategy, DDPStrategy)
                  and not isinstance(self.trainer.strategy, CalibrationDDPStrategy))
        if stage != "fit":
            return
        hp = self.hparams
        self.output = QuantizedOutput(self.output_dir() / "model", hp)
        self.driver = CalibrationDriver(
            self.source, fire=lambda hook, ctx: fire_block_hook(self.trainer, self, hook, ctx), device=self.device,
            true_sequential=hp.true_sequential, activation_dtype=hp.activation_dtype, store=self._activation_store(),
            compute_dtype=resolve_calibration_dtype(hp.calibration_dtype, self.lm, self.device),
            reference_stream=any(getattr(cb, "asymmetric", False) for cb in self.trainer.callbacks),
            quantizes=quantizes_layer(self.trainer),
            write_block=lambda prefix, block: self.output.add_block(prefix, block) if self.trainer.is_global_zero else None)
        self.driver.timings = self.timings
        self._stages = self.driver.stages(any(getattr(cb, "needs_calibration", False) for cb in self.trainer.callbacks))
        self.trainer.fit_loop.max_epochs = 0 if hp.dry_run else len(self._stages)
        self.trainer.fit_loop.min_epochs = self.trainer.fit_loop.max_epochs
        fire_block_hook(self.trainer, self, "on_calibration_start", self.driver)

    def _activation_store(self):
        """Where cached activations go: memory, or files (``activation_storage``), decided on first use."""
        chosen = []

        def store(hidden: torch.Tensor) -> torch.Tensor:
            if not chosen:
                cache = (self.memory or memory_breakdown(self))["activation cache"]  # (a resume restores before fit start)
                folder = self._activation_folder() if spills_to_disk(self.hparams.activation_storage, cache) else None
                if folder is not None:
                    rank_zero_info(f"activation cache: kept in files under {folder} (paged out when memory runs short)")
                chosen.append(SpillFolder(folder).put if folder is not None else None)
            return chosen[0](hidden) if chosen[0] is not None else hidden

        return store

    def activation_dtype(self) -> str:
        """The activation cache's dtype: the driver's (an fp64 stream widens it), else the options'."""
        return str((self.driver and self.driver.activation_dtype) or self.hparams.activation_dtype or self.hparams.dtype
                   ).removeprefix("torch.")

    def _activation_folder(self) -> Path:
        return Path(os.path.expanduser(self.hparams.activation_dir or Path(self.trainer.default_root_dir) / "activations"))

    @property
    def stage(self):
        return self._stages[self.current_epoch]

    # -- fit ---------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.driver.device = self.device  # the strategy placed the module after setup
        self._fit_start = time.perf_counter() - self.timings.get("total_fit", 0.0)
        hp, dm = self.hparams, self.trainer.datamodule
        self.memory = memory_breakdown(self, calibrates=self._stages[0].kind == "capture")
        if hp.dry_run:
            self.plan = measure_plan(self, run_report(self.trainer), calibrates=self._stages[0].kind == "capture")
            rank_zero_info(self.plan.describe())
            if self.trainer.is_global_zero:
                self.output_dir().mkdir(parents=True, exist_ok=True)
                (self.output_dir() / "plan.json").write_text(json.dumps(self.plan.to_dict(), indent=2))
        elif self._resumed_from is None:  # (restore_run said where a resumed run continues)
            if self._stages[0].kind == "capture":
                rank_zero_info(f"activation cache: {self.memory['activation cache'] / 2**20:.0f} MiB ({dm.nsamples} × "
                               f"{dm.seqlen} tokens, {self.activation_dtype()}); about twice that while a block's "
                               "outputs are being collected")
            if hp.eval_before:
                self.results["before"] = self._score("eval_before", self.source)

    def on_train_epoch_start(self) -> None:
        describe_progress(self.trainer.progress_bar_callback, self.stage.describe(len(self.driver.blocks)))
        self.driver.start(self.stage)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        ids = without_padding(batch)
        if ids.shape[0]:
            self.driver.step(self.stage, batch_idx, ids)

    def on_train_epoch_end(self) -> None:
        self.driver.end(self.stage)

    def on_train_end(self) -> None:
        self.completed = True
        fire_block_hook(self.trainer, self, "on_calibration_end", self.driver)
        self.driver.inputs = None  # free the activation cache before scoring
        self.timings["total_fit"] = time.perf_counter() - self._fit_start
        hp, report, out = self.hparams, run_report(self.trainer), self.output_dir()
        if not self.driver.streams:  # the quantized model is here: score and time it, then write it
            if hp.eval_after:
                self.results["after"] = self._score("eval_after", self.source)
            if hp.latency:
                self.results["latency"] = measure_latency(self._place(), prompt_tokens=hp.latency_prompt_tokens,
                                                          decode_tokens=hp.latency_decode_tokens,
                                                          decode=hp.latency_decode).to_dict()
                rank_zero_info(f"latency: {self.results['latency']}")
        if hp.save_quantized and self.trainer.is_global_zero:
            start = time.perf_counter()
            self.output.save(self.lm, self.tokenizer, self.source, report,
                             checkpoint_settings(report, hp.model, hp.true_sequential, hp.gguf_file))
            self.timings["save"] += time.perf_counter() - start
            rank_zero_info(f"quantized model saved to {self.output.folder}")
        if self.driver.streams:  # the written folder is the quantized model: score it from there, block by block
            self.trainer.strategy.barrier("quantized model written")
            if hp.eval_after:
                self.results["after"] = self._score("eval_after", StreamedGPTQ(
                    self.output.folder, dtype=resolve_dtype(hp.dtype), trust_remote_code=hp.trust_remote_code))
        if self.trainer.is_global_zero:
            self.summary = write_summary(self, out if self.summary_on_disk else None, report)

    def peak_memory(self) -> dict:
        memory = {"cpu_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  **{f"{name} (MiB)": value / 2**20 for name, value in self.memory.items()}}
        if torch.cuda.is_available():
            memory["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return memory

    # -- resume (resume.py) ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if "gptq_resume" in checkpoint:  # BlockCheckpoint's saves, at a block boundary, named the activations
            self.timings["total_fit"] = time.perf_counter() - self._fit_start
            resume = checkpoint["gptq_resume"]
            resume.update(run_state(self, self._stages, layers="layer_files" not in resume))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        path = self.trainer.ckpt_path if self._trainer is not None else None
        restore_run(self, checkpoint.get("gptq_resume"), self._stages, path)
        self._resumed_from = str(path)

    # -- predict -----------------------------------------------------------------------------------
    def on_predict_start(self) -> None:
        self._paths = GreedyPaths(self._place().eval(), self.generation)  # (predict's greedy decode path)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        return [complete(self.lm, self.tokenizer, p, i, self.generation, self.device, self._paths)
                for i, p in zip(batch["index"], batch["prompt"])]
