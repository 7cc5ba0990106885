"""GPTQ with per-channel input scaling: an equivalent rewrite of a layer's input before the solve.

When what produces a layer's input can absorb a per-channel factor (a norm's weight: ``q/k/v(norm(x))``; a linear
whose output channel ``j`` passes through to the layer's input channel ``j`` unchanged but for that factor:
``down(act(gate(x)) · up(x))``, ``fc2(relu(fc1(x)))``), dividing that output channel by ``s_j`` and multiplying
the layers' input column ``j`` by ``s_j`` leaves the model's function unchanged. Their quantization does change:
the group grids now see ``W·diag(s)``, so channels with large inputs get a larger share of their group's range
(AWQ's observation, Lin et al. 2024), while a producing linear's grid, fitted per output row, is unaffected (a
row's scales simply absorb ``1/s_j``).

For each exponent ``α``, ``s = diag(H)^(α/2)`` (``diag H`` ∝ the mean square of each input channel), normalised
to geometric mean 1; GPTQ solves ``W' = W·diag(s)`` against ``H' = diag(s)⁻¹·H·diag(s)⁻¹`` (the same problem in
the scaled coordinates), and the ``α`` whose results have the lowest output error
``Σ tr((W − Q'·diag(s)⁻¹) H (W − Q'·diag(s)⁻¹)ᵀ)`` on the unscaled, undamped ``H`` is kept. ``α = 0``, plain
GPTQ, is always among them, so the calibration error can only go down. Whether the rewrite is exact for a
given model is not this module's business (``models/equalization.py`` checks it on the block).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lightning_gptq.quant.config import QuantConfig
from lightning_gptq.quant.gptq import QuantizedWeight, gptq_quantize

__all__ = ["EqualizedWeights", "channel_scales", "equalized_gptq_quantize", "output_error"]


@dataclass
class EqualizedWeights:
    """``quantized[i]`` holds ``Q'_i ≈ W_i·diag(scales)``: the layers' shared input must be divided by ``scales``
    [in] (fp64; fold ``1/scales`` into what produces it) — or, where that cannot be done, ``plain`` (``α = 0``)
    holds plain GPTQ's results. ``errors``: the summed output error per ``α`` tried."""

    quantized: list[QuantizedWeight]
    plain: list[QuantizedWeight]
    scales: Tensor
    alpha: float
    errors: dict[float, float]


def channel_scales(hessian_diag: Tensor, alpha: float) -> Tensor:
    """``s = diag(H)^(α/2)`` [in], fp64, geometric mean 1. Channels that never fire (diag 0) are
    treated as the quietest live one, so no scale is 0 or infinite."""
    d = hessian_diag.to(torch.float64)
    live = d[d > 0]
    if live.numel() == 0 or alpha == 0:
        return torch.ones_like(d)
    d = d.clamp_min(live.min())
    log_s = 0.5 * alpha * d.log()
    return (log_s - log_s.mean()).exp()


def output_error(weight: Tensor, approximation: Tensor, hessian: Tensor) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` in fp64, for ``weight``/``approximation`` [out, in], ``hessian`` [in, in]."""
    delta = weight.to(torch.float64) - approximation.to(torch.float64)
    return float(((delta @ hessian.to(torch.float64)) * delta).sum())


def equalized_gptq_quantize(weights: list[Tensor], hessian: Tensor, configs: list[QuantConfig],
                            alphas: list[float] | tuple[float, ...]) -> EqualizedWeights:
    """Solve the layers ``weights`` ([out_i, in] each, all reading one input with Hessian ``hessian`` [in, in])
    with GPTQ at ``α = 0`` and every ``α`` of ``alphas``, one ``configs[i]`` each; keep the ``α`` with the lowest
    summed output error. ``hessian`` is not modified. Each solve sees the scaled problem in the solve's usual
    dtype (fp64 when ``hessian`` is fp64); the errors are compared in fp64 on the undamped ``hessian``.
    """
    if len(weights) != len(configs) or not weights:
        raise ValueError("equalized_gptq_quantize needs one QuantConfig per weight, and at least one weight")
    weights = [w.detach() for w in weights]
    wide = torch.promote_types(weights[0].dtype, torch.float32)
    diag = torch.diagonal(hessian)
    errors: dict[float, float] = {}
    kept: dict[float, tuple[list[QuantizedWeight], Tensor]] = {}
    for alpha in sorted({0.0, *(float(a) for a in alphas)}):
        s = channel_scales(diag, alpha)
        s_h = s.to(hessian.device, hessian.dtype)
        scaled_h = hessian / s_h[:, None] / s_h[None, :]
        # W·diag(s) formed in fp32 at least: rounded to a 16-bit weight's dtype it moves as much as 8-bit codes do
        results = [replace(gptq_quantize(w.to(wide) * s.to(w.device, wide), scaled_h, c,
                                         overwrite_hessian=i == len(weights) - 1), dtype=w.dtype)
                   for i, (w, c) in enumerate(zip(weights, configs))]
        errors[alpha] = sum(output_error(w, replace(q, dtype=torch.float64).dequantize() / s.to(w.device), hessian)
                            for w, q in zip(weights, results))
        best = min(errors, key=errors.get)
        kept = {a: kept[a] for a in kept if a in (0.0, best)}  # plain GPTQ and the best so far
        if alpha in (0.0, best):
            kept[alpha] = (results, s)
    best = min(errors, key=errors.get)
    return EqualizedWeights(kept[best][0], kept[0.0][0], kept[best][1].to(weights[0].device), best, errors)
