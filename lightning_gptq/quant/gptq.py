"""The GPTQ solver (Frantar et al., ICLR 2023, Algorithm 1) and round-to-nearest, framework-free.

Notation: ``W`` [rows=out, cols=in], ``H`` [cols, cols], ``U = chol(H⁻¹)ᵀ`` upper triangular.
The sweep quantizes columns left to right; the error of column ``j`` scaled by ``1/U[j,j]`` is
spread over the columns still to come through row ``j`` of ``U``. Updates are applied lazily:
inside a block of ``B`` columns immediately, to the rest of the matrix once per block.

Groups (``group_size = g``): a group's grid is fitted when the sweep reaches its first column.
``group_grid="updated"`` fits it on the weights *as updated by every column quantized so far*,
including columns of the group that lie beyond the current block (their pending lazy update is
applied for the fit); the result is then independent of ``B``. ``"block-start"`` (the reference
code's rule) fits it on the weights as they stood when the current block began, which differs
only for groups that start inside a block (``g < B``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import QuantConfig
from .grid import dequantize_codes, fit_grid, quantize_codes
from .linalg import cholesky_lower_, flip_, fp32_matmuls, inverse_upper_, mirror_upper_, permute_symmetric_
from .refit import refit_scales


PANEL_COLUMNS = 512  # columns per trailing-matrix update; the result does not depend on it


class NonFiniteError(ValueError):
    """A weight or Hessian holds NaN or Inf."""


class HessianNotPositiveDefiniteError(RuntimeError):
    """Damping could not make the Hessian factorisable (only for pathological inputs)."""


class DampingIncreasedWarning(UserWarning):
    """The Cholesky factorisation failed at the configured damping and succeeded at a larger one."""


@dataclass
class QuantizedWeight:
    """Result of quantizing a weight ``[out, in]``.

    ``codes`` uint8 [out, in] in ``[0, 2**bits - 1]``; ``scales``/``zeros`` [out, n_groups] (zeros are
    integer codes, int32); ``g_idx`` int32 [in], the group of each input column; ``loss`` the sweep's
    ``Σ (w - q)² / U[j,j]² / 2`` (0 for RTN); ``damp`` the damping fraction actually used and
    ``damp_retries`` how many times it had to be raised; ``perm`` the act-order column order or None.
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    bits: int
    group_size: int
    sym: bool
    dtype: torch.dtype
    loss: float = 0.0
    damp: float = 0.0
    damp_retries: int = 0
    perm: Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self) -> Tensor:
        """``scale · (code − zero)`` per column's group, [out, in] in the original weight's dtype."""
        g = self.g_idx.long()
        w = dequantize_codes(self.codes.to(self.scales.dtype), self.scales[:, g], self.zeros[:, g].to(self.scales.dtype))
        return w.to(self.dtype)


def _all_finite(t: Tensor) -> bool:
    # A sum is NaN/Inf whenever an element is (and, for real data, only then): 20x cheaper than isfinite.
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _check_finite(name: str, t: Tensor) -> None:
    if not _all_finite(t):
        raise NonFiniteError(f"{name} contains NaN or Inf values ({(~torch.isfinite(t)).sum().item()} of {t.numel()})")


