"""Uniform quantization grids: one (scale, zero) per row of a weight slice.

Codes are integers in ``[0, maxq]``; a weight ``w`` maps to ``q = clamp(round(w / scale) + zero, 0, maxq)``
and back to ``scale * (q - zero)``. Codes and zeros are kept as integer-valued floats here; the
caller converts them to integer tensors for storage.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The reference's MSE search: shrink the range by p = 1 - i/100 for i < 80, score by |err|^2.4.
MSE_GRID_STEPS = 100
MSE_MAX_SHRINK = 0.8
MSE_NORM = 2.4


def _minmax_grid(xmin: Tensor, xmax: Tensor, maxq: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero [rows] for ranges whose ends already satisfy ``xmin <= 0 <= xmax``."""
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Integer-valued codes, same shape as ``w``; ``scale``/``zero`` broadcast against ``w``."""
    return torch.div(w, scale).round_().add_(zero).clamp_(0, maxq)


def dequantize_codes(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return scale * (codes - zero)


def fit_grid(
    w: Tensor, bits: int, sym: bool, mse: bool = False, col_weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Fit one grid per row of ``w`` [rows, cols]; returns ``scale``, ``zero`` [rows] (zero integer-valued).

    ``col_weights`` [cols] (MSE search only): each column's error counts that many times in the score.
    """
    maxq = (1 << bits) - 1
    xmin = torch.clamp(w.amin(dim=1), max=0)
    xmax = torch.clamp(w.amax(dim=1), min=0)
    scale, zero = _minmax_grid(xmin, xmax, maxq, sym)
    if not mse:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for i in range(int(MSE_MAX_SHRINK * MSE_GRID_STEPS)):
        p = 1 - i / MSE_GRID_STEPS
        s, z = _minmax_grid(p * xmin, p * xmax, maxq, sym)
        q = dequantize_codes(quantize_codes(w, s[:, None], z[:, None], maxq), s[:, None], z[:, None])
        err = (q - w).abs_().pow_(MSE_NORM)
        err = err.sum(dim=1) if col_weights is None else err @ col_weights
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero
