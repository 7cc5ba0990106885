"""Quantization callbacks, usable in any Lightning project.

- ``HessianCapture`` (``hessians.py``): while a block's calibration passes run, accumulates each layer's Hessian.
- ``GPTQCallback``: at ``on_block_end`` solves each layer (GPTQ or round-to-nearest) and swaps in a
  quantized linear. On a module that does not drive blocks itself (any user LightningModule), it
  quantizes the whole model once training ends, calibrating on the first training batches.
"""

from __future__ import annotations

import hashlib
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal

import torch
from torch import nn
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

from lightning_gptq.checkpoint.compressed_tensors import FORMAT as CT_FORMAT, export_problems
from lightning_gptq.checkpoint.names import file_names_of
from lightning_gptq.checkpoint.serving import planned_settings, vllm_report
from lightning_gptq.models.adapters import is_linear, linear_in_features, linear_out_features, weight_out_in
from lightning_gptq.nn import (AUTO, QuantLinear, backend_unavailable_on, check_backend, make_quant_linear,
                               replace_submodule, to_backend)
from lightning_gptq.quant import DampingIncreasedWarning, QuantConfig, QuantConfigError, gptq_quantize, rtn_quantize
from lightning_gptq.quant.rules import LayerRules

from .distributed import all_agree, world_size
from .equalizer import Equalizer
from .hessians import HessianCapture
from .hooks import BlockContext, BlockHooks, drives_blocks, fire_block_hook

__all__ = ["CALIBRATION_BACKEND", "GPTQCallback", "HessianCapture", "LayerRecord"]

CALIBRATION_BACKEND = "torch"  # the oracle layer, while calibration passes still run through the model


@dataclass
class LayerRecord:
    """What quantizing one layer did: the solver's loss, the damping used, wall seconds."""

    name: str
    block: int
    shape: tuple[int, int]
    method: str
    loss: float
    damp: float
    damp_retries: int
    nsamples: int
    seconds: float
    bits: int = 0  # 0: a record of an earlier version (the run's one QuantConfig)
    group_size: int = 0
    # sha256 (16 hex digits) of the fp64 sum the solve read, of the codes, zeros and column order it gave,
    # and of its scales in the weight's dtype (as the layer keeps them): two runs' records show where
    # they parted (scripts/compare_runs.py); "" where there was none.
    hessian_sha256: str = ""
    codes_sha256: str = ""
    scales_sha256: str = ""
    equalize_alpha: float | None = None  # the input-scaling exponent kept (``GPTQCallback(equalize=...)``); None: none