def inverse_hessian_cholesky(H: Tensor, damp: float, max_damp: float = 1e3, overwrite: bool = False
                             ) -> tuple[Tensor, float, int]:
    """``U = chol(H⁻¹, upper)`` of the damped Hessian [cols, cols], so that ``H⁻¹ = UᵀU``.

    Computed without forming ``H⁻¹``: with ``J`` the order-reversal, ``R = J·chol(JHJ)·J`` is upper
    triangular with ``H = RRᵀ``, hence ``H⁻¹ = R⁻ᵀR⁻¹`` and ``U = R⁻¹`` (one factorisation and one
    triangular solve instead of the reference's three factorisation-sized steps).

    Adds ``damp · mean(diag H)`` to the diagonal; while the factorisation fails, doubles ``damp``
    (from at least 0.01) and tries again. Returns ``(U, damp_used, retries)``. With ``overwrite``
    ``U`` is computed in ``H``'s own storage (``H`` is consumed); otherwise in one copy of it.
    """
    A = H if overwrite else H.clone()
    mean_diag = A.diagonal().mean()  # (of the strided view: a contiguous copy sums in another order)
    diag = A.diagonal().clone()
    # Every step writes one triangle and leaves the other holding H, so a failed try can restore H.
    flip_(A)
    used, retries = damp, 0
    while used <= max_damp:
        A.diagonal().copy_(diag.flip(0) + used * mean_diag)
        if cholesky_lower_(A):  # lower: L of JHJ; strict upper: JHJ's
            flip_(A)  # upper: R = JLJ; strict lower: H's
            inverse_upper_(A)  # upper: U = R⁻¹
            if _all_finite(A):  # (the strict lower is H's, finite)
                return A.triu_(), used, retries
            mirror_upper_(A.T)  # H back from its strict lower, then JHJ
            flip_(A)
        else:
            mirror_upper_(A)  # JHJ back from its strict upper
        used, retries = max(2 * used, 0.01), retries + 1
    raise HessianNotPositiveDefiniteError(
        f"Hessian not positive definite even with damp={used / 2:g}·mean(diag H); the activations are degenerate"
    )


