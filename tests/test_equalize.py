"""Per-channel input scaling before the solve (``gptq.equalize``): the scaled solve is the same problem in other
coordinates and keeps the exponent with the lowest output error; the rewrite is only made where a probe on the
block proves it exact, and the fitted model computes what the fp model does up to quantization error."""

import json

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from test_lightning import cli_args
from tiny_lm import tiny_model_dir
from tiny_models import FACTORIES, full_logits, token_ids

from lightning_gptq import QuantConfig, gptq_quantize
from lightning_gptq.api import quantize
from lightning_gptq.checkpoint import load_quantized
from lightning_gptq.cli import main
from lightning_gptq.lightning import GPTQCallback
from lightning_gptq.lightning.callbacks import digest
from lightning_gptq.models import get_adapter
from lightning_gptq.models.capture import capture_block_inputs
from lightning_gptq.models.equalization import candidate_pairs, divide_output_channels, scales_through
from lightning_gptq.nn import QuantLinear, make_quant_linear
from lightning_gptq.quant.equalize import channel_scales, equalized_gptq_quantize, output_error


def _problem(out=24, inp=64, tokens=512, seed=0):
    """A layer whose inputs have a few loud channels (as an MLP's down projection does)."""
    g = torch.Generator().manual_seed(seed)
    loud = torch.ones(inp)
    loud[torch.randperm(inp, generator=g)[:4]] = 30.0
    x = torch.randn(tokens, inp, generator=g, dtype=torch.float64) * loud.double()
    return torch.randn(out, inp, generator=g, dtype=torch.float64), 2 * x.T @ x / tokens


def test_channel_scales_follow_the_input_power_with_geometric_mean_one():
    d = torch.tensor([4.0, 1.0, 0.0, 16.0], dtype=torch.float64)
    assert torch.equal(channel_scales(d, 0.0), torch.ones(4, dtype=torch.float64))
    s = channel_scales(d, 0.5)  # s ∝ d^(1/4); the dead channel counts as the quietest live one (1.0)
    assert float(s.log().mean()) == pytest.approx(0.0, abs=1e-12)
    assert float(s[0] / s[1]) == pytest.approx(4.0 ** 0.25) and float(s[3] / s[1]) == pytest.approx(16.0 ** 0.25)
    assert float(s[2]) == pytest.approx(float(s[1]))


def test_alpha_zero_is_plain_gptq_bit_for_bit():
    w, h = _problem()
    config = QuantConfig(bits=4, group_size=16, sym=False, act_order=True)
    plain = gptq_quantize(w, h, config)
    eq = equalized_gptq_quantize(w, h, config, [0.0])
    assert eq.alpha == 0.0 and torch.equal(eq.scales, torch.ones(64, dtype=torch.float64))
    assert torch.equal(eq.quantized.codes, plain.codes) and torch.equal(eq.quantized.scales, plain.scales)
    assert eq.errors[0.0] == pytest.approx(output_error(w, plain.dequantize(), h), rel=1e-12)


@pytest.mark.parametrize("options", [dict(), dict(act_order=True, static_groups=True, mse=True)])
def test_the_kept_exponent_has_the_lowest_error_and_the_error_is_what_the_layer_computes(options):
    w, h = _problem()
    config = QuantConfig(bits=3, group_size=16, sym=False, **options)
    eq = equalized_gptq_quantize(w, h, config, [0.0, 0.5, 1.0])
    assert set(eq.errors) == {0.0, 0.5, 1.0} and eq.errors[eq.alpha] == min(eq.errors.values())
    # the layer holds Q' for W·diag(s); fed x / s it computes x · (Q' / s)ᵀ: that is the error reported
    layer_weight = eq.quantized.dequantize() / eq.scales
    assert output_error(w, layer_weight, h) == pytest.approx(eq.errors[eq.alpha], rel=1e-9)
    # on loud channels the scaling is worth it, and it is a different solution, not plain GPTQ again
    assert eq.alpha > 0 and eq.errors[eq.alpha] < 0.9 * eq.errors[0.0]
    with pytest.raises(ValueError, match="at least one"):
        equalized_gptq_quantize(w, h, config, [])


def _block_inputs(arch):
    model = FACTORIES[arch]()
    adapter = get_adapter(model)
    inputs = capture_block_inputs(model, adapter, token_ids(1, 16))
    return adapter.blocks(model)[0], inputs.hidden[0], inputs.kwargs_for(0, 0)


