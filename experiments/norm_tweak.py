"""Norm tweaking (Li et al., 2023), as a study: after GPTQ has solved a block, fit the block's norm weights
so that the quantized block's output matches the full-precision block's on a few calibration windows.

A callback joining the block loop (``on_block_start``/``on_block_end``, after ``GPTQCallback``): at the first
calibration step of a block it keeps a copy of the still full-precision block; at the last step's end (every
linear quantized) it computes that copy's output on ``windows`` of the cached inputs (the partly quantized
model's: the same inputs the quantized block sees), then runs Adam on a relative change ``δ`` of every 1-D norm
weight of the block (``γ = γ₀ (1 + δ)``) for ``epochs`` passes over those windows, minimising the mean squared
error of the block's output. The tweak is kept only if it lowers the error on ``guard`` other cached windows.
Propagation then runs the tweaked block.

    PYTHONPATH=experiments python scripts/quality_table.py --rows ours-4 --eval choose --quick --tag normtweak \
        -- '--trainer.callbacks+={"class_path": "norm_tweak.NormTweak", "init_args": {"windows": 8}}'
"""

from __future__ import annotations

import copy
import logging

import torch
from lightning.pytorch import Callback
from torch import nn

from lightning_gptq.lightning.hooks import BlockHooks
from lightning_gptq.models.capture import module_device_dtype, tensors_to_device
from lightning_gptq.models.equalization import _per_channel

log = logging.getLogger("lightning_gptq")


def _norm_weights(block: nn.Module) -> dict[str, nn.Parameter]:
    """The block's per-channel norm weights (what input scaling folds its divisors into)."""
    return {name: m.weight for name, m in block.named_modules() if name and _per_channel(m)}


def _forward(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    device, dtype = module_device_dtype(block)
    out = block(hidden.to(device=device, dtype=dtype), **tensors_to_device(kwargs, device))
    return out[0] if isinstance(out, (tuple, list)) else out


class NormTweak(Callback, BlockHooks):
    """``windows``: cached windows fitted on; ``guard``: other windows the tweak must not make worse;
    ``epochs`` passes, Adam at ``lr`` (on the relative change of each norm weight). ``target``: ``same-input``
    (the full-precision block on the quantized model's inputs) or ``float-model`` (the full-precision model's own
    output at this block, from a stream of those windows kept here: the tweak then also answers earlier blocks'
    error). ``loss``: ``mse`` over the block's output, or ``per-channel``: each output channel's squared error divided
    by that channel's mean square in the block's update (target − input) on the fit windows, so that the few
    channels SmolLM2 writes tens of times louder than the rest do not make the whole loss."""

    block_hook_order = 20  # after GPTQCallback (10) has swapped the block's layers

    def __init__(self, windows: int = 8, guard: int = 4, epochs: int = 2, lr: float = 5e-3,
                 target: str = "same-input", loss: str = "mse") -> None:
        if target not in ("same-input", "float-model"):
            raise ValueError(f"target must be 'same-input' or 'float-model', not {target!r}")
        if loss not in ("mse", "per-channel"):
            raise ValueError(f"loss must be 'mse' or 'per-channel', not {loss!r}")
        self.windows, self.guard, self.epochs, self.lr, self.target, self.loss = windows, guard, epochs, lr, target, loss
        self._float_inputs: dict[int, torch.Tensor] = {}  # window -> the full-precision model's input of this block
        self._float_block: nn.Module | None = None
        self.records: list[dict] = []

    def on_block_start(self, trainer, pl_module, ctx) -> None:
        if ctx.stage == "calibrate" and ctx.group_index == 0:
            self._float_block = copy.deepcopy(ctx.block)
            for original, module in zip(ctx.block.modules(), self._float_block.modules()):
                module._forward_pre_hooks.clear()  # the copy took the Hessian hooks along
                module._forward_hooks.clear()
                if hasattr(original, "config"):  # and a copy of the config the attention probe has switched
                    module.config = original.config  # the shared one, which the probe restores

    def on_block_end(self, trainer, pl_module, ctx) -> None:
        if ctx.stage != "calibrate" or ctx.group_index != ctx.num_groups - 1 or self._float_block is None:
            return
        float_block, self._float_block = self._float_block, None
        hidden = ctx.inputs.hidden
        fit = list(range(min(self.windows, len(hidden))))
        guard = list(range(len(fit), min(len(fit) + self.guard, len(hidden))))
        kwargs = [ctx.inputs.kwargs_for(ctx.block_index, j) for j in range(len(hidden))]
        if self.target == "float-model" and ctx.block_index == 0:
            self._float_inputs = {j: hidden[j] for j in fit + guard}  # block 0's inputs are the same in both models
        sources = self._float_inputs if self.target == "float-model" else hidden
        with torch.no_grad():
            targets = {j: _forward(float_block, sources[j], kwargs[j]) for j in fit + guard}
        if self.target == "float-model":
            self._float_inputs = {j: t.to(hidden[j].device, hidden[j].dtype) for j, t in targets.items()}
        del float_block
        scale = torch.ones(())
        if self.loss == "per-channel":
            update = torch.stack([(targets[j] - hidden[j].to(targets[j])).pow(2).flatten(0, -2).mean(0) for j in fit])
            scale = 1 / update.mean(0).clamp_min(1e-12)  # [hidden]

        def distance(out, j):
            return ((out - targets[j]).pow(2) * scale.to(out)).mean()
        weights = _norm_weights(ctx.block)
        if not weights:
            return
        originals = {n: w.detach().clone() for n, w in weights.items()}
        deltas = {n: torch.zeros_like(w, requires_grad=True) for n, w in weights.items()}

        def error(js) -> float:
            with torch.no_grad():
                return sum(float(distance(_forward(ctx.block, hidden[j], kwargs[j]), j)) for j in js)

        before = error(guard or fit)
        optimizer = torch.optim.Adam(deltas.values(), lr=self.lr)
        modules = dict(ctx.block.named_modules())
        params = {n: modules[n].weight for n in weights}
        for n, p in params.items():  # the weight becomes γ₀(1 + δ), a function of δ, for the fit
            del modules[n].weight
            modules[n].weight = originals[n] * (1 + deltas[n])
        try:
            with torch.enable_grad():
                for _ in range(self.epochs):
                    for j in fit:
                        for n in params:
                            modules[n].weight = originals[n] * (1 + deltas[n])
                        loss = distance(_forward(ctx.block, hidden[j], kwargs[j]), j)
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
        finally:
            for n, p in params.items():
                del modules[n].weight
                with torch.no_grad():
                    p.copy_(originals[n] * (1 + deltas[n].detach()))
                modules[n].weight = p
        after = error(guard or fit)
        kept = after < before
        if not kept:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(originals[n])
        change = max(float(d.detach().abs().max()) for d in deltas.values())
        self.records.append({"block": ctx.block_index, "guard_mse_before": before, "guard_mse_after": after,
                             "kept": kept, "max_relative_change": change})
        log.info("norm tweak %s: guard error %.4g -> %.4g (%s), largest change %.3f", ctx.describe(), before, after,
                 "kept" if kept else "undone", change)
