"""Least-squares group scales for fixed codes: the last step of a GPTQ solve (``QuantConfig.refit_scales``).

GPTQ fits each group's grid once, when the sweep reaches the group, on weights that later columns'
error updates have not yet reached; the codes it then picks are final, but the scales need not be.
With the codes ``c`` and integer zeros ``z`` fixed, row ``r`` dequantizes to ``q_r = A_r s_r`` where
column ``g`` of ``A_r`` [in, groups] is ``c_r − z_rg`` on group ``g``'s inputs and 0 elsewhere. The
layer's output error ``(w_r − q_r)ᵀ H (w_r − q_r)`` is quadratic in the scales, so the best ones
solve ``(A_rᵀ H A_r) s_r = A_rᵀ T w_r`` (``T = H``, or ``H + α·Dᵀ`` with the asymmetric term's
``D = 2/n·Σ(X_fp − X)ᵀX``, whose target is the full-precision output ``X_fp w``). The old scales are
one feasible point, so the error can only go down; a row keeps its old scales where a new one comes
out non-positive or non-finite.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .linalg import fp32_matmuls


@fp32_matmuls()
def refit_scales(weight: Tensor, hessian: Tensor, codes: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor,
                 target: Tensor | None = None) -> Tensor:
    """Scales [out, groups] minimising ``Σ_r (w_r − q_r)ᵀ H (w_r − q_r)`` for fixed codes and zeros.

    ``weight`` [out, in]; ``hessian`` [in, in] (symmetric, damped as the solve used it); ``codes``
    [out, in] and ``zeros`` [out, groups] integer-valued; ``scales`` [out, groups] the current ones;
    ``g_idx`` [in] each input's group (any order, any sizes); ``target`` [in, in] replaces ``H`` on the
    right-hand side (``H + α·Dᵀ`` for the asymmetric solve). The products run in ``weight``'s dtype
    (fp32 or fp64), the per-row ``groups × groups`` systems in fp64. Returns ``scales``' dtype.
    Cost: ``out · in²`` multiply-adds, like one GPTQ sweep.
    """
    dt = torch.float64 if torch.float64 in (weight.dtype, hessian.dtype) else torch.float32
    rows, n_groups = scales.shape
    g = g_idx.long()
    # Lay the inputs out group by group, each group padded to the largest one's size m with inputs
    # that are zero everywhere, so that per-group sums are one reshape.
    order = torch.argsort(g, stable=True)
    counts = torch.bincount(g, minlength=n_groups)
    m = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    slot = g[order] * m + torch.arange(g.numel(), device=g.device) - starts[g[order]]
    width = n_groups * m

    def spread(x: Tensor) -> Tensor:  # [r, in] -> [r, groups·m]
        out = x.new_zeros(x.shape[0], width)
        out[:, slot] = x[:, order]
        return out

    V = spread(codes.to(dt) - zeros.to(dt)[:, g])  # c − z, so that q = V · s[group]
    Hp = spread(spread(hessian.to(dt)).T)  # (symmetric)
    T = Hp if target is None else spread(spread(target.to(dt).T).T)
    W = spread(weight.to(dt))
    b = (V * (W @ T.T)).view(rows, n_groups, m).sum(-1)  # A_rᵀ T w_r
    M = torch.empty(rows, n_groups, n_groups, dtype=dt, device=W.device)
    for h in range(n_groups):
        # Column h of A_rᵀ H A_r for every row r: Σ_{j∈h} H[:, j] V[r, j], then summed per group.
        cols = slice(h * m, (h + 1) * m)
        M[:, :, h] = (V * (V[:, cols] @ Hp[cols])).view(rows, n_groups, m).sum(-1)
    M, b = M.double(), b.double()
    # A group whose codes all sit on its zero has no say in q: solve for a dummy scale, keep the old.
    idle = M.diagonal(dim1=1, dim2=2) <= 0
    M.diagonal(dim1=1, dim2=2).masked_fill_(idle, 1.0)
    new = torch.linalg.solve(M, b.masked_fill(idle, 0.0).unsqueeze(-1)).squeeze(-1)
    old = scales.double()
    new = torch.where(idle, old, new)
    bad = ~(torch.isfinite(new) & (new > 0)).all(dim=1, keepdim=True)
    return torch.where(bad, old, new).to(scales.dtype)


@fp32_matmuls()
def output_error(weight: Tensor, hessian: Tensor, dequantized: Tensor, target: Tensor | None = None) -> Tensor:
    """``Σ_r (w_r − q_r)ᵀ H (w_r − q_r)`` (or, with ``target``, the error it is the quadratic part of,
    up to a constant: ``Σ_r q_rᵀ H q_r − 2 q_rᵀ T w_r``) in fp64. For tests and logs."""
    dt = torch.float64
    W, H, Q = weight.to(dt), hessian.to(dt), dequantized.to(dt)
    if target is None:
        R = W - Q
        return ((R @ H) * R).sum()
    return ((Q @ H) * Q).sum() - 2 * ((W @ target.to(dt).T) * Q).sum()