@fp32_matmuls()
def gptq_quantize(weight: Tensor, hessian: Tensor, config: QuantConfig, *, overwrite_hessian: bool = False,
                  asymmetry: Tensor | None = None) -> QuantizedWeight:
    """Quantize ``weight`` [out, in] with GPTQ given the layer Hessian ``hessian`` [in, in].

    ``asymmetry`` (GPTAQ, Li et al. 2025), ``D = 2/n · Σ (X_fp − X)ᵀX`` [in, in] on the same samples
    as ``H = 2/n · ΣXᵀX``: ``X`` [tokens, in] are the layer's inputs in the model being quantized
    (earlier blocks already quantized), ``X_fp`` the full-precision model's. The target becomes the
    full-precision *output* ``X_fp Wᵀ``, so the layer also corrects the error the blocks before it
    left: as column ``j`` is quantized, the part of its input mismatch the columns still to come can
    absorb, ``α · w_j · D[j, >j] · H[>j, >j]⁻¹`` (``w_j`` as it stood before rounding, ``α`` =
    ``config.gptaq_alpha``), is added to them. With ``U = chol(H⁻¹)ᵀ`` that is row ``j`` of
    ``P = α · triu₁(D·Uᵀ)·U``, applied lazily like the error updates.

    Computes in fp64 when either input is fp64, otherwise fp32. ``weight`` is not modified; nor is
    ``hessian`` unless ``overwrite_hessian``: then, when it already has the compute dtype and device,
    the solve runs in its storage (one Hessian less of peak memory) and it is left as garbage.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out_features, in_features], got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"Hessian must be [{cols}, {cols}] for a weight of shape {tuple(weight.shape)}, got {tuple(hessian.shape)}")
    _check_finite("weight", weight)
    _check_finite("Hessian", hessian)
    if asymmetry is not None:
        if tuple(asymmetry.shape) != (cols, cols):
            raise ValueError(f"asymmetry must be [{cols}, {cols}] like the Hessian, got {tuple(asymmetry.shape)}")
        _check_finite("asymmetry", asymmetry)
    dtype = torch.float64 if torch.float64 in (weight.dtype, hessian.dtype) else torch.float32
    # The sweep holds Wᵀ [cols, rows], so that each column of W is one contiguous row in memory.
    Wt = weight.detach().T.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    H = hessian.detach().to(device=Wt.device, dtype=dtype, copy=not overwrite_hessian)
    g = cols if config.group_size == -1 else config.group_size
    n_groups = math.ceil(cols / g)

    # Inputs that never fire carry no information: give them a unit diagonal and a zero weight.
    dead = H.diagonal() == 0
    if bool(dead.all()):
        warnings.warn("the Hessian is zero (no input reached this layer, or every input was zero): every column "
                      "counts as dead and the whole weight is set to zero", stacklevel=2)
    H[dead, dead] = 1
    Wt[dead] = 0
    # The scale refit needs H after the sweep has consumed it (and the weight before any update).
    refit_from = (Wt.T.clone(), H.clone()) if config.refit_scales else None

    W_original = Wt if config.static_groups else None  # static grids fit it, in the original column order

    perm = torch.argsort(H.diagonal(), descending=True) if config.act_order else torch.arange(cols, device=Wt.device)
    if config.act_order:
        Wt = Wt[perm]
        permute_symmetric_(H, perm)
    U, damp, retries = inverse_hessian_cholesky(H, config.damp, overwrite=True)  # H is ours by now
    del H  # U lives in its storage
    P = None
    if asymmetry is not None:
        D = asymmetry.detach().to(device=Wt.device, dtype=dtype)[perm][:, perm]
        D[:, dead[perm]] = 0
        P = (D @ U.T).triu_(1).mul_(config.gptaq_alpha) @ U
        del D
    if retries:
        warnings.warn(
            f"Cholesky failed at damp={config.damp:g}; succeeded at damp={damp:g} after {retries} increases",
            DampingIncreasedWarning,
            stacklevel=2,
        )

    # 1/U_jj² = 1/[H⁻¹]_jj when column j's turn comes: the factor GPTQ's loss puts on its rounding error.
    saliency = U.diagonal().square().reciprocal() if config.mse_weights == "saliency" else None
    if config.static_groups:
        by_column = None if saliency is None else saliency[torch.argsort(perm)]
        static_grids = [
            fit_grid(
                W_original[k * g : (k + 1) * g].T, config.bits, config.sym, config.mse,
                col_weights=None if by_column is None else by_column[k * g : (k + 1) * g],
            )
            for k in range(n_groups)
        ]
    del W_original

    codes = torch.empty_like(Wt, dtype=torch.uint8)
    scales = torch.empty(rows, n_groups, dtype=dtype, device=Wt.device)
    zeros = torch.empty_like(scales)
    # Group of the column at each sweep position; with static groups it follows the original order.
    group_of = ((perm if config.static_groups else torch.arange(cols)) // g).tolist()
    u_diag = U.diagonal().tolist()
    loss = torch.zeros((), dtype=dtype, device=Wt.device)
    maxq, B = config.maxq, config.block_size
    from_block_start = config.group_grid == "block-start"

    # Lazy updates at two levels: inside a block of B columns one column at a time, to the rest of a
    # panel of k·B columns once per block, to the rest of the matrix once per panel (bigger matmuls).
    panel = B * max(1, PANEL_COLUMNS // B)

    def pending(c1: int, c2: int, r1: int, r2: int) -> Tensor:
        """What columns ``c1:c2`` (quantized) owe rows ``r1:r2`` of ``Wt`` that has not been applied."""
        owed = U[c1:c2, r1:r2].T @ E[c1 - p1 : c2 - p1]
        return owed if P is None else owed.addmm_(P[c1:c2, r1:r2].T, Wt[c1:c2], alpha=-1)

    for p1 in range(0, cols, panel):
        p2 = min(p1 + panel, cols)
        E = torch.zeros(p2 - p1, rows, dtype=dtype, device=Wt.device)  # (w - q) / U[j,j] per column
        for i1 in range(p1, p2, B):
            i2 = min(i1 + B, p2)
            block_start = Wt[i1:i2].clone() if from_block_start else None
            for j in range(i1, i2):
                k = group_of[j]
                if config.static_groups:
                    scale, zero = static_grids[k]
                elif j % g == 0:
                    # Fit on the group as updated by every column quantized so far ("updated"), or
                    # by every column before this block ("block-start"): rows past the block still
                    # miss this block's updates, rows past the panel the whole panel's.
                    end = min(j + g, cols)
                    b_end, p_end = min(end, i2), min(end, p2)
                    done = i1 if from_block_start else j
                    current = torch.cat([
                        block_start[j - i1 : b_end - i1] if from_block_start else Wt[j:b_end],
                        Wt[b_end:p_end] - pending(i1, done, b_end, p_end),
                        Wt[p_end:end] - pending(p1, done, p_end, end),
                    ])
                    weights = None if saliency is None else saliency[j:end]
                    scale, zero = fit_grid(current.T, config.bits, config.sym, config.mse, col_weights=weights)
                    scales[:, k], zeros[:, k] = scale, zero
                w, err = Wt[j], E[j - p1]
                q = codes[j] = quantize_codes(w, scale, zero, maxq)
                torch.sub(w, dequantize_codes(q, scale, zero), out=err).div_(u_diag[j])
                Wt[j + 1 : i2].addr_(U[j, j + 1 : i2], err, alpha=-1)
                if P is not None:  # (Wt[j] still holds w_j: the codes go elsewhere)
                    Wt[j + 1 : i2].addr_(P[j, j + 1 : i2], w)
            Wt[i2:p2] -= pending(i1, i2, i2, p2)
        Wt[p2:] -= pending(p1, p2, p2, cols)
        loss += E.square().sum() / 2

    if config.static_groups:
        for k, (scale, zero) in enumerate(static_grids):
            scales[:, k], zeros[:, k] = scale, zero
    inv = torch.argsort(perm)
    if config.static_groups or not config.act_order:
        g_idx = torch.arange(cols, device=Wt.device) // g
    else:
        g_idx = inv // g  # column c sat at sweep position inv[c]
    codes = codes.T[:, inv].contiguous()
    if refit_from is not None:
        W0, H0 = refit_from
        H0.diagonal().add_(damp * H0.diagonal().mean())  # the damped H the sweep solved with
        target = None
        if asymmetry is not None:  # Xᵀ·X_fp = H + Dᵀ: the asymmetric solve's full-precision target
            Dt = asymmetry.detach().to(device=W0.device, dtype=dtype).T.clone()
            Dt[dead] = 0
            target = H0 + config.gptaq_alpha * Dt
        scales = refit_scales(W0, H0, codes, scales, zeros, g_idx, target=target)
    return QuantizedWeight(
        codes=codes,
        scales=scales,
        zeros=zeros.to(torch.int32),
        g_idx=g_idx.to(torch.int32),
        bits=config.bits,
        group_size=config.group_size,
        sym=config.sym,
        dtype=weight.dtype,
        loss=float(loss),
        damp=damp,
        damp_retries=retries,
        perm=perm if config.act_order else None,
    )


@fp32_matmuls()
def rtn_quantize(weight: Tensor, config: QuantConfig) -> QuantizedWeight:
    """Round-to-nearest baseline: each group's grid fitted on the original weight [out, in], no updates.

    ``act_order``, ``static_groups`` and ``damp`` have no meaning without a Hessian and are ignored.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out_features, in_features], got shape {tuple(weight.shape)}")
    _check_finite("weight", weight)
    rows, cols = weight.shape
    W = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    g = cols if config.group_size == -1 else config.group_size
    n_groups = math.ceil(cols / g)
    scales = torch.empty(rows, n_groups, dtype=W.dtype, device=W.device)
    zeros = torch.empty_like(scales)
    codes = torch.empty_like(W)
    for k in range(n_groups):
        block = W[:, k * g : (k + 1) * g]
        scales[:, k], zeros[:, k] = fit_grid(block, config.bits, config.sym, config.mse)
        codes[:, k * g : (k + 1) * g] = quantize_codes(block, scales[:, k : k + 1], zeros[:, k : k + 1], config.maxq)
    return QuantizedWeight(
        codes=codes.to(torch.uint8),
        scales=scales,
        zeros=zeros.to(torch.int32),
        g_idx=(torch.arange(cols, device=W.device) // g).to(torch.int32),
        bits=config.bits,
        group_size=config.group_size,
        sym=config.sym,
        dtype=weight.dtype,
    )
