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

