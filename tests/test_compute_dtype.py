"""Calibration passes in another dtype (``calibration_dtype``): the choice, the swap, and what reaches the solve."""

import pytest
import torch
from lightning import Trainer
from tiny_lm import CALIBRATION_TEXT, tiny_model_dir

from lightning_gptq.lightning import CalibrationDataModule, GPTQCallback, GPTQModule, HessianCapture
from lightning_gptq.models import capture_block_inputs, get_adapter, load_causal_lm, run_block
from lightning_gptq.models import compute_dtype as cd
from lightning_gptq.models.adapters import weight_out_in
from lightning_gptq.nn import QuantLinear
from lightning_gptq.quant import HessianAccumulator, QuantConfig, gptq_quantize


def test_running_in_puts_the_very_same_weights_back():
    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    block.register_buffer("steps", torch.arange(3))
    before = {n: (t, t.data.clone()) for n, t in [*block.named_parameters(), *block.named_buffers()]}
    with cd.running_in(block, torch.bfloat16):
        assert all(p.dtype == torch.bfloat16 for p in block.parameters()) and block.steps.dtype == torch.int64
        out = block(torch.randn(2, 8, dtype=torch.bfloat16))
        assert out.dtype == torch.bfloat16
    for name, (tensor, data) in before.items():
        current = dict([*block.named_parameters(), *block.named_buffers()])[name]
        assert current is tensor and current.dtype == data.dtype and torch.equal(current.data, data), name


def test_auto_takes_bf16_only_where_it_times_faster(monkeypatch):
    def model(dtype):
        m = torch.nn.Linear(4, 4).to(dtype)
        m.config = type("C", (), {"hidden_size": 64, "intermediate_size": 128})()
        return m

    cd.matmul_speedup.cache_clear()
    monkeypatch.setattr(cd, "matmul_speedup", lambda *a, **k: 4.5)
    assert cd.resolve_calibration_dtype("auto", model(torch.float32)) == torch.bfloat16
    monkeypatch.setattr(cd, "matmul_speedup", lambda *a, **k: 0.05)  # AVX2-only CPUs
    assert cd.resolve_calibration_dtype("auto", model(torch.float32)) is None
    assert cd.resolve_calibration_dtype("auto", model(torch.bfloat16)) is None  # already 16-bit
    assert cd.resolve_calibration_dtype(None, model(torch.float32)) is None
    assert cd.resolve_calibration_dtype("float32", model(torch.float32)) is None
    assert cd.resolve_calibration_dtype("bfloat16", model(torch.float32)) == torch.bfloat16
    with pytest.raises(ValueError, match="calibration_dtype"):
        cd.resolve_calibration_dtype("int8", model(torch.float32))


def test_bf16_calibration_passes_feed_the_hessian_and_the_solve_reads_fp32_weights(tmp_path):
    """Block 0 of a bf16-pass fit equals GPTQ on the model's fp32 weights with the Hessian of the
    block's bf16 inputs (a bf16 copy of block 0 run on the captured inputs cast to bf16)."""
    model_dir = tiny_model_dir(tmp_path, "llama")
    cfg = QuantConfig(bits=4, group_size=16, sym=False)
    module = GPTQModule(str(model_dir), calibration_dtype="bfloat16", eval_after=False, save_quantized=False,
                        latency=False)
    dm = CalibrationDataModule(str(CALIBRATION_TEXT), nsamples=4, seqlen=20, eval_datasets=[], eval_seqlen=32)
    trainer = Trainer(callbacks=[HessianCapture(), GPTQCallback(cfg)], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    assert module.driver.compute_dtype == torch.bfloat16
    assert module.activation_dtype() == "float32"  # propagation runs (and caches) in the model's dtype
    assert all(p.dtype == torch.float32 for p in module.lm.parameters())  # the model itself is untouched
    fitted = {n: m.codes() for n, m in module.lm.named_modules() if isinstance(m, QuantLinear)}

    lm, _ = load_causal_lm(str(model_dir))
    adapter = get_adapter(lm)
    inputs = capture_block_inputs(lm, adapter, dm.calibration_windows(module.tokenizer), batch_size=1)
    block = adapter.blocks(lm)[0]
    linears = dict(adapter.linear_layers(block))
    weights = {n: weight_out_in(m).detach().clone() for n, m in linears.items()}
    accs = {n: HessianAccumulator(w.shape[1]) for n, w in weights.items()}
    block.to(torch.bfloat16)
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: accs[n].add(a[0])) for n, m in linears.items()]
    for j, hidden in enumerate(inputs.hidden):
        kwargs = cd.floating_to(inputs.kwargs_for(0, j), torch.bfloat16)
        run_block(block, hidden.to(torch.bfloat16), kwargs)
    for handle in handles:
        handle.remove()
    prefix = adapter.blocks_path or "model.layers"
    for name, weight in weights.items():
        expected = gptq_quantize(weight, accs[name].hessian, cfg).codes
        assert torch.equal(fitted[f"{prefix}.0.{name}"], expected), name
    with pytest.raises(AssertionError):  # the bf16 Hessian is not the fp32 one: the test can tell them apart
        fp32 = HessianAccumulator(weights["mlp.down_proj"].shape[1])
        block.float()
        handle = block.mlp.down_proj.register_forward_pre_hook(lambda mod, a: fp32.add(a[0]))
        for j, hidden in enumerate(inputs.hidden):
            run_block(block, hidden, inputs.kwargs_for(0, j))
        handle.remove()
        assert torch.equal(fp32.hessian, accs["mlp.down_proj"].hessian)



