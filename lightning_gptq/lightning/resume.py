"""Resuming a killed ``fit``: a Lightning checkpoint after every quantized block.

``BlockCheckpoint`` is a ``ModelCheckpoint`` that saves ``last.ckpt`` only in the ``on_block_propagated``
hook, once a block is done (its quantized outputs are the next block's inputs), so ``fit --ckpt_path last``
finds it the Lightning way and the fit loop continues at the next block's first stage.

What a checkpoint holds: the name and sha256 of a side file with the activation cache (the next
block's inputs, too large and too structured for the checkpoint dict) and of one side file per
finished block with its quantized layers (the packed layout, fp32 scales as calibrated; written once,
when the first resume point after that block is saved; a streaming run's writer records the blocks it
staged instead), plus (``GPTQModule.on_save_checkpoint``) the stage plan, timings and ``eval_before``
scores. Callbacks add their own state (layer records, measured sink weights). Resume points written
before layer files existed hold every layer in the checkpoint itself and still load.

Atomicity: the side file is written under a new name (temporary file, then rename) *before* the
checkpoint that names it; Lightning writes ``last.ckpt`` through an fsspec transaction (temporary
file, then rename); side files no checkpoint names any more are deleted afterwards. A kill at any
moment leaves the previous checkpoint and its side file intact, and a side file that does not match
its recorded sha256 is refused on load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
import uuid
import zipfile
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gptq.checkpoint import CheckpointError
from lightning_gptq.models.adapters import is_linear, linear_in_features, linear_out_features
from lightning_gptq.models.capture import module_device_dtype
from lightning_gptq.models.loading import resolve_dtype
from lightning_gptq.nn import QuantLinear, quant_linear_class, replace_submodule

from .callbacks import CALIBRATION_BACKEND

from .hooks import BlockHooks, run_report

__all__ = [
    "BlockCheckpoint",
    "ResumeError",
    "check_resume_file",
    "restore_run",
    "run_state",
    "quantized_layers_state",
    "read_side_file",
    "restore_quantized_layers",
    "write_side_file",
]

SIDE_PREFIX = "activations-"
LAYERS_PREFIX = "layers-"


class ResumeError(RuntimeError):
    """A resume checkpoint (or the activation file it names) is missing, corrupt, or from another run."""


class BlockCheckpoint(BlockHooks, ModelCheckpoint):
    """Save ``last.ckpt`` after every ``every_n_blocks`` quantized blocks, for ``fit --ckpt_path last``.

    Args:
        dirpath: where checkpoints go; default ``<trainer.default_root_dir>/checkpoints`` (fixed, so a
            re-run with the same ``default_root_dir`` finds it whatever the logger's version folder).
        every_n_blocks: save after every n-th block (and never otherwise); 0 turns saving off.
        min_interval_s: and only once this many seconds have passed since the last resume point (or
            the start of calibration). A resume point writes the whole activation cache (SmolLM2 at
            128 × 2048 windows: 604 MB, about 2 s), which blocks of a few seconds should not pay every
            time; a killed run loses at most this long plus one block. 0: after every n-th block.
        keep: keep the resume checkpoint after a ``fit`` that finished (by default it is deleted
            once the quantized model is written: it holds a full activation cache).
    """

    def __init__(self, dirpath: str | None = None, every_n_blocks: int = 1, min_interval_s: float = 60.0,
                 keep: bool = False) -> None:
        if isinstance(every_n_blocks, bool) or not isinstance(every_n_blocks, int) or every_n_blocks < 0:
            raise MisconfigurationException(f"BlockCheckpoint.every_n_blocks must be an integer >= 0, got {every_n_blocks!r}")
        if isinstance(min_interval_s, bool) or not isinstance(min_interval_s, (int, float)) or not min_interval_s >= 0:
            raise MisconfigurationException(f"BlockCheckpoint.min_interval_s must be a number >= 0, got {min_interval_s!r}")
        self.min_interval_s = float(min_interval_s)
        self._last_saved = time.monotonic()
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, save_on_train_epoch_end=False)
        self.every_n_blocks = every_n_blocks
        self.keep = keep
        self._saving: dict | None = None  # the activation files of the checkpoint being written
        self._completed = False  # every block of the fit was calibrated: the resume point is not needed
        self._driver = None
        self._layer_files: list[dict] = []  # one file per finished block's quantized layers, each written once

    def state_dict(self) -> dict:
        return {**super().state_dict(), "layer_files": list(self._layer_files)}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._layer_files = list(state_dict.get("layer_files", []))

    def report(self) -> dict:
        return {"resume_every_n_blocks": self.every_n_blocks, "resume_min_interval_s": self.min_interval_s}

    @property
    def state_key(self) -> str:
        return "BlockCheckpoint"

    def _directory(self, trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "checkpoints"

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._completed, self._layer_files = False, []
        self.dirpath = str(self._directory(trainer))
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer) -> set[str]:
        self.dirpath = str(self._directory(trainer))  # `fit --ckpt_path last` looks before `setup`
        found = super()._find_last_checkpoints(trainer)
        for path in found:
            check_resume_file(path)
        if not found:  # (Lightning's own warning would advise a ModelCheckpoint setting)
            rank_zero_info(f"--ckpt_path=last: no resume checkpoint in {self.dirpath} yet; starting at the first block")
        return found

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.state.fn == "fit":
            path = self._directory(trainer) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            rank_zero_info(f"interrupted: continue from {path} with the same command and --ckpt_path=last" if
                           path.is_file() else "interrupted before the first resume point (written after a block, at "
                           f"most every {self.min_interval_s:g} s): nothing to continue from")

    def on_fit_start(self, trainer, pl_module) -> None:
        # (after any resume point was read: a run that did not resume would overwrite this one, or delete it at the end)
        path = self._directory(trainer) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        runs_stages = trainer.fit_loop.max_epochs != 0  # (a dry run runs none, and leaves the folder as it is)
        if trainer.ckpt_path is None and path.is_file() and runs_stages:
            raise MisconfigurationException(
                f"{path} is a resume point (of a fit that did not finish, or one kept with resume.keep), which this "
                "run would replace: add --ckpt_path=last (Trainer.fit(ckpt_path='last')) to continue it, or delete it "
                "to start over")

    # Lightning's own triggers stay silent: only finished blocks make a checkpoint worth resuming.
    def on_train_batch_end(self, *args, **kwargs) -> None:
        pass

    def on_train_epoch_end(self, *args, **kwargs) -> None:
        pass

    def on_validation_end(self, *args, **kwargs) -> None:
        pass

    def on_train_end(self, *args, **kwargs) -> None:
        pass  # (Lightning's would write a last.ckpt of the finished run: nothing to resume, a whole model to write)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.keep or trainer.interrupted or not self.dirpath or not self._completed:
            return
        folder = Path(self.dirpath)
        trainer.strategy.barrier("BlockCheckpoint.on_fit_end")
        if not trainer.is_global_zero:
            return
        removed = [p for p in [folder / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}", *folder.glob(f"{SIDE_PREFIX}*"),
                               *folder.glob(f"{LAYERS_PREFIX}*")] if p.is_file()]
        for path in removed:
            path.unlink()
        if removed:
            rank_zero_info(f"fit finished: removed its resume checkpoint from {folder} (keep it with --resume.keep=true)")

    def on_calibration_start(self, trainer, pl_module, driver) -> None:
        self._driver = driver
        self._last_saved = time.monotonic()

    def on_calibration_end(self, trainer, pl_module, driver) -> None:
        self._completed = True

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Only our own saves, at a block boundary, can be resumed: they name the activation files and
        # the finished blocks' layer files, and the module adds the rest of the run's state there.
        if self._saving is not None:
            checkpoint["gptq_resume"] = {"activations": dict(self._saving)}
            if not self._driver.streams:  # a streaming run's writer names its staged blocks
                checkpoint["gptq_resume"]["layer_files"] = list(self._layer_files)

    def _write_layer_files(self, trainer, folder: Path, token: str, upto: int) -> None:
        """Blocks ``..upto`` not written yet: each block's quantized layers to a file of its own, once (rank 0;
        every rank holds the same layers), so a resume point costs one block's layers, not all so far."""
        written = {entry["block"] for entry in self._layer_files}
        new = []
        if trainer.is_global_zero and not self._driver.streams:
            for b in range(upto + 1):
                if b not in written:
                    block, prefix = self._driver.blocks[b], self._driver.block_prefix(b)
                    state = {f"{prefix}.{name}": entry for name, entry in quantized_layers_state(block).items()}
                    name = f"{LAYERS_PREFIX}block{b:04d}-{token}.pt"
                    new.append({"block": b, "name": name, "sha256": write_side_file(state, folder, name)})
        self._layer_files += trainer.strategy.broadcast(new)

    def on_block_propagated(self, trainer, pl_module, ctx) -> None:
        """Block ``ctx.block_index`` is done and ``ctx.inputs`` holds the next block's inputs."""
        block_index, num_blocks = ctx.block_index, ctx.num_blocks
        if self.every_n_blocks == 0 or block_index + 1 == num_blocks:  # the last block: fit is about done
            return
        if (block_index + 1) % self.every_n_blocks:
            return
        if self.min_interval_s > 0:
            due = time.monotonic() - self._last_saved >= self.min_interval_s
            if trainer.world_size > 1:  # every process must take the same branch: it holds collectives
                due = trainer.strategy.broadcast(due)
            if not due:
                return
        folder = self._directory(trainer)
        path = folder / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        # One activation file per process (each holds its own windows' cache); under DDP the folder
        # must be one every process sees (a shared filesystem across nodes).
        token = trainer.strategy.broadcast(uuid.uuid4().hex[:8])
        rank = trainer.global_rank
        name = f"{SIDE_PREFIX}block{block_index + 1:04d}-{token}-rank{rank}.pt"
        mine = {"name": name, "sha256": write_side_file(ctx.inputs, folder, name)}
        self._write_layer_files(trainer, folder, token, block_index)
        files = [mine]
        if trainer.world_size > 1:
            files = [None] * trainer.world_size
            torch.distributed.all_gather_object(files, mine)
        self._saving = {"files": files}
        try:
            trainer.save_checkpoint(path, weights_only=False)  # the full state: callbacks too
        finally:
            self._saving = None
        self.last_model_path = str(path)
        self._last_saved = time.monotonic()
        _remove_stale_side_files(folder, keep=name, rank=rank)
        if trainer.is_global_zero:  # layer files of another run in this folder
            keep = {entry["name"] for entry in self._layer_files}
            for stale in [*folder.glob(f"{LAYERS_PREFIX}*.pt"), *folder.glob(f".{LAYERS_PREFIX}*.partial")]:
                if stale.name not in keep:
                    stale.unlink(missing_ok=True)
        rank_zero_info(f"resume checkpoint after block {block_index + 1}/{num_blocks}: {path}")


