"""Plain-torch reference for GPTQ-format weights: the correctness oracle every faster kernel is
checked against, and the path used where no faster kernel applies.

Inputs are raw tensors only (no solver types): ``codes`` uint8 [out, in] in ``[0, 2**bits - 1]``,
``scales`` [out, n_groups] float, ``zeros`` [out, n_groups] int, ``g_idx`` [in] int, the group of
each input column. A weight is ``scales[:, g] * (codes - zeros[:, g])`` with ``g = g_idx``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dequantize(codes: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor, dtype: torch.dtype | None = None,
               group_size: int | None = None) -> Tensor:
    """Dense weight [out, in] in ``dtype`` (default: the scales' dtype).

    ``group_size``: the caller's promise that ``g_idx == arange(in) // group_size`` (no act-order
    permutation); the groups are then broadcast as contiguous runs instead of gathered per column,
    several times faster on CPU. Same values either way.
    """
    if group_size is None:
        g = g_idx.long()
        w = scales[:, g] * (codes.to(scales.dtype) - zeros[:, g].to(scales.dtype))
    else:
        out_features, in_features = codes.shape
        n_groups = scales.shape[1]
        c = codes.to(scales.dtype)
        if n_groups * group_size != in_features:  # ragged last group: pad to whole groups, cut after
            c = F.pad(c, (0, n_groups * group_size - in_features))
        c = c.view(out_features, n_groups, group_size)
        w = ((c - zeros.to(scales.dtype)[..., None]) * scales[..., None]).view(out_features, -1)[:, :in_features]
    return w if dtype is None else w.to(dtype)


def quant_matmul(x: Tensor, codes: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor, bias: Tensor | None = None,
                 group_size: int | None = None) -> Tensor:
    """``x @ Wᵀ + bias`` for ``x`` [..., in]: dequantizes the whole weight, then one dense matmul."""
    return F.linear(x, dequantize(codes, scales, zeros, g_idx, x.dtype, group_size), bias)