def digest(*tensors: torch.Tensor, chunk_bytes: int = 1 << 26) -> str:
    """The first 16 hex digits of sha256 over the tensors' dtypes, shapes and bytes, read ``chunk_bytes``
    at a time (a 49152-wide Hessian is 19 GB: never copied whole)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        flat = t.detach().reshape(-1)
        step = max(1, chunk_bytes // max(1, flat.element_size()))
        for start in range(0, flat.numel(), step):
            h.update(flat[start: start + step].cpu().contiguous().view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]


class GPTQCallback(BlockHooks, Callback):
    """Quantize each calibrated block's linears and swap in quantized layers.

    Args:
        quant: bits, group size, grid and solver settings.
        method: ``"gptq"`` (needs ``HessianCapture`` among the callbacks) or ``"rtn"`` (round to nearest).
        backend: which quantized-linear backend the layers end up on: ``"auto"`` (default) times every
            backend that supports the layer on this machine, once per layer shape, and takes the
            fastest; or a registered name (``"torch"``, ``"cpu-int4"``, ``"triton"``). While
            calibration goes on, swapped layers are the plain ``torch`` oracle (so the result does
            not depend on the machine's fast kernels); they are converted when training ends.
        calibration_batches: on a user's own module, how many training batches to calibrate on.
        dynamic: per-layer settings by layer name, GPTQModel's form, recorded in the checkpoint:
            ``{"+:<regex>": {"bits": 8}, "-:<regex>": {}}``; the first pattern that ``re.match``-es the full layer
            name (``model.layers.3.mlp.down_proj``) wins; ``-:`` leaves the layer in full precision; keys are
            ``QuantConfig`` fields (or ``desc_act``, ``damp_percent``). See ``lightning_gptq.quant.rules``.
        exclude: on a user's own module, regular expressions of layer names to leave in full precision.
        forward_fn: on a user's own module, how to run it on a batch (default ``pl_module(batch)``, or
            ``pl_module(batch[0])`` for tuple/list batches).
        token_mask_fn: on a user's own module, the batch's ``[batch, seq]`` padding mask (0: padding), whose positions
            add nothing to the Hessians of layers reading ``[batch, seq, features]`` (default: a mapping batch's
            ``attention_mask``, if it has one; ``lambda batch: None`` counts every position).
        equalize: exponents ``α`` to try, besides 0, for the layers whose input's producer can absorb a per-channel
            scale (q/k/v and gate/up after their norms, down_proj after up_proj, fc2 after fc1): the input is
            scaled by ``E[x²]^(α/2)`` per channel, the inverse folded into the producer, and the ``α`` with the
            lowest output error is kept (``quant/equalize.py``); the rewrite is made only where the block's output
            stays the same on its own inputs (``models/equalization.py``). ``[]``: off.
        equalize_layers: with ``equalize``, scale only the groups whose every layer's full name ``re.match``-es this
            regular expression (``'.*\\.down_proj$'``); None: every group that can be.
    """

    block_hook_order = 10

    def __init__(
        self,
        quant: QuantConfig = QuantConfig(),
        method: Literal["gptq", "rtn"] = "gptq",
        backend: str = AUTO,
        calibration_batches: int = 16,
        dynamic: dict[str, dict[str, int | float | bool | str]] | str | None = None,
        exclude: list[str] | None = None,
        forward_fn: Callable[[Any, Any], Any] | None = None,
        token_mask_fn: Callable[[Any], Any] | None = None,
        equalize: list[float] | None = None,
        equalize_layers: str | None = None,
    ) -> None:
        if method not in ("gptq", "rtn"):
            raise MisconfigurationException(f"GPTQCallback.method must be 'gptq' or 'rtn', got {method!r}")
        if calibration_batches < 1:
            raise MisconfigurationException(f"GPTQCallback.calibration_batches must be >= 1, got {calibration_batches}")
        try:
            check_backend(backend)  # unknown backend -> clear error now, not after calibration
        except ValueError as error:
            raise MisconfigurationException(f"GPTQCallback.backend: {error}") from None
        equalize = list(equalize or [])
        if any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 2 for a in equalize):
            raise MisconfigurationException(f"GPTQCallback.equalize must be exponents in [0, 2], got {equalize!r}")
        try:
            re.compile(equalize_layers or "")
        except re.error as error:
            raise MisconfigurationException(f"GPTQCallback.equalize_layers is not a regular expression: {error}") from None
        if equalize and method != "gptq":  # e.g. a config's setting under --gptq.method=rtn: not an error
            rank_zero_warn("GPTQCallback.equalize is ignored with method='rtn': it chooses by the output error on "
                           "the Hessians that only GPTQ gathers")
            equalize = []
        if isinstance(dynamic, str):  # what the command line hands over when the text is not a mapping
            dynamic = _rules_from_text(dynamic)
        try:
            self.rules = LayerRules(dynamic)
            self.rules.check(quant)
        except QuantConfigError as error:
            raise MisconfigurationException(f"GPTQCallback.{error}") from None
        self.quant = quant
        self.dynamic = dict(dynamic or {})
        self.method = method
        self.backend = backend
        self.calibration_batches = calibration_batches
        try:
            self.exclude = [re.compile(p) for p in (exclude or [])]
        except re.error as error:
            raise MisconfigurationException(f"GPTQCallback.exclude holds a pattern that is not a regular expression: "
                                            f"{error}") from None
        self.forward_fn = forward_fn
        self.token_mask_fn = token_mask_fn
        self.equalize = [float(a) for a in equalize]
        self.equalize_layers = equalize_layers
        self.equalizer = Equalizer(self.equalize, equalize_layers) if self.equalize else None
        self.records: list[LayerRecord] = []
        self.vllm_refusals: list[str] | None = None  # why vLLM would not serve what this run writes ([]: it would)
        # a calibration driver fires the block hooks (GPTQModule); else quantize the user's module at train end
        self._driven = self._quantized_module = False

    def state_dict(self) -> dict:
        return {"records": [asdict(r) for r in self.records]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.records = [LayerRecord(**{**r, "shape": tuple(r["shape"])}) for r in state_dict.get("records", [])]

    @property
    def needs_calibration(self) -> bool:
        """Whether the driver must run calibration passes (GPTQ needs Hessians; RTN needs nothing)."""
        return self.method == "gptq"

    # -- Lightning hooks ---------------------------------------------------------------------------
    def report(self) -> dict:
        return {"method": self.method, "quant": self.quant, "dynamic": self.dynamic, "equalize": self.equalize,
                "equalize_layers": self.equalize_layers,
                "layers": self.summary(), "vllm_refusals": self.vllm_refusals,
                "equalize_refused": [] if self.equalizer is None else list(self.equalizer.refused)}

    def quantizes(self, name: str) -> bool:
        return self.rules.config_for(name, self.quant) is not None  # a `-:` rule keeps the layer dense

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._driven = self._quantized_module = False
        if stage == "fit" and self.method == "gptq" and not any(isinstance(cb, HessianCapture) for cb in trainer.callbacks):
            raise MisconfigurationException(
                "GPTQCallback(method='gptq') needs the layer Hessians: add HessianCapture() to the Trainer's callbacks."
            )
        if self.equalize and any(getattr(cb, "asymmetric", False) for cb in trainer.callbacks):
            raise MisconfigurationException("GPTQCallback.equalize and HessianCapture(asymmetric=True) do not combine yet: "
                                            "the input mismatch would need the same scaling; choose one")
        if stage == "fit" and (why := backend_unavailable_on(self.backend, trainer.strategy.root_device.type)):
            raise MisconfigurationException(f"GPTQCallback.backend: {why}")  # (else found after calibrating)
        if stage == "fit" and (skipped := _fit_loop_skipped(trainer)):
            raise MisconfigurationException(f"GPTQCallback quantizes in the fit loop, which Trainer({skipped}) skips: "
                                            "nothing would be quantized")
        if stage == "fit" and not drives_blocks(pl_module):
            self._check_own_module(trainer, pl_module)

    def _check_own_module(self, trainer, pl_module) -> None:
        """Before training: what would make quantizing a user's own module at train end fail, or go wrong unsaid."""
        if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            raise MisconfigurationException(
                f"GPTQCallback on your own module cannot run under {type(trainer.strategy).__name__} with start method "
                f"{trainer.strategy.launcher._start_method!r}: the worker processes quantize the module, and Lightning "
                "hands the main process back only the weights that fit its original layers (a model neither trained "
                "nor quantized). Use strategy='ddp', where each process keeps its quantized module")
        linears = [name for name, m in pl_module.named_modules() if name and is_linear(m)]
        for pattern in self.exclude:
            if not any(pattern.search(name) for name in linears):
                rank_zero_warn(f"GPTQCallback.exclude: {pattern.pattern!r} matches no linear layer (names look like "
                               f"{linears[0] if linears else None!r}, searched with re.search); it keeps none in full precision")
        self._warn_unmatched_rules(linears, lambda name: name)
        if not self._own_layers(pl_module):
            quantized = sum(isinstance(m, QuantLinear) for m in pl_module.modules())
            raise MisconfigurationException(
                "GPTQCallback found no nn.Linear layers to quantize in the LightningModule" + (
                    f" ({len(linears)} excluded)" if linears else "") + (
                    f"; {quantized} of its layers are quantized already (a second fit?)" if quantized else ""))

    def _own_layers(self, pl_module) -> dict[str, nn.Module]:
        """The linears of a user's own module that this callback quantizes (not excluded, not kept by a rule)."""
        return {name: m for name, m in pl_module.named_modules()
                if name and is_linear(m) and not any(p.search(name) for p in self.exclude) and self.quantizes(name)}

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self._driven and not self._quantized_module:  # (the loop ran no epoch, so train end never came)
            rank_zero_warn("GPTQCallback quantized nothing: the fit loop ended before training did (max_epochs=0?), "
                           "and the model is as it was")

    def on_block_end(self, trainer, pl_module, ctx: BlockContext) -> None:
        layers = list(ctx.layers.items())
        bar = _layer_bar(trainer, layers, ctx)
        groups = {}
        if self.equalizer is not None and ctx.stage == "calibrate":
            groups = self.equalizer.groups(ctx, lambda name: self.quantizes(ctx.full_name(name)))
        solved = {}  # layers solved with their group, waiting for their turn
        self._unreached: list[str] = []  # layers no calibration token reached
        for name, layer in layers:
            if bar is not None:
                bar.set_postfix_str(name)
            if name in groups and self.equalizer.still_planned(ctx, *groups[name]):
                solved.update(self._solve_group(trainer, ctx, *groups[name]))
            record = self._quantize_layer(ctx, name, layer, solved.pop(name, None))
            if record is not None:  # None: a `-:` rule keeps it in full precision
                self.records.append(record)
                _log_layer(trainer, ctx, record)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if self._unreached:
            rank_zero_warn(f"{ctx.describe()}: no calibration token reached {len(self._unreached)} layer(s) (experts "
                           f"the router never chose: {self._unreached[:4]}{', ...' if len(self._unreached) > 4 else ''}); "
                           "rounded to nearest. More or longer calibration windows reach more experts.")
        if world_size(trainer) > 1:
            self._check_ranks_agree(trainer, ctx)

    def _check_ranks_agree(self, trainer, ctx: BlockContext) -> None:
        """Every rank solved the same all-reduced problem; prove they got the same layers."""
        sums = []
        for name in ctx.results:
            q = ctx.results[name]
            sums += [q.codes.to(torch.float64).sum(), q.scales.to(torch.float64).sum(), q.zeros.to(torch.float64).sum()]
        device = trainer.strategy.root_device  # nccl gathers CUDA tensors only; gloo CPU ones
        local = torch.stack(sums).to(device) if sums else torch.zeros(1, dtype=torch.float64, device=device)
        gathered = trainer.strategy.all_gather(local)
        if not bool((gathered == gathered[0]).all()):
            raise RuntimeError(f"{ctx.describe()}: the processes quantized the block differently (different "
                               "hardware or library versions across nodes?); the result would depend on the rank.")

    def on_calibration_start(self, trainer, pl_module, driver) -> None:
        self._driven = True
        linears = {f"{driver.block_prefix(b)}.{name}": layer for b, block in enumerate(driver.blocks)
                   for name, layer in driver.adapter.linear_layers(block).items()}
        self._warn_unmatched_rules(list(linears), file_names_of(driver.model))
        self._warn_serving(linears, getattr(pl_module.hparams, "checkpoint_format", "auto"))

    def _warn_unmatched_rules(self, names: list[str], to_file) -> None:
        """One warning per ``dynamic`` rule that matches none of the layers ``names``: a typo, or a name spelt as
        checkpoint files spell it (``to_file``; Mixtral's ``block_sparse_moe.experts.<e>.w2``) rather than as the
        model does."""
        for key, _, compiled, _ in self.rules.rules:
            if not names or any(compiled.match(n) for n in names):
                continue
            spelt = [n for n in names if compiled.match(to_file(n))]
            hint = (f"; it matches names as checkpoint files spell them ({to_file(spelt[0])!r}), but rules match "
                    f"the model's module names ({spelt[0]!r})" if spelt else "")
            rank_zero_warn(f"GPTQCallback.dynamic: the rule {key!r} matches no layer (names look like "
                           f"{names[0]!r}){hint}; the layers it was meant for take the base settings")

    def _warn_serving(self, linears: dict[str, nn.Module], checkpoint_format: str = "auto") -> None:
        """One warning, before any work, when vLLM would not serve the checkpoint this run writes."""
        shapes = {name: (linear_in_features(m), linear_out_features(m)) for name, m in linears.items()}
        solved = self.method == "gptq"
        settings = planned_settings({name: self.rules.config_for(name, self.quant) for name in shapes},
                                    self.rules.layout_rules(), solved=solved)
        if settings is None:  # nothing is quantized
            self.vllm_refusals = []
            return
        if checkpoint_format == CT_FORMAT:  # what that export cannot write fails now, not after the solve
            problems = export_problems(settings, shapes)
            if problems:
                raise MisconfigurationException("checkpoint_format='compressed-tensors' cannot write this run: "
                                                + "; ".join(problems))
        self.vllm_refusals, message = vllm_report(settings, shapes, solved and self.quant.act_order, checkpoint_format)
        if message:
            rank_zero_warn(f"GPTQCallback: {message}")

    def on_calibration_end(self, trainer, pl_module, driver) -> None:
        # Calibration ran on the oracle layers; now the backend the user asked for (streamed blocks
        # were written out and freed: nothing left to convert), chosen on the device the model computes on.
        # A GPU run's finished blocks wait on the CPU: each visits the GPU to be converted, one at a time (chosen on
        # the CPU, `auto` would time CPU kernels in fp16 and build the C++ ones, all thrown away on the GPU).
        if driver.streams:
            return
        if driver.device.type == "cpu":
            to_backend(driver.model, self.backend)
            return
        for block in driver.blocks:
            block.to(driver.device)
            to_backend(block, self.backend, head=False)
            block.to("cpu")

    def on_train_end(self, trainer, pl_module) -> None:
        if not self._driven:  # a user's own module: its whole model is the one block
            self.quantize_module(trainer, pl_module)
            to_backend(pl_module, self.backend)
            self._quantized_module = True
            if any(isinstance(cb, ModelCheckpoint) and (cb.last_model_path or cb.best_model_path)
                   for cb in trainer.checkpoint_callbacks):
                rank_zero_warn("GPTQCallback: the checkpoints ModelCheckpoint wrote during training hold the module before "
                               "quantizing (it is quantized when training ends), so test/validate(ckpt_path=...) cannot "
                               "load them into it: score the module as it is, and save it once fit returns "
                               "(lightning_gptq.save_quantized for a Hugging Face model inside it)")

    # -- work --------------------------------------------------------------------------------------
    def _quantize_layer(self, ctx: BlockContext, name: str, layer, presolved=None) -> LayerRecord | None:
        """Solve ``layer`` (or take ``presolved``, ``(QuantizedWeight, alpha, seconds)`` from its group) and swap it in."""
        start = time.perf_counter() - (presolved[2] if presolved is not None else 0.0)
        full_name = ctx.full_name(name)
        quant = self.rules.config_for(full_name, self.quant)
        if quant is None:  # a `-:` rule: stays a full-precision linear; its Hessian is not needed
            self._drop_hessian(ctx, name)
            return None
        weight = weight_out_in(layer)
        nsamples, hessian_sha, alpha, method = 0, "", None, self.method
        accumulator = ctx.hessians.get(name) if self.method == "gptq" else None
        if self.method == "gptq" and accumulator is None:
            raise RuntimeError(f"no Hessian for layer {full_name!r}: GPTQ solves with the ones HessianCapture gathers "
                               "(fire its hooks before GPTQCallback's), or use method='rtn'")
        if accumulator is not None and accumulator.nsamples == 0:  # a MoE expert no calibration token chose
            self._unreached.append(name)
            self._drop_hessian(ctx, name)
            method = "rtn"
        if method == "gptq":
            nsamples = accumulator.nsamples
            # The last layer reading this Hessian lets the solve consume it (q/k/v share one).
            last = sum(other is accumulator for other in ctx.hessians.values()) == 1
            mismatch = ctx.mismatches.get(name)  # asymmetric calibration (HessianCapture(asymmetric=True))
            hessian_sha = digest(accumulator.total, *([] if mismatch is None else [mismatch.total]))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", DampingIncreasedWarning)
                if presolved is not None:
                    qweight, alpha, _ = presolved
                else:
                    qweight = gptq_quantize(weight, accumulator.hessian, quant, overwrite_hessian=last,
                                            asymmetry=None if mismatch is None else mismatch.mismatch)
            for w in caught:
                rank_zero_warn(f"{full_name}: {w.message}")
            self._drop_hessian(ctx, name)  # the last reader frees it: the solve consumed it
        else:
            qweight = rtn_quantize(weight, quant)
        # The oracle ("torch") layer while calibration goes on: later blocks' inputs, hence their
        # Hessians, must not depend on how a fast kernel rounds (a 1-ulp difference in the dense
        # weight compounds over 30 blocks into ±1% layer losses); on_train_end converts.
        replace_submodule(ctx.block, name, make_quant_linear(layer, qweight, CALIBRATION_BACKEND))
        ctx.results[name] = qweight
        return LayerRecord(
            name=full_name, block=ctx.block_index, shape=tuple(weight.shape), method=method, loss=qweight.loss,
            damp=qweight.damp, damp_retries=qweight.damp_retries, nsamples=nsamples, seconds=time.perf_counter() - start,
            bits=quant.bits, group_size=quant.group_size, hessian_sha256=hessian_sha,
            codes_sha256=digest(qweight.codes, qweight.zeros, qweight.g_idx),
            scales_sha256=digest(qweight.scales.to(weight.dtype)), equalize_alpha=alpha,
        )

    def _solve_group(self, trainer, ctx: BlockContext, producer: str, members: list[str]) -> dict[str, tuple]:
        """Solve ``members`` together in scaled input coordinates (``equalize``); fold the scales into ``producer``
        where the block allows it. ``{member: (QuantizedWeight, alpha, seconds)}`` (the group's time, shared out)."""
        start = time.perf_counter()
        configs = [self.rules.config_for(ctx.full_name(name), self.quant) for name in members]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DampingIncreasedWarning)
            results, alpha, scales = self.equalizer.solve(ctx, producer, members, ctx.hessians[members[0]].hessian,
                                                          configs, agree=all_agree(trainer))
        for w in caught:
            rank_zero_warn(f"{ctx.full_name(members[0])} (with {members[1:]}): {w.message}")
        if alpha is None:
            rank_zero_warn(f"GPTQCallback.equalize: {self.equalizer.refused[-1]}: scaling the input changes the "
                           "block's output (not an equivalent rewrite here); solved without it for this block type")
        if scales is not None:
            self._folded(ctx, producer, scales)
        share = (time.perf_counter() - start) / len(members)
        return {name: (q, alpha, share) for name, q in zip(members, results)}

    def _folded(self, ctx: BlockContext, producer: str, scales: torch.Tensor) -> None:
        """``producer``'s output channels were divided by ``scales``: bring its result and record in step (a
        record's scales digest is of what the layer now holds)."""
        if producer in ctx.results:  # solved in this step
            result = ctx.results[producer]
            result.scales = (result.scales.to(torch.float64) / scales.to(result.scales.device)[:, None]).to(result.scales.dtype)
        layer = ctx.block.get_submodule(producer)
        if isinstance(layer, QuantLinear):
            name = ctx.full_name(producer)
            for record in (r for r in self.records if r.name == name):
                record.scales_sha256 = digest(layer.scales.T)

    @staticmethod
    def _drop_hessian(ctx: BlockContext, name: str) -> None:
        """Forget ``name``'s Hessian (and input mismatch); free them (in_features² floats) once no other layer of
        this step reads them."""
        accumulator = ctx.hessians.pop(name, None)
        if accumulator is not None and not any(other is accumulator for other in ctx.hessians.values()):
            accumulator.release()
        mismatch = ctx.mismatches.pop(name, None)
        if mismatch is not None and not any(other is mismatch for other in ctx.mismatches.values()):
            mismatch.release()

    def quantize_module(self, trainer, pl_module) -> None:
        """Quantize every linear of ``pl_module`` (one block: the whole model), calibrating on the
        first ``calibration_batches`` training batches. Hessians come from the full-precision model."""
        layers = self._own_layers(pl_module)
        if not layers:
            raise MisconfigurationException("GPTQCallback found no nn.Linear layers to quantize in the LightningModule")
        if any(hasattr(getattr(m, "config", None), "to_dict") for m in pl_module.modules()):
            self._warn_serving(layers)  # (a Hugging Face model inside: one a server could be given)
        if self.equalizer is not None:
            rank_zero_warn("GPTQCallback.equalize needs the block-by-block calibration of a causal LM (GPTQModule); "
                           "this module's layers are solved without it")
        ctx = BlockContext(block_index=0, num_blocks=1, block=pl_module, layers=layers)
        was_training = pl_module.training
        pl_module.eval()
        fire_block_hook(trainer, pl_module, "on_block_start", ctx)
        seen = 0
        try:  # a failing batch leaves the model unquantized (HessianCapture.on_exception removes its hooks)
            if self.method == "gptq":
                dataloader = trainer.train_dataloader
                if dataloader is None:
                    raise MisconfigurationException("GPTQCallback needs the training dataloader to calibrate on")
                with torch.no_grad():
                    for batch in dataloader:
                        if seen == self.calibration_batches:
                            break
                        batch = move_data_to_device(batch, pl_module.device)
                        ctx.token_mask = self._token_mask(batch)
                        self._forward(pl_module, batch)
                        seen += 1
                ctx.token_mask = None
                # Layers whose forward never runs (nn.MultiheadAttention reads out_proj.weight directly)
                # have no inputs to calibrate on: they stay in full precision.
                idle = [n for n in layers if n in ctx.hessians and ctx.hessians[n].nsamples == 0]
                if idle:
                    rank_zero_warn(f"GPTQCallback: no inputs reached {idle} (their forward is never called); "
                                   "they stay in full precision")
                    for name in idle:
                        del ctx.layers[name], ctx.hessians[name]
            fire_block_hook(trainer, pl_module, "on_block_end", ctx)
        finally:
            pl_module.train(was_training)
        if self.method == "gptq" and seen < self.calibration_batches:
            rank_zero_warn(f"GPTQCallback: calibrated on {seen} batches, fewer than calibration_batches="
                           f"{self.calibration_batches}: the training dataloader holds no more")
        rank_zero_info(f"GPTQCallback: quantized {len(layers)} layers with {self.method} on {seen} calibration batches")

    def _token_mask(self, batch) -> torch.Tensor | None:
        """The batch's ``[batch, seq]`` padding mask (``token_mask_fn``, else a mapping's ``attention_mask``), or None
        where every position is a real token."""
        mask = self.token_mask_fn(batch) if self.token_mask_fn is not None else (
            batch.get("attention_mask") if isinstance(batch, Mapping) else None)
        if mask is None:
            return None
        mask = torch.as_tensor(mask)
        if mask.dim() != 2 or not bool(((mask == 0) | (mask == 1)).all()):
            raise MisconfigurationException(f"GPTQCallback: a token mask must be [batch, seq] of 0 (padding) and 1, got "
                                            f"shape {tuple(mask.shape)}")
        return None if bool(mask.all()) else mask.float()

    def _forward(self, pl_module, batch) -> None:
        if self.forward_fn is not None:
            self.forward_fn(pl_module, batch)
        elif isinstance(batch, (tuple, list)):
            pl_module(batch[0])
        else:
            pl_module(batch)

    def summary(self) -> list[dict]:
        return [asdict(r) for r in self.records]