def check_resume_file(path: str | os.PathLike) -> None:
    """``ResumeError`` unless ``path`` is a whole ``torch.save`` zip whose members match their recorded CRC-32s
    (a file cut short, or with damaged bytes, fails here in one line instead of deep inside ``torch.load``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        damaged = str(error)
    if damaged is not None:
        raise ResumeError(f"The resume checkpoint {str(path)!r} is damaged (cut short, altered, or not a checkpoint: "
                          f"{damaged}); delete it, or run without --ckpt_path to start over.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes what passes through it (one pass over the bytes, not a re-read)."""

    def __init__(self, file) -> None:
        self.file, self.digest = file, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)


def write_side_file(value, folder: Path, name: str) -> str:
    """Write ``value`` (an activation cache, a block's layers) to ``folder/name`` atomically; returns its
    sha256 (computed as it is written)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    partial = folder / f".{name}.partial"
    with open(partial, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(value, writer)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, target)
    return writer.digest.hexdigest()


def read_side_file(folder: Path, name: str, sha256: str):
    path = folder / name
    if not path.is_file():
        raise ResumeError(f"The resume checkpoint names the file {str(path)!r}, which does not exist.")
    if _sha256(path) != sha256:
        raise ResumeError(f"The resume file {str(path)!r} does not match the sha256 its checkpoint recorded "
                          "(written half-way or altered); start the run again without --ckpt_path.")
    # mapped, not read: a cache spilled to disk (activation_storage) need not fit in memory on the way back
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # our own file, checked above


def _remove_stale_side_files(folder: Path, keep: str, rank: int) -> None:
    """This process's activation files other than ``keep`` (each process removes only its own)."""
    for path in folder.glob(f"{SIDE_PREFIX}*-rank{rank}.pt"):
        if path.name != keep:
            path.unlink(missing_ok=True)
    for path in folder.glob(f".{SIDE_PREFIX}*-rank{rank}.pt.partial"):
        path.unlink(missing_ok=True)


