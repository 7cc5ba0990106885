"""Layers that read one input, computed by one kernel call (``lightning_gptq.nn.shared_input``)."""

import copy

import pytest
import torch
from torch import nn

from lightning_gptq.kernels import cpu_gemm
from lightning_gptq.nn import to_backend
from lightning_gptq.nn.cpu_packed import CpuPackedQuantLinear
from lightning_gptq.nn.shared_input import SharedInput, join_shared_inputs

pytestmark = pytest.mark.skipif(bool(cpu_gemm.unavailable()), reason=f"the C++ kernel is unavailable: {cpu_gemm.unavailable()}")

HIDDEN = 96


def layer(out_features: int, g_idx: torch.Tensor, seed: int, bias: bool) -> CpuPackedQuantLinear:
    gen = torch.Generator().manual_seed(seed)
    q = CpuPackedQuantLinear(HIDDEN, out_features, bits=4, group_size=32, sym=False, bias=bias, dtype=torch.float32)
    codes = torch.randint(0, 16, (out_features, HIDDEN), generator=gen)
    scales = torch.rand(out_features, 3, generator=gen) * 0.02 + 1e-3
    zeros = torch.randint(0, 16, (out_features, 3), generator=gen, dtype=torch.int32)
    q.set_weight(codes, scales, zeros, g_idx, torch.randn(out_features, generator=gen) if bias else None)
    q.set_dispatch([(1, "int8x2"), (4, "gemm"), (64, "dense-fp32")], [(1, "gemm"), (64, "dense-fp32")])
    return q


class Attention(nn.Module):
    """q/k/v read the input; o reads something else of the same width (so it may be joined, never shared)."""

    def __init__(self, g_idx, bias):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = layer(HIDDEN, g_idx, 1, bias), layer(40, g_idx, 2, bias), layer(40, g_idx, 3, bias)
        self.o_proj = layer(HIDDEN, g_idx, 4, bias)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return x + self.o_proj(torch.tanh(q + torch.cat([k, v, k], -1)[..., :HIDDEN]))


def model(act_order: bool, bias: bool) -> nn.Module:
    g_idx = (torch.argsort(torch.randperm(HIDDEN, generator=torch.Generator().manual_seed(0)) if act_order
                           else torch.arange(HIDDEN)) // 32).to(torch.int32)
    return nn.Sequential(Attention(g_idx, bias), Attention(g_idx, bias))


def counting(monkeypatch) -> list:
    calls = []
    matmul = cpu_gemm.matmul

    def counted(x, *args):
        calls.append(args[-2])  # n_out
        return matmul(x, *args)

    monkeypatch.setattr(cpu_gemm, "matmul", counted)
    return calls


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_joined_layers_compute_exactly_what_each_computes_alone(monkeypatch, act_order, bias, mode):
    alone = model(act_order, bias)
    joined = copy.deepcopy(alone)
    assert join_shared_inputs(joined) == 2  # one group per Attention: q, k, v and o
    calls = counting(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    with getattr(torch, mode)():
        for step, rows in enumerate([7, 1, 1, 1, 3, 1, 1, 200, 1]):  # prefill-like, decode, a few rows, long
            x = torch.randn(1, rows, HIDDEN, generator=gen)
            calls.clear()
            y = joined(x)
            n_calls = len(calls)
            assert torch.equal(y, alone(x)), f"step {step}"
            if step >= 2 and rows == 1:  # learned: q, k, v in one call, then o
                assert n_calls == 4 and calls[:4] == [HIDDEN + 48 + 40, HIDDEN, HIDDEN + 48 + 40, HIDDEN]


def test_joined_layers_hold_one_copy_and_save_what_they_saved(monkeypatch):
    alone = model(True, True)
    joined = copy.deepcopy(alone)
    join_shared_inputs(joined)
    attention = joined[0]
    group = attention.q_proj.__dict__["_shared"]
    assert isinstance(group, SharedInput) and [id(m) for m in group.layers] == [
        id(attention.q_proj), id(attention.k_proj), id(attention.v_proj), id(attention.o_proj)]
    base = group.joined[0].data_ptr()
    assert attention.v_proj.k_qweight.data_ptr() == base + 4 * (attention.q_proj.k_qweight.numel()
                                                                + attention.k_proj.k_qweight.numel())
    for a, b in zip(alone.state_dict().items(), joined.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert join_shared_inputs(joined) == 0  # intact groups are kept


def test_a_reader_changed_in_place_or_a_layer_reloaded_is_computed_again():
    alone = model(False, False)
    joined = copy.deepcopy(alone)
    join_shared_inputs(joined)
    a, b = alone[0], joined[0]
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for _ in range(2):  # learn
            x = torch.randn(1, 1, HIDDEN, generator=gen)
            b(x)
        x = torch.randn(1, 1, HIDDEN, generator=gen)
        assert torch.equal(b.q_proj(x), a.q_proj(x))
        x.mul_(2)  # between the readers: k must see the new values
        assert torch.equal(b.k_proj(x), a.k_proj(x))
        # new weights in k: the joined tensors no longer hold them
        b.k_proj.load_state_dict(alone[1].k_proj.state_dict())
        for _ in range(2):
            x = torch.randn(1, 1, HIDDEN, generator=gen)
            assert torch.equal(b.q_proj(x), a.q_proj(x))
            assert torch.equal(b.k_proj(x), alone[1].k_proj(x))
            assert torch.equal(b.v_proj(x), a.v_proj(x))


def test_a_reader_that_stops_reading_is_dropped(monkeypatch):
    joined = model(False, False)
    join_shared_inputs(joined)
    attention = joined[0]
    calls = counting(monkeypatch)
    with torch.no_grad():
        for _ in range(3):
            joined(torch.randn(1, 1, HIDDEN))
        x = torch.randn(1, 1, HIDDEN)
        attention.q_proj(x)  # computes q, k and v; k and v never come
        calls.clear()
        for _ in range(2):
            attention.q_proj(torch.randn(1, 1, HIDDEN))
        assert calls == [HIDDEN, HIDDEN]  # q alone again


def test_to_backend_joins(monkeypatch):
    m = model(False, False)
    to_backend(m, "cpu-packed")
    assert all(isinstance(layer.__dict__.get("_shared"), SharedInput) for layer in m[0].children())
