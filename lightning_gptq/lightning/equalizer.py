"""``GPTQCallback(equalize=...)``'s share of a block step: which layers are solved together in scaled input
coordinates, their solve, and the rewrite of what produces their input, kept only where the block proves it exact."""

from __future__ import annotations

import re
from typing import Callable

import torch

from lightning_gptq.models.adapters import is_linear, weight_out_in
from lightning_gptq.models.equalization import rewrite_if_exact, scale_sources
from lightning_gptq.quant import QuantConfig
from lightning_gptq.quant.equalize import equalized_gptq_quantize
from lightning_gptq.quant.gptq import QuantizedWeight

from .hooks import BlockContext

__all__ = ["Equalizer"]


class Equalizer:
    """Plans and solves the scaled groups of a block step; remembers rewrites a block type refused.

    ``alphas``: the exponents tried besides 0 (plain GPTQ). ``layers``: a regular expression every member's full
    name must ``re.match`` for its group to be scaled (None: every group). ``refused``: ``"<block type>: producer
    -> [layers]"`` for each rewrite the block's check refused (the layers were then solved plainly), in order.
    """

    def __init__(self, alphas: list[float], layers: str | None = None) -> None:
        self.alphas = list(alphas)
        self.layers = None if layers is None else re.compile(layers)
        self.refused: list[str] = []
        self._refused_keys: set[tuple] = set()

    @staticmethod
    def _probe_inputs(ctx: BlockContext):
        if ctx.inputs is None or len(ctx.inputs) == 0:
            return None
        return ctx.inputs.hidden[0], ctx.inputs.kwargs_for(ctx.block_index, 0)

    def groups(self, ctx: BlockContext, quantized: Callable[[str], bool]) -> dict[str, tuple[str, list[str]]]:
        """``{first member: (producer, members)}`` for the layers of this step that read one producer's output,
        are all solved in this step (``quantized(name)``) and share one Hessian; members in ``ctx.layers`` order."""
        probe = self._probe_inputs(ctx)
        if probe is None or self.layers is not None and not any(self.layers.match(ctx.full_name(n)) for n in ctx.layers):
            return {}  # no inputs to check on, or no layer of this step may be scaled: spare the block run
        with torch.no_grad():
            sources = scale_sources(ctx.block, *probe)
        plan = {}
        for producer, readers in sources.items():
            members = [name for name in ctx.layers if name in readers]
            if sorted(members) != sorted(readers) or not all(quantized(name) for name in members):
                continue  # a reader solved in another step, or left dense: it could not take the scaled input
            if self.layers is not None and not all(self.layers.match(ctx.full_name(name)) for name in members):
                continue
            if is_linear(ctx.block.get_submodule(producer)) and not quantized(producer):
                continue  # a linear left dense (a `-:` rule): resume points keep only quantized layers and norms
            if len({id(ctx.hessians.get(name)) for name in members}) != 1 or ctx.hessians.get(members[0]) is None:
                continue
            if ctx.hessians[members[0]].nsamples == 0:
                continue  # a MoE expert no token reached: rounded to nearest, on its own weights

            if self._key(ctx, producer, members) not in self._refused_keys:
                plan[members[0]] = (producer, members)
        return plan

    def still_planned(self, ctx: BlockContext, producer: str, members: list[str]) -> bool:
        """False once a group of the same kind was refused since ``groups`` planned it (another expert of the bank)."""
        return self._key(ctx, producer, members) not in self._refused_keys

    @staticmethod
    def _key(ctx: BlockContext, producer: str, members: list[str]) -> tuple:
        return type(ctx.block).__name__, _any_expert(producer), tuple(map(_any_expert, members))

    def solve(self, ctx: BlockContext, producer: str, members: list[str], hessian: torch.Tensor,
              configs: list[QuantConfig], agree: Callable[[bool], bool] | None = None,
              ) -> tuple[list[QuantizedWeight], float | None, torch.Tensor | None]:
        """Solve ``members`` (dense linears of ``ctx.block``) at every exponent; when the best is not plain GPTQ,
        rewrite ``producer`` to feed them the scaled input. Returns ``(results, alpha, scales)``: ``scales`` the
        rewrite's (``None``: none made), ``alpha`` None where the block refused the rewrite. ``agree``: see
        ``rewrite_if_exact`` (processes solving one all-reduced Hessian reach the rewrite check together, as the
        best exponent depends on the Hessian alone)."""
        weights = [weight_out_in(ctx.block.get_submodule(name)) for name in members]
        solved = equalized_gptq_quantize(weights, hessian, configs, self.alphas)
        if solved.alpha == 0:
            return solved.plain, 0.0, None
        with torch.no_grad():
            exact = rewrite_if_exact(ctx.block, producer, members, solved.scales, *self._probe_inputs(ctx), agree=agree)
        if exact:
            return solved.quantized, solved.alpha, solved.scales
        self._refused_keys.add(self._key(ctx, producer, members))
        self.refused.append(f"{type(ctx.block).__name__}: {producer} -> {members}")
        return solved.plain, None, None


def _any_expert(name: str) -> str:
    """``name`` with a MoE expert's index replaced by ``*``: every expert of a bank has the same structure, so a
    rewrite refused for one stands for all."""
    return re.sub(r"(^|\.)experts\.\d+\.", r"\1experts.*.", name)
