"""Per-channel input scaling before the solve (``gptq.equalize``): the scaled solve is the same problem in other
coordinates and keeps the exponent with the lowest output error; the rewrite is only made where a probe on the
block proves it exact, and the fitted model computes what the fp model does up to quantization error."""

import json
import warnings

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
from lightning_gptq.lightning import GPTQCallback, HessianCapture
from lightning_gptq.lightning.callbacks import digest
from lightning_gptq.models import get_adapter
from lightning_gptq.models.capture import capture_block_inputs
from lightning_gptq.models.equalization import divide_output_channels, rewrite_if_exact, scale_sources
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
    eq = equalized_gptq_quantize([w], h, [config], [])  # zero is always tried: here alone
    assert eq.alpha == 0.0 and torch.equal(eq.scales, torch.ones(64, dtype=torch.float64))
    for q in (eq.quantized[0], eq.plain[0]):
        assert torch.equal(q.codes, plain.codes) and torch.equal(q.scales, plain.scales)
    assert eq.errors[0.0] == pytest.approx(output_error(w, plain.dequantize(), h), rel=1e-12)


def test_a_16_bit_weight_is_scaled_in_fp32():
    """A bf16 layer is solved as its exact fp32 image is: W·diag(s) rounded to bf16 would move the weights by about
    as much as 8-bit codes do, and plain GPTQ would then win every comparison."""
    w, h = _problem()
    w16 = w.to(torch.bfloat16)
    config = QuantConfig(bits=8, group_size=16, sym=False)
    half, image = (equalized_gptq_quantize([v], h.float(), [config], [0.5, 1.0]) for v in (w16, w16.float()))
    assert half.errors == pytest.approx(image.errors, rel=1e-6) and half.alpha == image.alpha > 0
    assert torch.equal(half.quantized[0].codes, image.quantized[0].codes) and half.quantized[0].dtype == torch.bfloat16


@pytest.mark.parametrize("options", [dict(), dict(act_order=True, static_groups=True, mse=True)])
def test_the_kept_exponent_has_the_lowest_summed_error_and_it_is_what_the_layers_compute(options):
    w, h = _problem()
    w2 = torch.randn(8, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)  # a second reader
    configs = [QuantConfig(bits=3, group_size=16, sym=False, **options), QuantConfig(bits=4, group_size=32)]
    eq = equalized_gptq_quantize([w, w2], h, configs, [0.5, 1.0])
    assert set(eq.errors) == {0.0, 0.5, 1.0} and eq.errors[eq.alpha] == min(eq.errors.values())
    # the layers hold Q'_i for W_i·diag(s); fed x / s they compute x · (Q'_i / s)ᵀ: that is the error reported
    computed = sum(output_error(a, q.dequantize() / eq.scales, h) for a, q in zip((w, w2), eq.quantized))
    assert computed == pytest.approx(eq.errors[eq.alpha], rel=1e-9)
    plain = [gptq_quantize(a, h, c) for a, c in zip((w, w2), configs)]
    assert all(torch.equal(p.codes, q.codes) for p, q in zip(plain, eq.plain))  # the fallback is plain GPTQ
    # on loud channels the scaling is worth it, and it is a different solution, not plain GPTQ again
    assert eq.alpha > 0 and eq.errors[eq.alpha] < 0.9 * eq.errors[0.0]
    with pytest.raises(ValueError, match="one QuantConfig per weight"):
        equalized_gptq_quantize([w], h, configs, [0.5])


def _block_inputs(arch, dtype=torch.float32):
    model = FACTORIES[arch]().to(dtype)
    adapter = get_adapter(model)
    inputs = capture_block_inputs(model, adapter, token_ids(1, 16))
    return adapter.blocks(model)[0], inputs.hidden[0], inputs.kwargs_for(0, 0)


