"""``GPTQModule``: GPTQ calibration of a causal LM as a Lightning ``fit`` loop.

Each fit *epoch* is one stage of the reference's sequential procedure, each *step* one calibration
batch:

    capture            embeddings on every calibration window -> inputs of block 0 (cached on CPU)
    calibrate b[, g]   block b runs on its cached inputs while HessianCapture accumulates; at the
                       epoch's end ``on_block_end`` lets GPTQCallback solve and swap the layers
                       (true-sequential: once per group, later groups seeing quantized earlier ones)
    propagate b        the quantized block runs again; its outputs become block b+1's inputs

Only the block being worked on needs to sit on the compute device. ``validate``/``test`` score the
paper's perplexity on the configured evaluation sets and measure latency.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_gptq.checkpoint import CheckpointError, is_quantized_checkpoint, load_quantized, save_quantized
from lightning_gptq.checkpoint.hf import StreamingWriter
from lightning_gptq.checkpoint.shards import parse_size
from lightning_gptq.data import perplexity
from lightning_gptq.data.evaluation import protocol_name, protocol_text, with_bos
from lightning_gptq.models import capture_block_inputs, estimate_activation_bytes, load_causal_lm, run_block
from lightning_gptq.models.capture import BlockInputs
from lightning_gptq.models.loading import gguf_cache_folder, resolve_dtype
from lightning_gptq.models.streaming import QuantizedWeightSource, WeightSource, release, skeleton
from lightning_gptq.models.spill import SpillFolder
from lightning_gptq.models.latency import measure_latency
from lightning_gptq.nn import AUTO, QuantLinear, check_backend, exact_kernels, quant_linear_class, to_backend

from .blockwise import pinned_adapter, score_block_by_block
from .callbacks import CALIBRATION_BACKEND, GPTQCallback, HessianCapture
from .distributed import CalibrationDDPStrategy
from .generation import Generation, complete
from .hooks import BlockContext, fire_block_hook
from .metrics import ProtocolPerplexity
from .plan import measure_plan, spills_to_disk
from .resume import BlockCheckpoint, ResumeError, quantized_layers_state, read_activations, restore_quantized_layers
from .summary import write_summary


@dataclass(frozen=True)
class Stage:
    kind: str  # "capture" | "calibrate" | "propagate" | "quantize" (no calibration needed)
    block: int = -1
    group: int = 0
    num_groups: int = 1

    def describe(self, num_blocks: int) -> str:
        if self.kind == "capture":
            return "capture block inputs"
        if self.kind == "quantize":
            return "quantize (round to nearest)"
        group = f" group {self.group + 1}/{self.num_groups}" if self.kind == "calibrate" and self.num_groups > 1 else ""
        return f"{self.kind} block {self.block + 1}/{num_blocks}{group}"


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _describe_progress(bar, text: str) -> None:
    """Name the current stage on the progress bar instead of "Epoch N"."""
    if isinstance(bar, TQDMProgressBar) and bar.train_progress_bar is not None:
        bar.train_progress_bar.set_description(text)
    elif isinstance(bar, RichProgressBar) and bar.progress is not None and bar.train_progress_bar_id is not None:
        bar.progress.update(bar.train_progress_bar_id, description=text)


class GPTQModule(LightningModule):
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
        activation_storage: where the cache lives: ``memory``, ``disk`` (files in ``activation_dir``
            that the kernel pages out when memory runs short), or ``auto`` (disk when twice the
            cache, what the propagate stage holds, would take over half the memory available).
        activation_dir: folder for ``disk`` (default ``<trainer.default_root_dir>/activations``).
        eval_before: score perplexity of the full-precision model before quantizing.
        eval_after: score perplexity right after quantizing.
        output_dir: where the quantized model and run summary go (default: ``<log dir>/quantized``).
        save_quantized: write the quantized model after ``fit`` (Hugging Face GPTQ layout).
        checkpoint_format: ``"auto"`` (``gptq`` v1, ``zero − 1``, when lossless for the model, else
            ``gptq_v2``), ``"gptq"`` (refused when a zero point is 0) or ``"gptq_v2"`` (true zeros).
        max_shard_size: largest weight file written (e.g. ``"4GB"``); larger models are sharded.
        save_dtype: dtype of the saved unquantized tensors and scales (e.g. ``float16``, what serving
            stacks expect); default: the model's own (lossless).
        latency: measure prefill and decode latency in ``validate``/``test`` (and after ``fit``).
        latency_prompt_tokens: prompt length for the prefill measurement.
        latency_decode_tokens: generated tokens for the decode measurement.
        backend: quantized-linear backend for a loaded quantized model and whenever the model moves
            to another device (``"auto"``: time the candidates here; the fit's own layers follow
            ``GPTQCallback.backend``).
        generation: settings for ``predict`` (max_new_tokens, sampling, chat template...).
        streaming: for models bigger than memory: the model is built on the meta device and each
            block is read from the model folder's safetensors when its turn comes, quantized, written
            to ``<output_dir>/model`` and freed; peak memory is about one block, its Hessians and the
            activation cache. Scoring (``eval_before``, ``eval_after``, ``validate``/``test``) also
            goes block by block: ``eval_after`` reads the written checkpoint back one block at a
            time, and ``validate`` streams a quantized folder the same way. Needs a local folder with
            safetensors (a ``.gguf`` is converted to one first); latency needs the whole model.
        dry_run: ``fit`` prints (and writes to ``plan.json``) the memory, disk and time it would need,
            from the model, the settings and a quick measurement here, then stops before any heavy work.
    """

    drives_block_hooks = True

    def __init__(
        self,
        model: str,
        gguf_file: str | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        revision: str | None = None,
        true_sequential: bool = False,
        activation_dtype: str | None = None,
        activation_storage: str = "auto",
        activation_dir: str | None = None,
        eval_before: bool = False,
        eval_after: bool = True,
        output_dir: str | None = None,
        save_quantized: bool = True,
        checkpoint_format: str = "auto",
        max_shard_size: str = "4GB",
        save_dtype: str | None = None,
        latency: bool = True,
        latency_prompt_tokens: int = 128,
        latency_decode_tokens: int = 32,
        backend: str = AUTO,
        generation: Generation = Generation(),  # noqa: B008 (never mutated; jsonargparse shows its fields)
        streaming: bool = False,
        dry_run: bool = False,
    ) -> None:
        super().__init__()
        self.generation = generation
        self.save_hyperparameters()
        self.automatic_optimization = False
        try:
            check_backend(backend)
        except ValueError as error:
            raise MisconfigurationException(f"GPTQModule.backend: {error}") from None
        if checkpoint_format not in ("auto", "gptq", "gptq_v2"):
            raise MisconfigurationException(f"GPTQModule.checkpoint_format must be 'auto', 'gptq' or 'gptq_v2', "
                                            f"got {checkpoint_format!r}")
        try:
            parse_size(max_shard_size)
        except ValueError as error:
            raise MisconfigurationException(f"GPTQModule.{error}") from None
        if activation_storage not in ("memory", "disk", "auto"):
            raise MisconfigurationException(f"GPTQModule.activation_storage must be 'memory', 'disk' or 'auto', "
                                            f"got {activation_storage!r}")
        if save_dtype is not None and save_dtype not in ("float16", "bfloat16", "float32"):
            raise MisconfigurationException(f"GPTQModule.save_dtype must be float16, bfloat16 or float32, got {save_dtype!r}")
        for name in ("latency_prompt_tokens", "latency_decode_tokens"):
            if getattr(self.hparams, name) < 1:
                raise MisconfigurationException(f"GPTQModule.{name} must be >= 1")
        # Held outside the module tree so Lightning never moves the whole model to the device: we
        # move one block at a time.
        self.tokenizer = None
        self._load()
        self._adapter = None
        self.timings: dict[str, float] = defaultdict(float)
        self.results: dict[str, dict] = {}
        self._stages: list[Stage] = []
        self._inputs: BlockInputs | None = None
        self._next_hidden: list[torch.Tensor] = []
        self._spill: SpillFolder | bool | None = None  # decided on first use; False: in memory
        self._ctx: BlockContext | None = None
        self._val_ppl: list[ProtocolPerplexity] = []
        self._resume_side: dict | None = None  # the activation file a resume checkpoint being written names
        self.completed = False  # every stage of a fit ran (a resume checkpoint is no longer needed)
        self.plan = None
        self._resumed_from: str | None = None

    # -- model -------------------------------------------------------------------------------------
    def _load(self) -> None:
        hp = self.hparams
        self._source = self._writer = None
        if hp.streaming and is_quantized_checkpoint(hp.model):  # scored block by block (validate / test)
            try:
                self._source = QuantizedWeightSource(os.path.expanduser(hp.model), dtype=resolve_dtype(hp.dtype),
                                                     trust_remote_code=hp.trust_remote_code)
            except (CheckpointError, ValueError, OSError) as error:
                raise MisconfigurationException(f"streaming reads a quantized model in the Hugging Face GPTQ layout "
                                                f"block by block: {error}") from None
            lm, self.tokenizer = self._source.model, self._source.tokenizer()
        elif hp.streaming:
            folder = self._streaming_folder()
            lm, self.tokenizer = skeleton(folder, dtype=resolve_dtype(hp.dtype), trust_remote_code=hp.trust_remote_code)
            self._source = WeightSource(folder, dtype=resolve_dtype(hp.dtype))
        elif is_quantized_checkpoint(hp.model):
            lm, self.tokenizer = load_quantized(os.path.expanduser(hp.model), backend=hp.backend,
                                                trust_remote_code=hp.trust_remote_code)
        else:
            lm, self.tokenizer = load_causal_lm(hp.model, gguf_file=hp.gguf_file, dtype=hp.dtype,
                                                trust_remote_code=hp.trust_remote_code, revision=hp.revision)
        object.__setattr__(self, "_lm", lm)  # not a registered submodule (see __init__)

    def _streaming_folder(self) -> Path:
        """The local folder whose safetensors streaming reads (a GGUF file is converted to one once)."""
        hp = self.hparams
        path = Path(os.path.expanduser(hp.model))
        gguf = path / hp.gguf_file if hp.gguf_file else path if path.suffix.lower() == ".gguf" else None
        if gguf is None:
            return path
        folder = gguf_cache_folder(gguf)
        if not (folder / "config.json").is_file():  # the one-time conversion holds the model once
            load_causal_lm(hp.model, gguf_file=hp.gguf_file, dtype=hp.dtype, trust_remote_code=hp.trust_remote_code)
        return folder

    @property
    def streams_blocks(self) -> bool:
        return bool(self.hparams.streaming)

    @property
    def lm(self) -> nn.Module:
        """The wrapped Hugging Face causal LM."""
        return self._lm

    @property
    def adapter(self):
        """The architecture adapter, its block path pinned: structure detection looks for linear
        layers, which a partly quantized model no longer has."""
        if self._adapter is None:
            self._adapter = pinned_adapter(self._lm)
        return self._adapter

    def _place(self) -> nn.Module:
        """The whole model on the compute device; quantized layers whose backend cannot run there
        (the int4 CPU layout on a GPU) are rebuilt with one that can."""
        self._lm.to(self.device)
        if any(isinstance(m, QuantLinear) and type(m).unsupported(m.spec()) for m in self._lm.modules()):
            to_backend(self._lm, self.hparams.backend)
        return self._lm

    @property
    def is_quantized(self) -> bool:
        return isinstance(self._source, QuantizedWeightSource) or any(isinstance(m, QuantLinear) for m in self._lm.modules())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._lm(input_ids=input_ids, use_cache=False).logits

    def configure_optimizers(self):
        return None  # calibration, not training: no optimizer, no gradients

    def configure_callbacks(self):
        return [] if any(isinstance(cb, HessianCapture) for cb in self.trainer.callbacks) else [HessianCapture()]

    # -- setup and the stage plan ------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        limit = max_positions(self._lm.config)
        scores = bool(getattr(dm, "eval_datasets", None)) and (
            stage != "fit" or self.hparams.eval_before or self.hparams.eval_after)
        lengths = {"seqlen": getattr(dm, "seqlen", None) if stage == "fit" else None,
                   "eval_seqlen": getattr(dm, "eval_seqlen", None) if scores else None}
        for field, value in lengths.items():
            if limit is not None and value is not None and value > limit:
                raise MisconfigurationException(
                    f"data.{field}={value} is longer than the {limit} positions {type(self._lm).__name__} supports"
                )
        if stage != "fit":
            if self.hparams.streaming and self.hparams.latency:
                raise MisconfigurationException("streaming scores perplexity block by block but cannot time the whole "
                                                "model: set --model.latency=false")
            return
        if isinstance(self.trainer.strategy, DDPStrategy) and not isinstance(self.trainer.strategy, CalibrationDDPStrategy):
            raise MisconfigurationException(
                "DDP wraps the model to average gradients, and calibration has none: run fit across processes "
                "with --trainer.strategy=gptq_ddp (or gptq_ddp_spawn), which keeps Lightning's launch and "
                "process group and sums the Hessians across processes instead."
            )
        if self.is_quantized:
            raise MisconfigurationException(f"{self.hparams.model} is already quantized; fit needs a full-precision model")
        if self.hparams.streaming and (self.hparams.latency or not self.hparams.save_quantized):
            raise MisconfigurationException(
                "streaming never holds the whole model, so it cannot time it (it scores it block by block), and the "
                "written folder is its only result: " + ("set --model.latency=false" if self.hparams.latency
                                                         else "keep save_quantized=true") + "."
            )
        if not any(isinstance(cb, GPTQCallback) for cb in self.trainer.callbacks):
            raise MisconfigurationException("fit quantizes through GPTQCallback: add it to the Trainer's callbacks")
        if any(getattr(cb, "needs_calibration", False) for cb in self.trainer.callbacks):
            self._stages = [Stage("capture")]
            for b, block in enumerate(self.adapter.blocks(self._lm)):
                groups = self._groups(block)
                self._stages += [Stage("calibrate", b, g, len(groups)) for g in range(len(groups))]
                self._stages.append(Stage("propagate", b))
        else:
            self._stages = [Stage("quantize")]  # round-to-nearest: no calibration passes at all
        self.trainer.fit_loop.max_epochs = 0 if self.hparams.dry_run else len(self._stages)
        self.trainer.fit_loop.min_epochs = self.trainer.fit_loop.max_epochs

    def _groups(self, block: nn.Module) -> list[list[str]]:
        if self.hparams.true_sequential:
            return self.adapter.sequential_groups(block)
        return [list(self.adapter.linear_layers(block))]

    @property
    def stage(self) -> Stage:
        return self._stages[self.current_epoch]

    def _block(self, index: int) -> nn.Module:
        return self.adapter.blocks(self._lm)[index]

    def _block_prefix(self, index: int) -> str:
        return f"{self.adapter.blocks_path}.{index}"

    # -- fit ---------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._fit_start = time.perf_counter() - self.timings.get("total_fit", 0.0)
        dm = self.trainer.datamodule
        if self.hparams.dry_run:
            gptq = next(cb for cb in self.trainer.callbacks if isinstance(cb, GPTQCallback))
            self.plan = measure_plan(self, gptq.quant, calibrates=gptq.needs_calibration,
                                     resume=any(isinstance(cb, BlockCheckpoint) and cb.every_n_blocks
                                                for cb in self.trainer.callbacks))
            rank_zero_info(self.plan.describe())
            if self.trainer.is_global_zero:
                out = self.output_dir()
                out.mkdir(parents=True, exist_ok=True)
                (out / "plan.json").write_text(json.dumps(self.plan.to_dict(), indent=2))
            return
        if self._resumed_from is not None:
            rank_zero_info(f"resumed from {self._resumed_from}: continuing at "
                           f"{self.stage.describe(len(self.adapter.blocks(self._lm)))}")
            return
        if self._stages and self._stages[0].kind == "capture":
            dtype = self.hparams.activation_dtype or self.hparams.dtype
            cache = estimate_activation_bytes(self._lm.config, dm.nsamples, dm.seqlen, dtype)
            rank_zero_info(f"activation cache: {cache / 2**20:.0f} MiB ({dm.nsamples} × {dm.seqlen} tokens, {dtype}); "
                           f"about twice that while a block's outputs are being collected")
        if self.hparams.eval_before:
            self.results["before"] = self._evaluate("eval_before", self._source)

    def on_train_epoch_start(self) -> None:
        stage = self.stage
        num_blocks = len(self.adapter.blocks(self._lm))
        _describe_progress(self.trainer.progress_bar_callback, stage.describe(num_blocks))
        if stage.kind == "capture":
            self._inputs = BlockInputs(hidden=[], kwargs=[], block_overrides=[])
            if self._source is not None:
                for module in self._outside_blocks():
                    self._source.materialize(self._lm, module)
            return
        if stage.kind == "quantize":
            return
        if self._source is not None and stage.kind == "calibrate" and stage.group == 0:
            self._source.materialize(self._lm, self._block(stage.block))
        block = self._block(stage.block).to(self.device)
        if stage.kind == "calibrate":
            if stage.group == 0:  # fixed before any swap: quantized layers no longer count as linears
                self._block_groups = self._groups(block)
            layers = {name: block.get_submodule(name) for name in self._block_groups[stage.group]}
            self._ctx = BlockContext(stage.block, num_blocks, block, layers, stage.group, stage.num_groups,
                                     prefix=self._block_prefix(stage.block))
            fire_block_hook(self.trainer, self, "on_block_start", self._ctx)
        else:
            self._next_hidden = []
        self._epoch_start = time.perf_counter()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        stage = self.stage
        if stage.kind == "quantize":
            return None
        if stage.kind == "capture":
            start = time.perf_counter()
            got = capture_block_inputs(self._lm, self.adapter, batch["input_ids"], batch_size=batch["input_ids"].shape[0],
                                       storage_dtype=self.hparams.activation_dtype, device=self.device)
            got.hidden = [self._store(h) for h in got.hidden]
            self._inputs.extend(got)  # shares equal masks / rotary tables across batches
            self.timings["capture"] += time.perf_counter() - start
            return None
        block = self._block(stage.block)
        with exact_kernels():  # quantized layers already swapped in: what later blocks see is machine-independent
            hidden = run_block(block, self._inputs.hidden[batch_idx], self._inputs.kwargs_for(stage.block, batch_idx))
        if stage.kind == "propagate":
            self._next_hidden.append(self._store(hidden.to("cpu", dtype=self._inputs.hidden[batch_idx].dtype)))
        return None

    def on_train_epoch_end(self) -> None:
        stage = self.stage
        if stage.kind == "capture":
            if self._source is not None:  # not needed again: the writer copies them from the files
                for module in self._outside_blocks():
                    release(module)
            return
        if stage.kind == "quantize":
            self._quantize_without_calibration()
            return
        self.timings["hessian" if stage.kind == "calibrate" else "propagate"] += time.perf_counter() - self._epoch_start
        if stage.kind == "calibrate":
            start = time.perf_counter()
            fire_block_hook(self.trainer, self, "on_block_end", self._ctx)
            self._ctx = None
            self.timings["solve"] += time.perf_counter() - start
        else:
            if len(self._next_hidden) != len(self._inputs.hidden):
                raise RuntimeError("propagate stage saw fewer batches than were captured (limit_train_batches < 1?)")
            self._inputs.hidden = self._next_hidden
            self._next_hidden = []
            if self.device.type != "cpu":
                self._block(stage.block).to("cpu")
            if self._source is not None:
                self._stream_out(stage.block)
            num_blocks = len(self.adapter.blocks(self._lm))
            for callback in self.trainer.callbacks:
                if isinstance(callback, BlockCheckpoint):
                    self.timings["total_fit"] = time.perf_counter() - self._fit_start
                    start = time.perf_counter()
                    callback.on_block_propagated(self.trainer, self, stage.block, num_blocks)
                    self.timings["resume_checkpoints"] += time.perf_counter() - start

    def on_train_end(self) -> None:
        self.completed = True
        self._inputs = None  # free the activation cache before scoring
        self.timings["total_fit"] = time.perf_counter() - self._fit_start
        out = self.output_dir()
        if self._source is None:  # the quantized model is here: score and time it, then write it
            if self.hparams.eval_after:
                self.results["after"] = self._evaluate("eval_after")
            if self.hparams.latency:
                self._place()
                self.results["latency"] = measure_latency(
                    self._lm, prompt_tokens=self.hparams.latency_prompt_tokens,
                    decode_tokens=self.hparams.latency_decode_tokens).to_dict()
                rank_zero_info(f"latency: {self.results['latency']}")
            self._save(out)
        else:  # streamed: the written folder is the quantized model; score it from there, block by block
            self._save(out)
            self.trainer.strategy.barrier("quantized model written")
            if self.hparams.eval_after:
                self.results["after"] = self._evaluate("eval_after", QuantizedWeightSource(
                    out / "model", dtype=resolve_dtype(self.hparams.dtype), trust_remote_code=self.hparams.trust_remote_code))
        if self.trainer.is_global_zero:
            paths = write_summary(self, out)
            rank_zero_info(f"run summary: {paths[0]} and {paths[1]}")

    def _save(self, out: Path) -> None:
        if self.hparams.save_quantized and self.trainer.is_global_zero:
            start = time.perf_counter()
            gptq = next(cb for cb in self.trainer.callbacks if isinstance(cb, GPTQCallback))
            hessian = next((cb for cb in self.trainer.callbacks if isinstance(cb, HessianCapture)), None)
            quant = gptq.quant
            settings = {"method": gptq.method, "quant": quant.to_dict(), "source_model": self.hparams.model,
                        "true_sequential": self.hparams.true_sequential,
                        "sink_tokens": getattr(hessian, "sink_tokens", None), "sink_weight": getattr(hessian, "sink_weight", None),
                        "sink_layers": getattr(hessian, "sink_layers", None),
                        "sink_probe_windows": getattr(hessian, "sink_probe_windows", None),
                        "sink_block_weights": dict(getattr(hessian, "block_weights", {}))}
            if self._writer is not None:
                self._writer.finish(self._lm, self.tokenizer, self._source, damp_percent=quant.damp,
                                    static_groups=quant.static_groups, true_sequential=self.hparams.true_sequential,
                                    settings={**settings, "streamed": True})
            else:
                save_quantized(self._lm.to("cpu"), self.tokenizer, out / "model", checkpoint_format=self.hparams.checkpoint_format,
                               max_shard_size=self.hparams.max_shard_size, desc_act=quant.act_order, damp_percent=quant.damp,
                               static_groups=quant.static_groups, true_sequential=self.hparams.true_sequential,
                               settings=settings, dtype=self.hparams.save_dtype)
            self.timings["save"] = time.perf_counter() - start
            rank_zero_info(f"quantized model saved to {out / 'model'}")

    def _outside_blocks(self) -> list[nn.Module]:
        """The blocks' owner's other children (embeddings, rotary, final norm): what capture runs or moves."""
        owner, attribute = self.adapter.blocks_location(self._lm)
        return [child for name, child in owner.named_children() if name != attribute]

    def _stream_out(self, index: int) -> None:
        """Write quantized block ``index`` to the output folder's staging area, then free it."""
        start = time.perf_counter()
        block = self._block(index)
        if self.trainer.is_global_zero:
            if self._writer is None:
                self._writer = StreamingWriter(self.output_dir() / "model", checkpoint_format=self.hparams.checkpoint_format,
                                               dtype=self.hparams.save_dtype)
            self._writer.add_block(self._block_prefix(index), block)
        release(block)
        self.timings["save"] += time.perf_counter() - start

    def _store(self, hidden: torch.Tensor) -> torch.Tensor:
        """A batch of cached activations, kept in memory or spilled to a file (``activation_storage``)."""
        if self._spill is None:
            self._spill = self._spill_folder() or False
        return self._spill.put(hidden) if self._spill else hidden

    def _spill_folder(self) -> SpillFolder | None:
        hp, dm = self.hparams, self.trainer.datamodule
        share = -(-dm.nsamples // max(1, self.trainer.world_size))
        cache = estimate_activation_bytes(self._lm.config, share, dm.seqlen, hp.activation_dtype or hp.dtype)
        if not spills_to_disk(hp.activation_storage, cache):
            return None
        folder = self._activation_folder()
        rank_zero_info(f"activation cache: kept in files under {folder} (paged out when memory runs short)")
        return SpillFolder(folder)

    def _activation_folder(self) -> Path:
        """Where spilled activations go (``activation_dir``, default ``<default_root_dir>/activations``)."""
        return Path(os.path.expanduser(self.hparams.activation_dir or Path(self.trainer.default_root_dir) / "activations"))

    # -- resume (see resume.py) --------------------------------------------------------------------
    @property
    def activation_cache(self) -> BlockInputs | None:
        """The cached inputs of the next block to calibrate (between stages)."""
        return self._inputs

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._resume_side is None:
            return  # only BlockCheckpoint's saves, at a block boundary, can be resumed
        checkpoint["gptq_resume"] = {
            "completed_stage": self.current_epoch, "stages": [dataclasses.astuple(s) for s in self._stages],
            "model": self.hparams.model, "timings": dict(self.timings), "results": self.results,
            "activations": dict(self._resume_side), "streaming": self._source is not None,
            # streamed blocks are staged on disk and freed: the writer's record names them
            "layers": {} if self._source is not None else quantized_layers_state(self._lm),
            "writer": self._writer.state_dict() if self._writer is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("gptq_resume")
        path = self.trainer.ckpt_path if self._trainer is not None else None
        if state is None:
            raise ResumeError(f"{path} is not a lightning-gptq resume checkpoint (BlockCheckpoint writes those).")
        stages = [dataclasses.astuple(s) for s in self._stages]
        if [tuple(s) for s in state["stages"]] != stages or state["model"] != self.hparams.model:
            raise ResumeError(f"{path} was written by a run with another model or stage plan "
                              f"({state['model']!r}, {len(state['stages'])} stages; now {self.hparams.model!r}, "
                              f"{len(stages)}); resume with the same config, or start again without --ckpt_path.")
        files = state["activations"]["files"]
        if len(files) != self.trainer.world_size:
            raise ResumeError(f"{path} was written by {len(files)} process(es); resume it with as many "
                              f"(now {self.trainer.world_size}), or start again without --ckpt_path.")
        if state.get("streaming", False) != (self._source is not None):
            written = "a streaming" if state.get("streaming") else "an in-memory"
            raise ResumeError(f"{path} was written by {written} run; resume it with the same model.streaming, or start "
                              "again without --ckpt_path.")
        mine = files[self.trainer.global_rank]
        self._inputs = read_activations(Path(path).parent, mine["name"], mine["sha256"])
        self._inputs.hidden = [self._store(h) for h in self._inputs.hidden]
        restore_quantized_layers(self._lm, state["layers"], quant_linear_class(CALIBRATION_BACKEND))
        if state.get("writer") is not None and self.trainer.is_global_zero:
            try:
                self._writer = StreamingWriter.restore(state["writer"])
            except CheckpointError as error:
                raise ResumeError(f"{path}: {error}; start again without --ckpt_path.") from None
        self.timings.update(state["timings"])
        self.results.update(state["results"])
        self._resumed_from = str(path)

    def _quantize_without_calibration(self) -> None:
        start = time.perf_counter()
        blocks = self.adapter.blocks(self._lm)
        for b, block in enumerate(blocks):
            block.to(self.device)
            ctx = BlockContext(b, len(blocks), block, dict(self.adapter.linear_layers(block)), prefix=self._block_prefix(b))
            fire_block_hook(self.trainer, self, "on_block_start", ctx)
            fire_block_hook(self.trainer, self, "on_block_end", ctx)
            if self.device.type != "cpu":
                block.to("cpu")
        self.timings["solve"] += time.perf_counter() - start

    def output_dir(self) -> Path:
        if self.hparams.output_dir:
            return Path(self.hparams.output_dir)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "quantized"

    def _evaluate(self, label: str, source=None) -> dict:
        """Perplexity on every configured eval set with the standalone evaluator: the whole model held
        here, or block by block from ``source`` (a streaming run's files)."""
        dm = self.trainer.datamodule
        start = time.perf_counter()
        streamed = None if source is None else self._score_streaming(source)
        if source is None:
            self._place()
        results = {}
        for name in dm.eval_datasets:
            if streamed is not None:
                result = streamed[name]
            else:
                with exact_kernels():  # quality, not this machine's bf16 paths: the same number on every CPU
                    result = perplexity(self._lm, dm.eval_tokens(name, self.tokenizer), seqlen=dm.eval_seqlen,
                                        dataset=name, max_windows=dm.eval_max_windows,
                                        progress=self.trainer.progress_bar_callback is not None,
                                        bos_token_id=self._eval_bos(dm))
            rank_zero_info(f"{label}: {result}")
            results[name] = {"ppl": result.ppl, "text": str(result), "windows": result.nsamples,
                             "seqlen": result.seqlen, "tokens": result.n_tokens, "protocol": result.protocol}
            for logger in self.loggers:
                logger.log_metrics({f"{label}/ppl/{name}": result.ppl})
        self.timings[label] += time.perf_counter() - start
        return results

    def peak_memory(self) -> dict:
        memory = {"cpu_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if torch.cuda.is_available():
            memory["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return memory

    # -- validate / test ---------------------------------------------------------------------------
    def _eval_start(self) -> None:
        if self._source is not None:
            self._streamed_scores = self._score_streaming(self._source)
            return
        self._place().eval()
        names = self.trainer.datamodule.eval_datasets
        self._val_ppl = [ProtocolPerplexity(bos=self._eval_bos(self.trainer.datamodule) is not None).to(self.device)
                         for _ in names]

    def _eval_step(self, batch: dict, dataloader_idx: int) -> None:
        if self._source is not None:
            return  # streaming scored every window block by block in _eval_start
        ids = batch["input_ids"].to(self.device)
        with exact_kernels():  # as in _evaluate: perplexity does not depend on which fast paths a CPU has
            self._val_ppl[dataloader_idx].update(self(with_bos(ids, self._eval_bos(self.trainer.datamodule))), ids)

    def _eval_bos(self, dm) -> int | None:
        """The token put before every evaluation window (``data.eval_bos``), else None."""
        return dm.eval_bos_token_id(self.tokenizer) if getattr(dm, "eval_bos", False) else None

    def _score_streaming(self, source) -> dict:
        """Block by block, each block read from ``source``'s files and freed (``blockwise.py``); the
        windows' hidden states go where the activation cache would (``activation_storage``)."""
        dm = self.trainer.datamodule
        lm = source.model if isinstance(source, QuantizedWeightSource) else self._lm
        adapter = self.adapter if lm is self._lm else None
        config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        windows = max(dm.eval_windows(name, self.tokenizer)[0].shape[0] for name in dm.eval_datasets)
        hidden_bytes = windows * dm.eval_seqlen * int(config.hidden_size) * resolve_dtype(self.hparams.dtype).itemsize
        store = None
        if self.device.type == "cpu" and spills_to_disk(self.hparams.activation_storage, hidden_bytes):
            folder = self._activation_folder()
            rank_zero_info(f"scoring: every window's hidden state kept in files under {folder}")
            store = SpillFolder(folder).put
        return score_block_by_block(lm, source, dm, self.tokenizer, device=self.device, adapter=adapter, store=store,
                                    progress=self.trainer.progress_bar_callback is not None,
                                    bos_token_id=self._eval_bos(dm))

    def _eval_end(self, prefix: str) -> None:
        dm = self.trainer.datamodule
        if self._source is not None:
            for name, result in self._streamed_scores.items():
                self.log(f"{prefix}/ppl/{name}", result.ppl, add_dataloader_idx=False)
                rank_zero_info(f"{prefix} perplexity {name}: {result}")
                self.results.setdefault(prefix, {})[name] = {
                    "ppl": result.ppl, "tokens": result.n_tokens, "seqlen": result.seqlen, "windows": result.nsamples,
                    "protocol": result.protocol, "text": str(result)}
            return
        for name, metric in zip(dm.eval_datasets, self._val_ppl):
            value = metric.compute()
            tokens = int(metric.tokens)
            windows, total = tokens // dm.eval_seqlen, dm.eval_windows(name)[1]
            coverage = f"{windows} windows" if windows == total else f"first {windows} of {total} windows, PARTIAL"
            self.log(f"{prefix}/ppl/{name}", value, add_dataloader_idx=False)
            bos = self._eval_bos(dm) is not None
            protocol = protocol_name(windows, total, bos)
            text = (f"{prefix} perplexity {name}: {value.item():.4f} [protocol {protocol}: {protocol_text(bos)}; "
                    f"seqlen {dm.eval_seqlen}; {coverage}; {tokens:,} tokens]")
            rank_zero_info(text)
            self.results.setdefault(prefix, {})[name] = {"ppl": value.item(), "tokens": tokens, "seqlen": dm.eval_seqlen,
                                                         "windows": windows, "total_windows": total,
                                                         "protocol": protocol, "text": text}
            metric.reset()
        if self.hparams.latency:
            lat = measure_latency(self._lm, prompt_tokens=self.hparams.latency_prompt_tokens,
                                  decode_tokens=self.hparams.latency_decode_tokens)
            self.log(f"{prefix}/latency/prefill_tokens_per_s", lat.prefill_tokens_per_s)
            self.log(f"{prefix}/latency/decode_ms_per_token", lat.decode_ms_per_token)
            rank_zero_info(f"{prefix} latency: {lat}")
            self.results.setdefault(prefix, {})["latency"] = lat.to_dict()

    def on_validation_start(self) -> None:
        self._eval_start()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_start(self) -> None:
        self._eval_start()

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    # -- predict -----------------------------------------------------------------------------------
    def on_predict_start(self) -> None:
        self._place().eval()

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        return [complete(self._lm, self.tokenizer, prompt, index, self.generation, self.device)
                for index, prompt in zip(batch["index"], batch["prompt"])]
