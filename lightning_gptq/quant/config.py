"""Quantization settings shared by the solver, the Lightning callbacks and the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
GROUP_GRIDS = ("updated", "block-start")
MSE_WEIGHTS = ("uniform", "saliency")


class QuantConfigError(ValueError):
    """A `QuantConfig` field has a value the solver cannot use."""


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize one linear layer.

    Args:
        bits: code width, 2..8 (the ecosystem's kernels serve 2, 3, 4 and 8).
        group_size: input columns sharing one scale/zero; -1 = one grid per output row.
        sym: symmetric grid (zero fixed at the middle code) instead of asymmetric min/max.
        act_order: sweep columns by descending Hessian diagonal (``desc_act``); recorded in ``g_idx``.
        static_groups: fit every group's grid before the sweep, on the original column order, so
            act-order needs no ``g_idx`` reordering at inference.
        damp: fraction of ``mean(diag H)`` added to the diagonal (the reference's ``percdamp``).
            Raised automatically, and recorded, when the Cholesky factorisation fails.
        block_size: columns per lazy batch update (``B`` in the paper).
        mse: shrink each grid's range by the reference's MSE grid search instead of plain min/max.
        mse_weights: how the MSE search weighs a group's columns: ``"uniform"`` (the reference) or
            ``"saliency"``: each column by ``1/[H⁻¹]_jj`` at its turn in the sweep (``1/U_jj²``), the
            factor GPTQ's loss puts on that column's rounding error. Needs ``mse``.
        group_grid: which weights a group's grid is fitted on when the group starts inside a block
            (``group_size < block_size``): ``"block-start"`` (the weights as they stood when the
            block began: the reference code's rule, and better at 2 bits) or ``"updated"`` (as
            updated by every column quantized so far; independent of ``block_size``, marginally
            better at 4 bits). docs/results.md ("Group grids inside a block") has the measurements.
        gptaq_alpha: weight of the asymmetric-calibration term (GPTAQ) when the solve is given the
            full-precision model's input mismatch (``HessianCapture(asymmetric=True)``); 0 turns it
            off, 1 is the full least-squares correction. Unused otherwise.
        refit_scales: after the sweep, replace each row's group scales by the least-squares ones for
            its final codes and zeros (``quant/refit.py``): the layer's output error on the
            calibration inputs can only go down; costs about one more sweep and a Hessian copy.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128
    mse: bool = False
    mse_weights: str = "uniform"
    group_grid: str = "block-start"
    gptaq_alpha: float = 0.25
    refit_scales: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise QuantConfigError(f"QuantConfig.bits must be an integer in 2..8, got {self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or (
            self.group_size != -1 and self.group_size <= 0
        ):
            raise QuantConfigError(
                f"QuantConfig.group_size must be -1 (one grid per row) or a positive integer, got {self.group_size!r}"
            )
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise QuantConfigError(f"QuantConfig.block_size must be a positive integer, got {self.block_size!r}")
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool) or not (0.0 <= self.damp < 1e3):
            raise QuantConfigError(f"QuantConfig.damp must be a number >= 0 (fraction of mean diag H), got {self.damp!r}")
        if isinstance(self.gptaq_alpha, bool) or not isinstance(self.gptaq_alpha, (int, float)) or not (
            0.0 <= self.gptaq_alpha <= 1.0
        ):
            raise QuantConfigError(f"QuantConfig.gptaq_alpha must be a number in [0, 1], got {self.gptaq_alpha!r}")
        if self.group_grid not in GROUP_GRIDS:
            raise QuantConfigError(f"QuantConfig.group_grid must be one of {GROUP_GRIDS}, got {self.group_grid!r}")
        if self.mse_weights not in MSE_WEIGHTS:
            raise QuantConfigError(f"QuantConfig.mse_weights must be one of {MSE_WEIGHTS}, got {self.mse_weights!r}")
        if self.mse_weights != "uniform" and self.mse is not True:
            raise QuantConfigError(f"QuantConfig.mse_weights={self.mse_weights!r} weighs the MSE grid search: set mse: true")
        for name in ("sym", "act_order", "static_groups", "mse", "refit_scales"):
            if not isinstance(getattr(self, name), bool):
                raise QuantConfigError(f"QuantConfig.{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def maxq(self) -> int:
        """Largest code, ``2**bits - 1``."""
        return (1 << self.bits) - 1

    def to_dict(self) -> dict:
        return asdict(self)