def _fit_loop_skipped(trainer) -> str | None:
    """The Trainer setting that makes ``fit`` skip its loop (so no train end, where quantizing happens), or None."""
    if trainer.limit_train_batches == 0:
        return "limit_train_batches=0"
    if trainer.fit_loop.max_steps == 0:
        return "max_steps=0"
    return None


def _rules_from_text(text: str) -> dict:
    import yaml

    try:
        rules = yaml.safe_load(text)
    except yaml.YAMLError as error:
        rules, reason = None, f" ({str(error).splitlines()[0]})"
    else:
        reason = ""
    if not isinstance(rules, dict):
        raise MisconfigurationException(
            f"GPTQCallback.dynamic must be a mapping of layer-name patterns to settings, got {text!r}{reason}. Inside "
            'double quotes a regex\'s backslash is written twice ("+:.*\\\\.down_proj$"); in YAML, single quotes '
            "keep it as it is ('+:.*\\.down_proj$').")
    return rules


def _layer_bar(trainer, layers, ctx: BlockContext):
    if trainer is None or trainer.progress_bar_callback is None or len(layers) < 2 or not trainer.is_global_zero:
        return None  # (every process solves the same layers: one bar, as Lightning shows one)
    from tqdm.auto import tqdm

    return tqdm(total=len(layers), desc=f"solve {ctx.describe()}", unit="layer", leave=False, dynamic_ncols=True)


def _log_layer(trainer, ctx: BlockContext, record: LayerRecord) -> None:
    """Per-layer metrics to every logger: one series per layer type, the block index as step."""
    name = record.name[len(ctx.prefix) + 1:] if ctx.prefix else record.name
    metrics = {f"gptq/{name}/loss": record.loss, f"gptq/{name}/damp": record.damp}
    for logger in trainer.loggers if trainer is not None else []:
        logger.log_metrics(metrics, step=ctx.block_index)