def quantized_layers_state(model: torch.nn.Module) -> dict[str, dict]:
    """Every ``QuantLinear`` of ``model``: its packed tensors and shape/grid settings, by module name; and the
    per-channel parameters of its other modules (norms), which ``GPTQCallback(equalize=...)`` may have rescaled."""
    state = {}
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            tensors = {k: v.detach().cpu().clone() for k, v in layer.packed_tensors().items()}
            if layer.bias is not None:
                tensors["bias"] = layer.bias.detach().cpu().clone()
            state[name] = {"in_features": layer.in_features, "out_features": layer.out_features, "bits": layer.bits,
                           "group_size": layer.group_size, "sym": layer.sym, "tensors": tensors}
        elif name and not is_linear(layer):
            own = {k: p.detach().cpu().clone() for k, p in layer.named_parameters(recurse=False) if p.dim() == 1}
            if own:
                state[name] = {"per_channel": own}
    return state


def restore_quantized_layers(model: torch.nn.Module, state: dict[str, dict], backend: type[QuantLinear]) -> None:
    """Swap ``backend`` layers holding ``state`` (from ``quantized_layers_state``) into ``model``; put the
    per-channel parameters back."""
    for name, entry in state.items():
        try:
            original = model.get_submodule(name)
        except AttributeError:
            raise ResumeError(f"The resume checkpoint holds layer {name!r}, which this model does not have: "
                              "a checkpoint of another model?") from None
        if "per_channel" in entry:
            with torch.no_grad():
                for key, value in entry["per_channel"].items():
                    target = getattr(original, key, None)
                    if not isinstance(target, torch.Tensor) or target.shape != value.shape:
                        raise ResumeError(f"The resume checkpoint's {name}.{key} does not fit this model's "
                                          "(a checkpoint of another model?)")
                    target.copy_(value)
            continue
        tensors = entry["tensors"]
        layer = backend(entry["in_features"], entry["out_features"], bits=entry["bits"], group_size=entry["group_size"],
                        sym=entry["sym"], bias="bias" in tensors, dtype=tensors["scales"].dtype)
        expected = (entry["in_features"], entry["out_features"])
        # (GPT-2's Conv1D has no in_features/out_features attributes; its weight is [in, out])
        current = (expected if isinstance(original, QuantLinear) else
                   (linear_in_features(original), linear_out_features(original)) if is_linear(original) else None)
        if current != expected:
            raise ResumeError(f"Layer {name!r} is {current} here but {expected} in the resume checkpoint.")
        layer.load_state_dict(tensors)
        replace_submodule(model, name, layer.to(tensors["scales"].device))


