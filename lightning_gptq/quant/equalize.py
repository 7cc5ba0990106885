"""GPTQ with per-channel input scaling: an equivalent rewrite of a layer pair before the solve.

When a layer's input channel ``j`` is its producer's output channel ``j`` times something that does
not change if that output is scaled (LLaMA's MLP: ``down(act(gate(x)) · up(x))``; OPT's
``fc2(relu(fc1(x)))``), dividing the producer's output row ``j`` by ``s_j`` and multiplying the
consumer's input column ``j`` by ``s_j`` leaves the model's function unchanged. The consumer's
quantization does change: its group grids now see ``W·diag(s)``, so channels with large inputs get
a larger share of their group's range (AWQ's observation, Lin et al. 2024), while the producer's
grid, fitted per output row, is unaffected (a row's scales simply absorb ``1/s_j``).

For exponents ``α`` in a list, ``s = diag(H)^(α/2)`` (``diag H`` ∝ the mean square of each input
channel), normalised to geometric mean 1; GPTQ solves ``W' = W·diag(s)`` against
``H' = diag(s)⁻¹·H·diag(s)⁻¹`` (the same problem in the scaled coordinates), and the ``α`` whose
result has the lowest output error ``tr((W − Q'·diag(s)⁻¹) H (W − Q'·diag(s)⁻¹)ᵀ)`` on the unscaled,
undamped ``H`` is kept. ``α = 0`` is plain GPTQ, so with 0 in the list the calibration error can
only go down.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gptq.quant.config import QuantConfig
from lightning_gptq.quant.gptq import QuantizedWeight, gptq_quantize

__all__ = ["EqualizedWeight", "channel_scales", "equalized_gptq_quantize", "output_error"]


@dataclass
class EqualizedWeight:
    """``quantized`` holds ``Q' ≈ W·diag(scales)``; the layer's input must be divided by ``scales`` [in] (fp64)
    (fold ``1/scales`` into the producer's output rows). ``errors``: output error per ``α`` tried."""

    quantized: QuantizedWeight
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


def equalized_gptq_quantize(weight: Tensor, hessian: Tensor, config: QuantConfig,
                            alphas: list[float] | tuple[float, ...]) -> EqualizedWeight:
    """Solve ``weight`` [out, in] with GPTQ at every ``α`` of ``alphas``; keep the lowest output error.

    ``hessian`` [in, in] is not modified. Each solve sees the scaled problem in the solve's usual
    dtype (fp64 when ``hessian`` is fp64); the errors are compared in fp64 on the undamped ``hessian``.
    """
    if not alphas:
        raise ValueError("equalized_gptq_quantize needs at least one exponent alpha")
    weight = weight.detach()
    best: EqualizedWeight | None = None
    errors: dict[float, float] = {}
    diag = torch.diagonal(hessian)
    for alpha in alphas:
        s = channel_scales(diag, float(alpha))
        s_w, s_h = s.to(weight.device, weight.dtype), s.to(hessian.device, hessian.dtype)
        scaled_h = hessian / s_h[:, None] / s_h[None, :]
        q = gptq_quantize(weight * s_w, scaled_h, config, overwrite_hessian=True)
        approx = q.dequantize().to(torch.float64) / s.to(weight.device)
        errors[float(alpha)] = output_error(weight, approx, hessian)
        if best is None or errors[float(alpha)] < best.errors[best.alpha]:
            best = EqualizedWeight(q, s.to(weight.device), float(alpha), errors)
    return best
