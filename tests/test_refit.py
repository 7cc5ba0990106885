"""Least-squares group scales after the sweep (``QuantConfig.refit_scales``) against a per-row lstsq."""

import pytest
import torch

from lightning_gptq import QuantConfig, gptq_quantize
from lightning_gptq.quant.refit import output_error, refit_scales

from test_solver import correlated_problem, mismatched_problem


def explicit_refit(W, H, codes, zeros, g_idx, T=None):
    """Row by row: build A_r [in, groups] (column g = c − z_g on group g, 0 elsewhere) and solve the
    normal equations (A_rᵀ H A_r) s = A_rᵀ T w_r in fp64 with an explicit matrix."""
    W, H = W.double(), H.double()
    T = H if T is None else T.double()
    n_groups = zeros.shape[1]
    out = torch.empty(W.shape[0], n_groups, dtype=torch.float64)
    for r in range(W.shape[0]):
        A = torch.zeros(W.shape[1], n_groups, dtype=torch.float64)
        for i in range(W.shape[1]):
            k = int(g_idx[i])
            A[i, k] = float(codes[r, i]) - float(zeros[r, k])
        out[r] = torch.linalg.solve(A.T @ H @ A, A.T @ T @ W[r])
    return out


def damped(H, damp):
    return H + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)


@pytest.mark.parametrize("kw", [
    dict(bits=4, group_size=16, sym=False, act_order=True),   # groups scattered over the inputs
    dict(bits=3, group_size=24, sym=False),                    # ragged last group (100 = 4·24 + 4)
    dict(bits=2, group_size=32, sym=True, act_order=True, static_groups=True),
])
def test_refit_equals_per_row_least_squares(kw):
    W, _, H = correlated_problem(6, 100 if kw["group_size"] == 24 else 96, seed=3)
    cfg = QuantConfig(**kw)
    plain = gptq_quantize(W, H, cfg)
    Hd = damped(H, plain.damp)
    got = refit_scales(W, Hd, plain.codes, plain.scales, plain.zeros, plain.g_idx)
    want = explicit_refit(W, Hd, plain.codes, plain.zeros, plain.g_idx)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # ... and is what the solve returns with the option on; codes, zeros and groups untouched.
    refit = gptq_quantize(W, H, QuantConfig(**kw, refit_scales=True))
    torch.testing.assert_close(refit.scales, want, rtol=1e-9, atol=1e-12)
    for field in ("codes", "zeros", "g_idx"):
        assert torch.equal(getattr(refit, field), getattr(plain, field))


def test_refit_lowers_the_layer_output_error():
    for seed in range(4):
        W, _, H = correlated_problem(32, 128, seed=seed)
        kw = dict(bits=3, group_size=32, sym=False, act_order=True)
        plain = gptq_quantize(W, H, QuantConfig(**kw))
        refit = gptq_quantize(W, H, QuantConfig(**kw, refit_scales=True))
        Hd = damped(H, plain.damp)
        before, after = output_error(W, Hd, plain.dequantize()), output_error(W, Hd, refit.dequantize())
        assert after < 0.999 * before  # strictly better on a typical problem, never worse


def test_refit_with_the_asymmetric_target():
    """With GPTAQ's mismatch D the right-hand side is (H + α·Dᵀ)·w: the quadratic whose minimum is
    the full-precision output X_fp·w."""
    W, _, _, H, D = mismatched_problem(8, 64, seed=1)
    kw = dict(bits=4, group_size=16, sym=False, act_order=True, gptaq_alpha=0.5)
    asym = gptq_quantize(W, H, QuantConfig(**kw), asymmetry=D)
    refit = gptq_quantize(W, H, QuantConfig(**kw, refit_scales=True), asymmetry=D)
    Hd = damped(H, asym.damp)
    T = Hd + 0.5 * D.T
    want = explicit_refit(W, Hd, asym.codes, asym.zeros, asym.g_idx, T=T)
    torch.testing.assert_close(refit.scales, want, rtol=1e-9, atol=1e-12)
    assert output_error(W, Hd, refit.dequantize(), T) < output_error(W, Hd, asym.dequantize(), T)


def test_refit_keeps_scales_it_cannot_improve():
    """A group whose codes all equal its zero has no say in the output: its old scale stays; a row
    whose solution has a non-positive scale keeps all its old scales."""
    W, _, H = correlated_problem(3, 32, seed=0)
    codes = torch.full((3, 32), 8, dtype=torch.uint8)
    codes[:, 16:] = (W[:, 16:] / 0.3).round().add(8).clamp(0, 15).to(torch.uint8)  # W's own codes
    zeros = torch.full((3, 2), 8, dtype=torch.int32)
    scales = torch.full((3, 2), 0.1, dtype=torch.float64)
    g_idx = torch.arange(32) // 16
    new = refit_scales(W, H, codes, scales, zeros, g_idx)
    assert torch.equal(new[:, 0], scales[:, 0])  # idle group
    assert not torch.equal(new[:, 1], scales[:, 1]) and (new[:, 1] > 0).all()
    # so the negated weight's least-squares scales are negative: every row keeps its old ones.
    assert torch.equal(refit_scales(-W, H, codes, scales, zeros, g_idx), scales)


def test_refit_scales_is_validated():
    from lightning_gptq import QuantConfigError

    with pytest.raises(QuantConfigError, match="refit_scales"):
        QuantConfig(refit_scales="yes")