@pytest.mark.parametrize("arch, producer, consumer, passes", [
    ("llama", "mlp.up_proj", "mlp.down_proj", True),      # down(silu(gate(x)) * up(x))
    ("llama", "mlp.gate_proj", "mlp.down_proj", False),   # through SiLU: not a rewrite
    ("opt", "fc1", "fc2", True),                          # fc2(relu(fc1(x))): ReLU is positively homogeneous
    ("gpt2", "mlp.c_fc", "mlp.c_proj", False),            # GELU between
    ("bloom", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h", False),
])
def test_the_probe_passes_exactly_the_pairs_a_scale_goes_through(arch, producer, consumer, passes):
    block, hidden, kwargs = _block_inputs(arch)
    if producer.endswith(("up_proj", "fc1", "c_fc", "dense_h_to_4h")):
        assert candidate_pairs(block)[consumer] == producer
    assert scales_through(block, producer, consumer, hidden, kwargs) is passes


def test_dividing_output_channels_divides_the_output_dense_or_quantized():
    torch.manual_seed(0)
    dense = torch.nn.Linear(32, 8)
    x, d = torch.randn(5, 32), torch.rand(8, dtype=torch.float64) + 0.5
    quantized = make_quant_linear(dense, gptq_quantize(dense.weight.detach(), torch.eye(32), QuantConfig(group_size=8)),
                                  "torch")
    for layer in (dense, quantized):
        before = layer(x).detach()
        divide_output_channels(layer, d)
        torch.testing.assert_close(layer(x).detach(), before / d.float(), rtol=1e-6, atol=1e-6)

    class Converted(QuantLinear):  # a backend that keeps its own layout: its scales alone do not define it
        pass

    converted = Converted(32, 8, bits=4, group_size=8, sym=True, bias=False)
    with pytest.raises(RuntimeError, match="another form"):
        divide_output_channels(converted, d)


@pytest.mark.parametrize("kwargs, message", [(dict(equalize=[3.0]), "exponents in"),
                                             (dict(equalize=[0.5], method="rtn"), "needs method='gptq'")])
def test_bad_settings_fail_when_the_callback_is_made(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        GPTQCallback(QuantConfig(), **kwargs)


def test_with_the_asymmetric_solve_it_fails_before_any_work():
    model = FACTORIES["llama"]()
    with pytest.raises(MisconfigurationException, match="do not combine"):
        quantize(model, token_ids(4, 16), QuantConfig(group_size=16), equalize=[0.5], asymmetric=True)


def test_an_eight_bit_fit_with_scaling_computes_the_fp_model_and_saves_what_it_computes(tmp_path):
    """At 8 bits the quantized model is the fp one up to small noise: a fold that forgot the producer (inputs not
    divided by s), or divided the wrong rows, would be far off. Forced to one exponent, every block scales."""
    model = FACTORIES["llama"]()
    ids = token_ids(2, 16, seed=1)
    reference = full_logits(model, ids)
    config = QuantConfig(bits=8, group_size=16, sym=False)
    plain = quantize(FACTORIES["llama"](), token_ids(8, 16), config, backend="torch")
    scaled = quantize(model, token_ids(8, 16), config, equalize=[1.0], backend="torch", output_dir=tmp_path / "out")
    err = lambda m: float((full_logits(m, ids) - reference).abs().max())  # noqa: E731
    assert err(scaled) < 3 * err(plain) + 1e-3 and err(scaled) < 0.05 * float(reference.abs().max())
    ups = [b.mlp.up_proj.scales for b in scaled.model.layers]
    plain_ups = [b.mlp.up_proj.scales for b in plain.model.layers]
    assert not torch.equal(ups[0], plain_ups[0])  # the fold happened (block 0's Hessians are the same in both)
    records = json.loads((tmp_path / "out" / "summary.json").read_text())["layers"]
    alphas = {r["name"].split(".", 3)[-1]: r["equalize_alpha"] for r in records}
    assert alphas["mlp.down_proj"] == 1.0 and alphas["mlp.up_proj"] is None
    ups_recorded = {r["name"]: r["scales_sha256"] for r in records if r["name"].endswith("up_proj")}
    assert ups_recorded == {f"model.layers.{i}.mlp.up_proj": digest(u.T) for i, u in enumerate(ups)}  # as folded
    loaded, _ = load_quantized(tmp_path / "out" / "model", backend="torch")
    torch.testing.assert_close(full_logits(loaded, ids), full_logits(scaled, ids), rtol=1e-4, atol=1e-4)


def test_a_refused_pair_is_solved_as_plain_gptq_with_one_warning(tmp_path):
    model_dir = tiny_model_dir(tmp_path, "gpt2")
    runs = {}
    for name, extra in {"plain": [], "scaled": ["--gptq.equalize=[0.5]"]}.items():
        with pytest.warns(UserWarning, match="does not pass a per-channel scale") if extra else _nothing():
            main(["fit", *cli_args(model_dir, tmp_path / name, "--model.eval_after=false", "--model.latency=false",
                                   f"--model.output_dir={tmp_path / name}", *extra, group_size=16)])
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text())["layers"]
    assert [r["codes_sha256"] for r in runs["plain"]] == [r["codes_sha256"] for r in runs["scaled"]]
    assert all(r["equalize_alpha"] is None for r in runs["scaled"])


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
