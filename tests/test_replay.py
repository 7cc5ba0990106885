"""True-sequential passes replay a block's finished parts (its attention call once q/k/v are quantized, the whole
attention once o_proj is) instead of running them again: the same codes and block outputs bit for bit, and each
refusal (a changed block, another dtype, a part run twice or after a layer still to come, an output too big, a
start hook that changed the block) holds; a replayed output can be changed in place without reaching the record."""

from unittest import mock

import pytest
import torch
from tiny_lm import char_tokenizer
from tiny_models import FACTORIES, MOE_FACTORIES, token_ids
from torch import nn

from lightning_gptq import QuantConfig
from lightning_gptq.driver import CalibrationDriver
from lightning_gptq.lightning import GPTQCallback, HessianCapture
from lightning_gptq.models.replay import PartReplay, fingerprint
from lightning_gptq.nn import QuantLinear
from lightning_gptq.sources import LoadedModel

ARCHS = ["llama", "opt", "gpt2", "falcon", "phi", "cohere", "phi3", "bloom", "gpt_neox", "gemma3"]


def _calibrate(model, windows, replay_parts: bool, sink_weight=1.0):
    """Codes of every quantized layer, the last block's outputs, and the driver, after a true-sequential run."""
    hooks = [HessianCapture(sink_weight=sink_weight, sink_layers="attention", sink_probe_windows=2),
             GPTQCallback(QuantConfig(bits=3, group_size=16, act_order=True), backend="torch")]

    def fire(name, ctx):
        for cb in sorted(hooks, key=lambda cb: cb.block_hook_order):
            if hasattr(cb, name):
                getattr(cb, name)(None, None, ctx)

    driver = CalibrationDriver(LoadedModel(model, char_tokenizer()), fire=fire, true_sequential=True,
                               replay_parts=replay_parts)
    end_pass, held = PartReplay.end_pass, []

    def counted(replay, num_batches):  # bytes kept in records once the pass's recordings are in, against the cache
        kept = [*[r.outputs for r in replay.records.values()], *[list(v.values()) for v in replay._recorded.values()]]
        tensors = [t for outputs in kept for out in outputs for t in (out if isinstance(out, tuple) else (out,))
                   if isinstance(t, torch.Tensor)]
        held.append(sum(t.numel() * t.element_size() for t in tensors) / sum(h.numel() * h.element_size()
                                                                             for h in driver.inputs.hidden))
        end_pass(replay, num_batches)

    with mock.patch.object(PartReplay, "end_pass", counted):
        driver.run(windows, batch_size=2)
    assert max(held, default=0) <= 1.0  # at most one activation cache more than a pass without replay holds
    codes = {n: m.codes() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    return codes, driver.inputs.hidden, driver


@pytest.mark.parametrize("arch", ARCHS + ["mixtral"])
def test_replay_gives_the_codes_and_outputs_of_running_every_pass(arch):
    factory = {**FACTORIES, **MOE_FACTORIES}[arch]
    windows = token_ids(n=6, seqlen=16)
    sink = "attention" if arch == "llama" else 1.0  # the probe keeps the q/k/v pass running through the attention
    codes, outputs, driver = _calibrate(factory(), windows, replay_parts=True, sink_weight=sink)
    plain_codes, plain_outputs, plain = _calibrate(factory(), windows, replay_parts=False, sink_weight=sink)
    assert codes.keys() == plain_codes.keys() and codes
    for name in codes:
        assert torch.equal(codes[name], plain_codes[name]), name
    assert len(outputs) == len(plain_outputs) == 3
    assert all(torch.equal(a, b) for a, b in zip(outputs, plain_outputs))
    blocks = len(driver.blocks)
    assert plain.replayed_calls == 0
    if arch == "bloom":  # its attention also returns the attention probabilities (heads x seq^2): too big to hold
        assert driver.replayed_calls == 0
    else:  # on each of the 3 batches: the attention call in the MLP-input pass, the attention (a child) in the
        # MLP-output pass and in propagation
        assert driver.replayed_calls == 3 * 3 * blocks
    assert driver.timings["hessian"] > 0


class Child(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


class Block(nn.Module):
    """``first`` then ``second``; the first's output is added to in place, as some blocks do with residuals.
    ``twice``: ``first`` runs twice; ``late``: ``second`` (still to be quantized) runs before ``first`` returns."""

    def __init__(self, twice=False, late=False):
        super().__init__()
        self.first, self.second = Child(), Child()
        self.twice, self.late = twice, late

    def forward(self, x):
        h = self.first(self.second(x) if self.late else x)
        if self.twice:
            h = self.first(h)
        h += x
        return self.second(h)


def _passes(block, replay, x, *, record_limit=10**9, dtype=None, between=None):
    """One pass that may record ``first`` (``second`` pending), then two that may replay it; the three outputs."""
    outs = []
    for p, consume in enumerate((False, False, True)):
        replay.begin_pass(dtype, done=["first.lin"], pending=[] if p else ["second.lin"], consume=consume)
        with torch.no_grad(), replay.batch(0, record_limit):
            outs.append(block(x))
        replay.end_pass(1)
        if between is not None and p == 0:
            between(block)
    return outs


def test_a_replayed_child_is_not_run_and_in_place_changes_do_not_reach_the_record():
    torch.manual_seed(0)
    block, x = Block(), torch.randn(2, 4)
    replay = PartReplay(block)
    outs = _passes(block, replay, x)
    assert block.first.calls == 1 and replay.replayed == 2 and block.second.calls == 3
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert replay.records["first"].outputs == [None]  # the last pass (propagation) frees each batch it replays
    with pytest.raises(RuntimeError, match="already used"):
        replay._replay("first", 0, x)


@pytest.mark.parametrize("case", ["weight changed", "layer swapped", "other dtype", "run twice", "too big",
                                  "after a pending layer", "changed by a start hook"])
def test_a_part_is_not_replayed_when_it_would_give_another_output(case):
    torch.manual_seed(0)
    block, x = Block(twice=case == "run twice", late=case == "after a pending layer"), torch.randn(2, 4)
    replay = PartReplay(block)
    kwargs = {}
    if case == "weight changed":  # through .data, which keeps the tensor's version: the sum sees it
        kwargs["between"] = lambda b: b.first.lin.weight.data.mul_(2)
    elif case == "layer swapped":
        kwargs["between"] = lambda b: setattr(b.first, "lin", nn.Linear(4, 4))
    elif case == "too big":
        kwargs["record_limit"] = x.numel() * x.element_size() - 1
    if case in ("other dtype", "changed by a start hook"):
        replay.begin_pass(None, done=["first.lin"], pending=["second.lin"])
        with torch.no_grad(), replay.batch(0, 10**9):
            block(x)
        replay.end_pass(1)
        assert list(replay.records) == ["first"]
        if case == "other dtype":
            replay.begin_pass(torch.float64, done=["first.lin"])
        else:
            replay.begin_pass(None, done=["first.lin"])
            before = fingerprint(block)
            block.first.lin.bias.data.add_(1)  # what a callback's on_block_start might do
            replay.after_hooks(before, [])
        assert not replay.records and not replay._replaying  # (another dtype's pass may record its own)
        assert not replay._candidates or case == "other dtype"
        return
    outs = _passes(block, replay, x, **kwargs)
    expected = block(x) if case in ("weight changed", "layer swapped") else outs[0]
    torch.testing.assert_close(outs[2], expected, rtol=0, atol=0)
    if case in ("weight changed", "layer swapped"):  # dropped at the next pass, then recorded anew and replayed
        assert replay.replayed == 1 and not torch.equal(outs[1], outs[0])
    elif case == "after a pending layer":  # recorded only in the second pass, once `second` is no longer pending
        assert replay.replayed == 1 and block.first.calls == 2
    else:
        assert replay.replayed == 0 and not replay.records


def test_the_dry_run_rehearses_the_true_sequential_passes_as_the_driver_runs_them():
    """The dry run times block 0's passes the driver's way: each ends at its group, q/k/v (and gate/up) share one
    Hessian, fed once, and the attention's softmax(qk)v runs in the o_proj pass only (replayed after)."""
    from lightning_gptq.lightning.plan import _rehearse_passes
    from lightning_gptq.models import get_adapter, run_block
    from lightning_gptq.models.capture import capture_block_inputs
    from lightning_gptq.quant import HessianAccumulator

    model = FACTORIES["llama"]()
    driver = CalibrationDriver(LoadedModel(model, char_tokenizer()), fire=lambda *a: None, true_sequential=True)
    inputs = capture_block_inputs(model, get_adapter(model), token_ids(n=2, seqlen=16), batch_size=2)
    block, groups = driver.blocks[0], driver.groups(0)
    accumulators = {n: HessianAccumulator(block.get_submodule(n).in_features) for g in groups for n in g}
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def core(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    ran = {"q_proj": 0, "gate_proj": 0}
    for name, module in (("q_proj", block.self_attn.q_proj), ("gate_proj", block.mlp.gate_proj)):
        module.register_forward_hook(lambda *_, name=name: ran.__setitem__(name, ran[name] + 1))
    with mock.patch("torch.nn.functional.scaled_dot_product_attention", core), torch.no_grad():
        passes, propagate = _rehearse_passes(
            driver, block, groups, lambda: run_block(block, inputs.hidden[0], inputs.kwargs_for(0, 0)), accumulators,
            inputs.hidden[0].numel() * 4, None)
    assert len(passes) == len(groups) == 4 and all(t > 0 for t in passes) and propagate > 0
    # one run learns which layers share an input (as a fit's first batch does), then the o_proj pass; the gate/up pass
    # replays the attention call, then the whole attention is replayed
    assert len(calls) == 2
    # as the driver's passes after their first batch, the q/k/v pass ends at q's input and the gate/up pass at gate's:
    # q runs in the learning run, the o_proj and gate/up passes; gate in the learning run, the down_proj pass, propagation
    assert ran == {"q_proj": 3, "gate_proj": 3}
    # the readers of one tensor share one accumulator, which took one product: the batch's 2 windows once
    assert [len({id(accumulators[n]) for n in g}) for g in groups] == [1, 1, 1, 1]
    assert [accumulators[g[0]].nsamples for g in groups] == [2, 2, 2, 2]