LLAMA_SOURCES = {"input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                 "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"], "mlp.up_proj": ["mlp.down_proj"]}


@pytest.mark.parametrize("arch, sources, exact", [
    ("llama", LLAMA_SOURCES, {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}),
    ("opt", {"self_attn_layer_norm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
             "final_layer_norm": ["fc1"], "fc1": ["fc2"]}, {"self_attn_layer_norm", "final_layer_norm", "fc1"}),
    ("gpt2", {"ln_1": ["attn.c_attn"], "ln_2": ["mlp.c_fc"], "mlp.c_fc": ["mlp.c_proj"]}, {"ln_1", "ln_2"}),  # GELU
    ("gemma", {**LLAMA_SOURCES}, {"mlp.up_proj"}),  # its norms multiply by 1 + weight
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # 16-bit: what GPU users fit
def test_sources_are_found_and_only_exact_rewrites_are_kept(arch, sources, exact, dtype):
    block, hidden, kwargs = _block_inputs(arch, dtype)
    found = scale_sources(block, hidden, kwargs)
    assert {p: sorted(c) for p, c in found.items()} == {p: sorted(c) for p, c in sources.items()}
    for producer, consumers in found.items():
        state = {k: v.clone() for k, v in block.state_dict().items()}
        width = block.get_submodule(consumers[0]).weight.shape[0 if arch == "gpt2" else 1]
        scales = torch.rand(width, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
        assert rewrite_if_exact(block, producer, consumers, scales, hidden, kwargs) is (producer in exact), producer
        changed = {k for k, v in block.state_dict().items() if not torch.equal(v, state[k])}
        # kept: the producer only (its consumers are put back for their solve); refused: nothing
        assert changed == ({f"{producer}.{k}" for k in block.get_submodule(producer).state_dict()} & changed
                           if producer in exact else set())
        assert changed or producer not in exact
        block.load_state_dict(state)


@pytest.mark.parametrize("producer, local", [("input_layernorm", False), ("mlp.up_proj", True)])
@pytest.mark.parametrize("others", [True, False])
def test_processes_make_a_rewrite_together_or_not_at_all(producer, local, others):
    """gptq_ddp: each process checks on its own windows; ``agree`` gets its verdict and what it returns (all
    processes' verdicts combined) is what happens, so no rank keeps a rewrite another refused."""
    block, hidden, kwargs = _block_inputs("gemma")  # input_layernorm: 1 + weight, refused; up_proj: exact
    consumers = scale_sources(block, hidden, kwargs)[producer]
    scales = torch.rand(block.get_submodule(consumers[0]).weight.shape[1], dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1)) + 0.5
    state = {k: v.clone() for k, v in block.state_dict().items()}
    votes = []
    made = rewrite_if_exact(block, producer, consumers, scales, hidden, kwargs,
                            agree=lambda verdict: votes.append(verdict) or (verdict and others))
    changed = {k for k, v in block.state_dict().items() if not torch.equal(v, state[k])}
    assert votes == [local]
    assert made is (local and others) and bool(changed) is made


def test_dividing_output_channels_divides_the_output_dense_quantized_or_norm():
    torch.manual_seed(0)
    dense = torch.nn.Linear(32, 8)
    x, d = torch.randn(5, 32), torch.rand(8, dtype=torch.float64) + 0.5
    quantized = make_quant_linear(dense, gptq_quantize(dense.weight.detach(), torch.eye(32), QuantConfig(group_size=8)),
                                  "torch")
    norm = torch.nn.LayerNorm(8)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    for layer, inputs in ((dense, x), (quantized, x), (norm, x[:, :8])):
        before = layer(inputs).detach()
        divide_output_channels(layer, d)
        torch.testing.assert_close(layer(inputs).detach(), before / d.float(), rtol=1e-6, atol=1e-6)

    class Converted(QuantLinear):  # a backend that keeps its own layout: its scales alone do not define it
        pass

    converted = Converted(32, 8, bits=4, group_size=8, sym=True, bias=False)
    with pytest.raises(RuntimeError, match="another form"):
        divide_output_channels(converted, d)
    with pytest.raises(TypeError, match="no per-channel output"):
        divide_output_channels(torch.nn.GELU(), d)


@pytest.mark.parametrize("kwargs, message", [(dict(equalize=[3.0]), "exponents in"),
                                             (dict(equalize=[0.5], equalize_layers="("), "not a regular expression")])
def test_bad_settings_fail_when_the_callback_is_made(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        GPTQCallback(QuantConfig(), **kwargs)


def test_with_round_to_nearest_it_is_ignored_with_a_warning():
    """A config that scales, run with --gptq.method=rtn (the paper's baseline), still runs: RTN has no Hessians."""
    with pytest.warns(UserWarning, match="ignored with method='rtn'"):
        callback = GPTQCallback(QuantConfig(), method="rtn", equalize=[0.5])
    assert callback.equalizer is None and callback.report()["equalize"] == []


def test_with_the_asymmetric_solve_it_fails_before_any_work():
    model = FACTORIES["llama"]()
    with pytest.raises(MisconfigurationException, match="do not combine"):
        quantize(model, token_ids(4, 16), QuantConfig(group_size=16), equalize=[0.5], asymmetric=True)


@pytest.mark.parametrize("true_sequential", [False, True])
def test_an_eight_bit_fit_with_scaling_computes_the_fp_model_and_saves_what_it_computes(tmp_path, true_sequential):
    """At 8 bits the quantized model is the fp one up to small noise: a rewrite that forgot the producer (inputs
    not divided by s), or divided the wrong rows, would be far off. True-sequential, down_proj's producer
    (up_proj) is already quantized when the rewrite is made: its scales take the fold."""
    model = FACTORIES["llama"]()
    ids = token_ids(2, 16, seed=1)
    reference = full_logits(model, ids)
    config = QuantConfig(bits=8, group_size=16, sym=False)
    plain = quantize(FACTORIES["llama"](), token_ids(8, 16), config, backend="torch", true_sequential=true_sequential)
    scaled = quantize(model, token_ids(8, 16), config, equalize=[0.5, 1.0], backend="torch",
                      output_dir=tmp_path / "out", true_sequential=true_sequential)
    err = lambda m: float((full_logits(m, ids) - reference).abs().max())  # noqa: E731
    assert err(scaled) < 3 * err(plain) + 1e-3 and err(scaled) < 0.05 * float(reference.abs().max())
    records = json.loads((tmp_path / "out" / "summary.json").read_text())["layers"]
    alphas = {r["name"]: r["equalize_alpha"] for r in records}
    assert all((a is None) == n.endswith("o_proj") for n, a in alphas.items())  # o_proj's input has no producer
    for b in range(3):  # one exponent per group of readers
        group = [alphas[f"model.layers.{b}.{n}"] for n in LLAMA_SOURCES["input_layernorm"]]
        assert len(set(group)) == 1
    folds = [n for n, a in alphas.items() if a]
    assert len(folds) >= 3, alphas  # rewrites were made (so the first assertion tests them)
    ups = {f"model.layers.{i}.mlp.up_proj": b.mlp.up_proj.scales for i, b in enumerate(scaled.model.layers)}
    recorded = {r["name"]: r["scales_sha256"] for r in records if r["name"].endswith("up_proj")}
    assert recorded == {n: digest(u.T) for n, u in ups.items()}  # as the layer holds them, folded or not
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "| s | α |" in table and "| model.layers.0.self_attn.o_proj | 32×32 |" in table
    loaded, _ = load_quantized(tmp_path / "out" / "model", backend="torch")
    torch.testing.assert_close(full_logits(loaded, ids), full_logits(scaled, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_16_bit_model_takes_the_scaling_too(tmp_path, dtype):
    """The rewrite check runs the block in fp32: a 16-bit model's own rounding (~1e-3 per token) is no reason to
    refuse an exact rewrite (it refused every one before, so GPU fits in fp16 silently solved plain GPTQ)."""
    model = FACTORIES["llama"]().to(dtype)
    ids = token_ids(2, 16, seed=1)
    reference = full_logits(model, ids).float()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scaled = quantize(model, token_ids(8, 16), QuantConfig(bits=8, group_size=16, sym=False, act_order=True,
                          static_groups=True, mse=True), equalize=[0.5, 1.0], sink_weight="attention",
                          sink_layers="attention", backend="torch", output_dir=tmp_path / "out")  # the config's options
    assert not [w for w in caught if "not an equivalent rewrite" in str(w.message)]
    records = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert records["equalize_refused"] == []
    assert len([r for r in records["layers"] if r["equalize_alpha"]]) >= 3  # rewrites were made
    assert float((full_logits(scaled, ids).float() - reference).abs().max()) < 0.05 * float(reference.abs().max())


def test_a_refused_rewrite_is_solved_as_plain_gptq_with_a_warning(tmp_path):
    """GPT-2's c_fc -> GELU -> c_proj cannot take a scale: that group is solved plainly, the norms' groups not."""
    model_dir = tiny_model_dir(tmp_path, "gpt2")
    runs = {}
    for name, extra in {"plain": [], "scaled": ["--gptq.equalize=[0.5, 1.0]"]}.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            main(["fit", *cli_args(model_dir, tmp_path / name, "--model.eval_after=false", "--model.latency=false",
                                   f"--model.output_dir={tmp_path / name}", *extra, group_size=16)])
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text())["layers"]
        refusals = [w for w in caught if "not an equivalent rewrite" in str(w.message)]
        assert len(refusals) == (1 if extra else 0)  # once for the block type, not per block
    alphas = {r["name"].split(".", 3)[-1]: r["equalize_alpha"] for r in runs["scaled"]}
    assert alphas["mlp.c_proj"] is None and alphas["attn.c_proj"] is None  # refused; no producer
    assert alphas["attn.c_attn"] is not None and alphas["mlp.c_fc"] is not None
    assert all(r["equalize_alpha"] is None for r in runs["plain"])
    summary = json.loads((tmp_path / "scaled" / "summary.json").read_text())
    assert summary["equalize"] == [0.5, 1.0] and summary["equalize_refused"] == ["GPT2Block: mlp.c_fc -> ['mlp.c_proj']"]


def test_on_a_users_own_module_it_says_it_does_not_apply():
    from lightning.pytorch import LightningModule, Trainer
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return self(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    loader = DataLoader(TensorDataset(torch.randn(16, 16)), batch_size=4)
    trainer = Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False,
                      callbacks=[HessianCapture(), GPTQCallback(QuantConfig(group_size=16), equalize=[0.5])])
    with pytest.warns(UserWarning, match="solved without it"):
        trainer.fit(Tiny(), loader)


def test_equalize_layers_limits_the_scaled_groups(tmp_path):
    quantize(FACTORIES["llama"](), token_ids(8, 16), QuantConfig(bits=4, group_size=16), equalize=[0.5, 1.0],
             equalize_layers=r".*\.mlp\.down_proj$", backend="torch", output_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {r["name"] for r in summary["layers"] if r["equalize_alpha"] is not None} == {
        f"model.layers.{b}.mlp.down_proj" for b in range(3)}
    assert summary["equalize_layers"] == r".*\.mlp\.down_proj$"
    assert "on layers matching `.*\\.mlp\\.down_proj$`" in (tmp_path / "summary.md").read_text()