def run_state(module, stages: list, layers: bool = True) -> dict:
    """What ``GPTQModule`` adds to a resume point (beside the files ``BlockCheckpoint`` names); ``layers``:
    also every quantized layer so far (resume points that name no layer files)."""
    driver = module.driver
    return {
        "completed_stage": module.current_epoch, "stages": [dataclasses.astuple(s) for s in stages],
        "model": module.hparams.model, "timings": dict(module.timings), "results": module.results,
        "streaming": driver.streams,
        # streamed blocks are staged on disk and freed: the writer's record names them
        "layers": quantized_layers_state(driver.model) if layers and not driver.streams else {},
        "writer": module.output.state_dict(),
        "output_folder": os.path.abspath(module.output.folder),  # (a streaming run's blocks are staged beside it)
        "settings": run_settings(module),
    }


def run_settings(module) -> dict:
    """The settings beside the model and stage plan that decide a run's result (JSON values): the solve's and the
    Hessians' callbacks', the calibration windows' and the module's. A resume point is only continued under its own."""
    report, dm, hp = run_report(module.trainer), module.trainer.datamodule, module.hparams
    hessian, quant = report.get("hessian") or {}, report.get("quant")
    settings = {
        **{f"gptq.{k}": report.get(k) for k in ("method", "dynamic", "equalize", "equalize_layers")},
        "gptq.quant": quant.to_dict() if hasattr(quant, "to_dict") else quant,
        **{f"hessian.{k}": hessian.get(k) for k in ("sink_tokens", "sink_weight", "sink_layers", "sink_probe_windows",
                                                     "asymmetric")},
        **{f"data.{k}": getattr(dm, k, None) for k in ("calibration", "nsamples", "seqlen", "seed", "batch_size",
                                                        "calibration_bos")},
        **{f"model.{k}": hp.get(k) for k in ("true_sequential", "calibration_dtype", "activation_dtype", "gguf_file")},
    }
    return json.loads(json.dumps(settings, default=str))


