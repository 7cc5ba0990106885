"""Hessians, the solve and scoring multiply fp32 in fp32 even after ``torch.set_float32_matmul_precision("medium")``
(which lets CUDA use TF32 and oneDNN bf16 for every fp32 matmul in the process)."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lightning_gptq.nn import exact_kernels
from lightning_gptq.quant import HessianAccumulator, QuantConfig, gptq_quantize
from lightning_gptq.quant.linalg import _PER_BACKEND
from lightning_gptq.quant.refit import output_error


def precision_now():
    if _PER_BACKEND:
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision
    return torch.get_float32_matmul_precision()


EXACT = ("ieee", "ieee") if _PER_BACKEND else "highest"


class MatmulPrecisions(TorchFunctionMode):
    """The fp32-matmul precision in force at every matrix product called inside the mode."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if "mm" in name or "matmul" in name or name == "linear":
            self.seen.append((name, precision_now()))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def medium():
    torch.set_float32_matmul_precision("medium")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision("highest")


def _solve():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 300, 512, generator=gen), torch.randn(96, 512, generator=gen)
    acc = HessianAccumulator(512)
    acc.add(x)
    h = acc.hessian
    q = gptq_quantize(w, h, QuantConfig(bits=4, group_size=128, act_order=True))
    return h, q, output_error(w, h, q.dequantize())


def test_solve_runs_its_matmuls_in_fp32_and_restores_the_setting(medium):
    with MatmulPrecisions() as mode:
        _solve()
    assert len(mode.seen) > 10 and {p for _, p in mode.seen} == {EXACT}, sorted(set(mode.seen))
    assert torch.get_float32_matmul_precision() == "medium"  # the caller's setting, back


def test_solve_gives_the_same_bits_whatever_the_process_precision(medium):
    """On a CPU with bf16 matmuls (AMX) "medium" changes a plain fp32 product; the solve must not change."""
    lowered = _solve()
    torch.set_float32_matmul_precision("highest")
    exact = _solve()
    assert torch.equal(lowered[0], exact[0]) and torch.equal(lowered[1].codes, exact[1].codes)
    assert torch.equal(lowered[1].scales, exact[1].scales) and torch.equal(lowered[2], exact[2])


def test_scoring_under_exact_kernels_multiplies_in_fp32(medium):
    a, b = torch.randn(64, 256), torch.randn(256, 64)
    with MatmulPrecisions() as mode:
        with exact_kernels():
            a @ b
        a @ b
    assert [p for _, p in mode.seen] == [EXACT, precision_now()] and precision_now() != EXACT


def test_legacy_path_for_torch_before_2_9_pins_and_restores(medium, monkeypatch):
    """torch < 2.9 has no per-backend ``fp32_precision``: the context falls back to the process-wide setter.
    Run here by switching the module's feature flag (torch 2.13 still has the legacy setter)."""
    from lightning_gptq.quant import linalg

    monkeypatch.setattr(linalg, "_PER_BACKEND", False)
    inside = []
    with linalg.fp32_matmuls():
        inside.append(torch.get_float32_matmul_precision())
        with pytest.raises(RuntimeError, match="boom"):
            with linalg.fp32_matmuls():
                raise RuntimeError("boom")
        inside.append(torch.get_float32_matmul_precision())  # the inner block restored the outer's setting
    assert inside == ["highest", "highest"]
    assert torch.get_float32_matmul_precision() == "medium"


@pytest.mark.skipif(not _PER_BACKEND, reason="torch < 2.9 has only the process-wide setting (the test above)")
def test_the_legacy_setting_agrees_with_the_new_one_inside(medium):
    """After ``set_float32_matmul_precision("medium")``, setting only the new per-backend flags to IEEE left the
    legacy one saying TF32, and torch refuses to read a mix ("mix of the legacy and new APIs"): anything reading
    ``torch.backends.cuda.matmul.allow_tf32`` inside (Inductor, Lightning, user code) raised. Both are restored."""
    from lightning_gptq.quant.linalg import fp32_matmuls

    before = precision_now()
    with fp32_matmuls():
        assert torch.backends.cuda.matmul.allow_tf32 is False  # readable, and not TF32
        assert torch.get_float32_matmul_precision() == "highest" and precision_now() == EXACT
    assert torch.get_float32_matmul_precision() == "medium" and precision_now() == before
