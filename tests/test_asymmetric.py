"""Asymmetric calibration (GPTAQ) in the pipeline: the input mismatch ``D`` each layer is solved with
equals one computed by hand from the full-precision and the quantized model, and the extra
full-precision pass changes nothing else."""

import copy

import pytest
import torch
from lightning.pytorch import Callback

import lightning_gptq as lg
from lightning_gptq.lightning.hooks import BlockHooks
from lightning_gptq.models import load_causal_lm
from lightning_gptq.lightning import CalibrationDataModule
from tiny_lm import CALIBRATION_TEXT, tiny_model_dir

CONFIG = lg.QuantConfig(bits=3, group_size=12, sym=False, act_order=True, gptaq_alpha=1.0)


class MismatchRecorder(BlockHooks, Callback):
    """Keeps a copy of ``D`` and ``H`` of one layer of every block, between accumulation and solve."""

    block_hook_order = 5

    def __init__(self, layer: str):
        self.layer, self.D, self.H = layer, {}, {}

    def on_block_end(self, trainer, pl_module, ctx) -> None:
        self.D[ctx.block_index] = ctx.mismatches[self.layer].mismatch.clone()
        self.H[ctx.block_index] = ctx.hessians[self.layer].hessian.clone()


def layer_inputs(model, layer: str, windows: torch.Tensor) -> dict[int, torch.Tensor]:
    """``{block: [n, seq, in]}`` inputs of ``layers.<b>.<layer>`` over the windows (one at a time)."""
    seen, handles = {}, []
    for b, block in enumerate(model.model.layers):
        def hook(module, args, b=b):
            seen.setdefault(b, []).append(args[0].detach().clone())
        handles.append(block.get_submodule(layer).register_forward_pre_hook(hook))
    with torch.no_grad():
        for window in windows:
            model(window[None])
    for h in handles:
        h.remove()
    return {b: torch.cat(xs) for b, xs in seen.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = tiny_model_dir(tmp_path_factory.mktemp("asym"), "llama")
    lm, tokenizer = load_causal_lm(str(model_dir))
    windows = CalibrationDataModule(calibration=str(CALIBRATION_TEXT), nsamples=5, seqlen=24).calibration_windows(tokenizer)
    return lm, windows


@pytest.mark.parametrize("sink_weight", [1.0, 3.0])
def test_the_mismatch_is_the_full_precision_inputs_minus_the_quantized_ones(tiny, sink_weight, monkeypatch):
    from lightning.pytorch import Trainer

    lm, windows = tiny
    fp = copy.deepcopy(lm)
    recorder = MismatchRecorder("self_attn.q_proj")
    init = Trainer.__init__

    def with_recorder(self, *args, callbacks=None, **kwargs):  # quantize() builds its own callbacks: add ours
        init(self, *args, callbacks=[*(callbacks or []), recorder], **kwargs)

    monkeypatch.setattr(Trainer, "__init__", with_recorder)
    quantized = lg.quantize(copy.deepcopy(lm), windows, CONFIG, asymmetric=True, sink_weight=sink_weight,
                            backend="torch", accelerator="cpu")
    monkeypatch.undo()
    assert len(recorder.D) == len(lm.model.layers)
    x_fp = layer_inputs(fp, "self_attn.q_proj", windows)
    # q_proj's input in block b depends on blocks < b only, which the finished model has as calibration saw them
    x_q = layer_inputs(quantized, "self_attn.q_proj", windows)
    n = windows.shape[0]
    weights = torch.ones(windows.shape[1], dtype=torch.float64)
    weights[0] = sink_weight
    for b in recorder.D:
        xq, xf = x_q[b].double(), x_fp[b].double()
        expected_D = 2 / n * torch.einsum("t,nti,ntk->ik", weights, xf - xq, xq)
        expected_H = 2 / n * torch.einsum("t,nti,ntk->ik", weights, xq, xq)
        torch.testing.assert_close(recorder.H[b].double(), expected_H, rtol=1e-4, atol=1e-4 * expected_H.abs().max())
        if b == 0:
            assert torch.count_nonzero(recorder.D[b]) == 0  # the first block's inputs are the same in both models
        else:
            assert expected_D.abs().max() > 1e-3 * expected_H.abs().max()  # earlier blocks left an error
            torch.testing.assert_close(recorder.D[b].double(), expected_D, rtol=1e-4,
                                       atol=1e-4 * expected_D.abs().max())


def test_alpha_zero_gives_the_plain_result_with_the_measured_sink_rule(tiny):
    lm, windows = tiny
    options = dict(sink_weight="attention", sink_layers="attention", backend="torch", accelerator="cpu")
    plain = lg.quantize(copy.deepcopy(lm), windows, CONFIG, **options).state_dict()
    zero = lg.quantize(copy.deepcopy(lm), windows, lg.QuantConfig(**{**CONFIG.to_dict(), "gptaq_alpha": 0.0}),
                       asymmetric=True, **options).state_dict()
    full = lg.quantize(copy.deepcopy(lm), windows, CONFIG, asymmetric=True, **options).state_dict()
    assert plain.keys() == zero.keys()
    assert all(torch.equal(plain[k], zero[k]) for k in plain)  # the extra full-precision pass disturbs nothing
    codes = [k for k in plain if k.endswith("qweight")]
    assert any(not torch.equal(plain[k], full[k]) for k in codes)


def test_asymmetric_needs_one_pass_per_block(tiny):
    lm, windows = tiny
    with pytest.raises(ValueError, match="true_sequential=False"):
        lg.quantize(copy.deepcopy(lm), windows, CONFIG, asymmetric=True, true_sequential=True, accelerator="cpu")
