"""Dense factorisations written as recursive 2×2 block steps, so that almost all of their work is
matrix multiplication (LAPACK's potrf/trsm run at a fraction of matmul speed on small CPUs)."""

from __future__ import annotations

import torch
from torch import Tensor

BASE = 256  # below this size LAPACK's own routine is as fast as recursing further


def cholesky_lower(A: Tensor) -> tuple[Tensor, bool]:
    """Lower ``L`` with ``A = LLᵀ`` for a symmetric ``A`` [n, n]; returns ``(L, ok)``, ``ok`` False when
    ``A`` is not positive definite (``L`` is then garbage)."""
    n = A.shape[0]
    if n <= BASE:
        L, info = torch.linalg.cholesky_ex(A)
        return L, info.item() == 0
    h = n // 2
    L11, ok = cholesky_lower(A[:h, :h])
    if not ok:
        return L11, False
    L = torch.zeros_like(A)
    L[:h, :h] = L11
    del L11
    L[h:, :h] = torch.linalg.solve_triangular(L[:h, :h], A[h:, :h].T, upper=False).T  # A21 · L11⁻ᵀ
    L21 = L[h:, :h]
    L22, ok = cholesky_lower(torch.addmm(A[h:, h:], L21, L21.T, alpha=-1))  # Schur complement
    L[h:, h:] = L22
    return L, ok


def inverse_upper(R: Tensor) -> Tensor:
    """``R⁻¹`` [n, n] of an invertible upper-triangular ``R``."""
    n = R.shape[0]
    if n <= BASE:
        return torch.linalg.solve_triangular(R, torch.eye(n, dtype=R.dtype, device=R.device), upper=True)
    h = n // 2
    out = torch.zeros_like(R)
    out[:h, :h] = inverse_upper(R[:h, :h])
    out[h:, h:] = inverse_upper(R[h:, h:])
    out[:h, h:] = -(out[:h, :h] @ R[:h, h:]) @ out[h:, h:]
    return out