def restore_run(module, state: dict | None, stages: list, path) -> None:
    """Put ``module`` back where the resume point ``state`` (from ``path``) left it: the next block's
    inputs, the quantized layers, the streaming writer, timings and scores. Refuses a resume point of
    another model, stage plan, process count or streaming mode."""
    trainer = module.trainer
    if state is None:
        raise ResumeError(f"{path} is not a lightning-gptq resume checkpoint (BlockCheckpoint writes those).")
    mine = [dataclasses.astuple(s) for s in stages]
    if [tuple(s) for s in state["stages"]] != mine or state["model"] != module.hparams.model:
        raise ResumeError(f"{path} was written by a run with another model or stage plan "
                          f"({state['model']!r}, {len(state['stages'])} stages; now {module.hparams.model!r}, "
                          f"{len(mine)}); resume with the same config, or start again without --ckpt_path.")
    if (saved := state.get("settings")) is not None:  # (resume points before 2026-12-07 (12) have none)
        now = run_settings(module)
        differ = [key for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]
        if differ:
            raise ResumeError(f"{path} was written by a run with other settings: " + "; ".join(
                f"{key} was {saved.get(key)!r}, now {now.get(key)!r}" for key in differ) + ". Resume with the "
                "settings it was written with, or start again without --ckpt_path.")
    files = state["activations"]["files"]
    if len(files) != trainer.world_size:
        raise ResumeError(f"{path} was written by {len(files)} process(es); resume it with as many "
                          f"(now {trainer.world_size}), or start again without --ckpt_path.")
    driver = module.driver
    if state.get("streaming", False) != driver.streams:
        written = "a streaming" if state.get("streaming") else "an in-memory"
        raise ResumeError(f"{path} was written by {written} run; resume it with the same model.streaming, or start "
                          "again without --ckpt_path.")
    if driver.streams and state.get("output_folder") not in (None, os.path.abspath(module.output.folder)):
        raise ResumeError(f"{path} was written by a streaming run that writes {state['output_folder']} (its finished "
                          "blocks are staged beside it): resume it with that model.output_dir, or start again without "
                          "--ckpt_path.")
    inputs = read_side_file(Path(path).parent, files[trainer.global_rank]["name"], files[trainer.global_rank]["sha256"])
    cached = {h.dtype for h in inputs.hidden}
    expected = resolve_dtype(driver.activation_dtype or module_device_dtype(driver.model)[1])
    if cached - {expected}:  # e.g. an fp64 stream (calibration_dtype: float64) resumed as an fp32 one
        raise ResumeError(f"{path} holds block inputs in {', '.join(sorted(map(str, cached)))}, this run caches "
                          f"{expected}: resume it with the same model.calibration_dtype and activation_dtype, or start "
                          "again without --ckpt_path.")
    inputs.hidden = [driver.store(h) for h in inputs.hidden]
    if driver.reference_stream != (getattr(inputs, "reference", None) is not None):
        raise ResumeError(f"{path} was written by a run {'with' if driver.reference_stream is False else 'without'} "
                          "asymmetric calibration (hessian.asymmetric); resume it with the same setting, or start again "
                          "without --ckpt_path.")
    if driver.reference_stream:
        inputs.reference = [driver.store(h) for h in inputs.reference]
    driver.inputs = inputs
    oracle = quant_linear_class(CALIBRATION_BACKEND)
    restore_quantized_layers(driver.model, state["layers"], oracle)
    for entry in state.get("layer_files", []):
        restore_quantized_layers(driver.model, read_side_file(Path(path).parent, entry["name"], entry["sha256"]), oracle)
    if state.get("writer") is not None and trainer.is_global_zero:
        try:
            module.output.load_state_dict(state["writer"])
        except CheckpointError as error:
            raise ResumeError(f"{path}: {error}; start again without --ckpt_path.") from None
    module.timings.update(state["timings"])
    module.results.update(state["results"])
    # (Lightning restores the epoch after on_fit_start: module.stage still names the first one there)
    rank_zero_info(f"resumed from {path}: continuing at "
                   f"{stages[state['completed_stage'] + 1].describe(len(driver.blocks))}")