def _fit(tmp_path, model_dir, cfg, calibration_dtype):
    module = GPTQModule(str(model_dir), calibration_dtype=calibration_dtype, eval_after=False, save_quantized=False,
                        latency=False)
    dm = CalibrationDataModule(str(CALIBRATION_TEXT), nsamples=4, seqlen=20, eval_datasets=[], eval_seqlen=32)
    gptq = GPTQCallback(cfg)
    trainer = Trainer(callbacks=[HessianCapture(), gptq], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    return module, dm, {r.name: r for r in gptq.records}


def test_fp64_stream_equals_a_plain_fp64_loop_layer_by_layer(tmp_path):
    """``calibration_dtype: float64`` on an fp32 model: every block runs in fp64 for its calibration pass
    *and* its propagation, the cached inputs stay fp64, Hessians are fp64 products and the solve reads
    them in fp64, while the model keeps its fp32 weights. Checked against a plain loop written here
    (fp64 block copies, fp64 accumulators, the same solve): every layer's Hessian sum and codes are
    bit-equal, digest for digest, and the fp32 run's Hessians are not."""
    from lightning_gptq.lightning.callbacks import CALIBRATION_BACKEND, digest
    from lightning_gptq.nn import make_quant_linear, replace_submodule

    model_dir = tiny_model_dir(tmp_path, "llama")
    cfg = QuantConfig(bits=4, group_size=16, sym=False, act_order=True)
    module, dm, records = _fit(tmp_path / "a", model_dir, cfg, "float64")
    assert module.driver.widens and module.activation_dtype() == "float64"
    assert all(p.dtype == torch.float32 for p in module.lm.parameters())

    f64 = torch.float64
    lm, _ = load_causal_lm(str(model_dir))
    adapter = get_adapter(lm)
    inputs = capture_block_inputs(lm, adapter, dm.calibration_windows(module.tokenizer), batch_size=1)
    hidden = [h.to(f64) for h in inputs.hidden]
    prefix = adapter.blocks_path or "model.layers"
    checked = 0
    for b, block in enumerate(adapter.blocks(lm)):
        linears = dict(adapter.linear_layers(block))
        checked += len(linears)
        accs = {n: HessianAccumulator(weight_out_in(m).shape[1], dtype=f64) for n, m in linears.items()}
        handles = [m.register_forward_pre_hook(lambda mod, a, n=n: accs[n].add(a[0])) for n, m in linears.items()]
        with cd.running_in(block, f64):
            for j, h in enumerate(hidden):
                run_block(block, h, cd.floating_to(inputs.kwargs_for(b, j), f64))
        for handle in handles:
            handle.remove()
        for name, layer in linears.items():
            record = records[f"{prefix}.{b}.{name}"]
            assert digest(accs[name].total) == record.hessian_sha256, record.name
            q = gptq_quantize(weight_out_in(layer).detach(), accs[name].hessian, cfg)
            assert digest(q.codes, q.zeros, q.g_idx) == record.codes_sha256, record.name
            assert digest(q.scales.float()) == record.scales_sha256, record.name
            replace_submodule(block, name, make_quant_linear(layer, q, CALIBRATION_BACKEND))
        with cd.running_in(block, f64):
            hidden = [run_block(block, h, cd.floating_to(inputs.kwargs_for(b, j), f64)) for j, h in enumerate(hidden)]
        assert all(h.dtype == f64 for h in hidden)
    assert checked == len(records) > 0

    _, _, fp32 = _fit(tmp_path / "b", model_dir, cfg, None)  # the test can tell the streams apart
    assert all(fp32[n].hessian_sha256 != r.hessian_sha256 for n, r in records.items())


def test_the_dry_run_counts_an_fp64_stream_at_8_bytes(tmp_path):
    """The plan of an fp64 stream: the activation cache, the block's transients and the solve workspace at
    twice an fp32 run's bytes (the Hessian sums are fp64 either way)."""
    from test_lightning import cli_args

    from lightning_gptq.cli import main

    model_dir = tiny_model_dir(tmp_path, "llama")
    plans = {}
    for name, extra in {"fp32": [], "fp64": ["--model.calibration_dtype=float64"]}.items():
        run = main(["fit", *cli_args(model_dir, tmp_path / name, "--model.eval_after=false", "--model.latency=false",
                                     "--model.dry_run=true", f"--model.output_dir={tmp_path / name}", *extra)])
        plans[name] = run.model.plan.to_dict()["bytes"]
    for part in ("activation cache", "block transient", "solve workspace"):
        assert plans["fp64"][part] == 2 * plans["fp32"][part], part
    assert plans["fp64"]["Hessians (one block)"] == plans["fp32"]["Hessians (one block)"]
