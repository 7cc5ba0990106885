"""Plain-torch reference for the GPTQ packed layout: the correctness oracle every faster kernel is
checked against, and the path used where no faster kernel applies.

Inputs are raw tensors only (no solver types), in the layout of :mod:`packing`:
``qweight`` int32 [packed(in), out], ``qzeros`` int32 [n_groups, packed(out)] holding the *true*
zero codes, ``scales`` [n_groups, out] float, ``g_idx`` int32 [in], the group of each input column.
A weight is ``W[o, i] = scales[g, o] · (code[i, o] − zero[g, o])`` with ``g = g_idx[i]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .packing import unpack_cols, unpack_rows


def dequantize_t(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int, in_features: int,
                 dtype: torch.dtype | None = None, group_size: int | None = None) -> Tensor:
    """Dense transposed weight ``Wᵀ`` [in, out] in ``dtype`` (default: the scales' dtype).

    ``group_size``: the caller's promise that ``g_idx == arange(in) // group_size`` (no act-order
    permutation); the groups are then broadcast as contiguous runs instead of gathered per row,
    several times faster on CPU. Same values either way.
    """
    n_groups, out_features = scales.shape
    codes = unpack_rows(qweight, bits, in_features)
    zeros = unpack_cols(qzeros, bits, out_features).to(scales.dtype)
    if group_size is None:
        g = g_idx.long()
        w = scales[g] * (codes.to(scales.dtype) - zeros[g])
    else:
        c = codes.to(scales.dtype)
        padded = n_groups * group_size
        if padded != in_features:  # ragged last group: pad to whole groups, cut after
            c = torch.cat([c, c.new_zeros(padded - in_features, out_features)])
        c = c.view(n_groups, group_size, out_features)
        w = ((c - zeros[:, None]) * scales[:, None]).view(padded, out_features)[:in_features]
    return w if dtype is None else w.to(dtype)


def quant_matmul(x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int,
                 bias: Tensor | None = None, group_size: int | None = None) -> Tensor:
    """``x @ Wᵀ + bias`` for ``x`` [..., in]: dequantizes the whole weight, then one dense matmul."""
    y = torch.matmul(x, dequantize_t(qweight, qzeros, scales, g_idx, bits, x.shape[-1], x.dtype, group_size))
    return y if bias is None else y + bias.to(y.dtype)  # (the input's dtype, as the other kernels answer)
