"""The one-call API and the framework-free driver give the CLI's checkpoint, tensor for tensor."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lightning_gptq as lg
from lightning_gptq.cli import main
from lightning_gptq.driver import CalibrationDriver
from lightning_gptq.lightning import CalibrationDataModule, GPTQCallback, HessianCapture
from lightning_gptq.models import load_causal_lm
from lightning_gptq.nn import QuantLinear
from lightning_gptq.sources import LoadedModel
from tiny_lm import CALIBRATION_TEXT, lightning_lines, tiny_model_dir

CONFIG = lg.QuantConfig(bits=4, group_size=12, sym=False, act_order=True)
CLI = ["--data.nsamples=6", "--data.seqlen=24", "--gptq.quant.bits=4", "--gptq.quant.group_size=12",
       "--gptq.quant.sym=false", "--gptq.quant.act_order=true", "--model.eval_after=false", "--model.latency=false",
       "--trainer.enable_progress_bar=false", "--trainer.logger=false", "--hessian.sink_weight=attention",
       "--hessian.sink_layers=attention"]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    model_dir = tiny_model_dir(tmp, "llama")
    main(["fit", f"--model.model={model_dir}", f"--data.calibration={CALIBRATION_TEXT}", *CLI,
          f"--model.output_dir={tmp / 'out'}", f"--trainer.default_root_dir={tmp / 'root'}"])
    return model_dir, load_file(tmp / "out" / "model" / "model.safetensors")


def test_quantize_from_a_path_and_text_equals_the_cli(tmp_path, cli_checkpoint):
    model_dir, expected = cli_checkpoint
    model = lg.quantize(model_dir, CALIBRATION_TEXT, CONFIG, nsamples=6, seqlen=24, sink_weight="attention",
                        sink_layers="attention", output_dir=tmp_path / "out", accelerator="cpu")
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 3 * 7
    _equal(load_file(tmp_path / "out" / "model" / "model.safetensors"), expected)
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == model.gptq_summary


def test_quantize_an_in_memory_model_on_token_windows_then_save_and_load(tmp_path, cli_checkpoint):
    model_dir, expected = cli_checkpoint
    lm, tokenizer = load_causal_lm(str(model_dir))
    windows = CalibrationDataModule(calibration=str(CALIBRATION_TEXT), nsamples=6, seqlen=24).calibration_windows(tokenizer)
    before = list(tmp_path.iterdir())
    with lightning_lines() as lines:
        model = lg.quantize(lm, windows, CONFIG, sink_weight="attention", sink_layers="attention", accelerator="cpu")
    assert model is lm and list(tmp_path.iterdir()) == before  # nothing written without output_dir
    # the summary is kept on the model, and no log line names the scratch folder it was written to and deleted with
    assert len(model.gptq_summary["layers"]) == 3 * 7 and model.gptq_summary["calibration"]["nsamples"] == 6
    summary_lines = [m for m in lines if m.startswith("run summary")]
    assert summary_lines == ["run summary: kept as the returned model's gptq_summary (no output_dir given)"]
    lg.save_quantized(model, tokenizer, tmp_path / "saved")
    _equal(load_file(tmp_path / "saved" / "model.safetensors"), expected)
    reloaded, _ = lg.load_quantized(tmp_path / "saved")
    ids = windows[:2]
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-4)


def test_the_plain_driver_without_lightning_equals_the_cli(cli_checkpoint, tmp_path):
    """CalibrationDriver.run with the two callbacks' hooks called directly: no Trainer at all."""
    model_dir, expected = cli_checkpoint
    lm, tokenizer = load_causal_lm(str(model_dir))
    windows = CalibrationDataModule(calibration=str(CALIBRATION_TEXT), nsamples=6, seqlen=24).calibration_windows(tokenizer)
    hooks = sorted([HessianCapture(sink_weight="attention", sink_layers="attention"), GPTQCallback(CONFIG, backend="torch")],
                   key=lambda cb: cb.block_hook_order)

    def fire(name, ctx):
        for cb in hooks:
            if hasattr(cb, name):
                getattr(cb, name)(None, None, ctx)

    driver = CalibrationDriver(LoadedModel(lm, tokenizer), fire=fire)
    driver.run(windows)
    lg.save_quantized(lm, tokenizer, tmp_path / "driver")
    _equal(load_file(tmp_path / "driver" / "model.safetensors"), expected)


def test_quantize_refuses_what_it_cannot_do(tmp_path):
    model_dir = tiny_model_dir(tmp_path, "llama")
    lm, _ = load_causal_lm(str(model_dir))
    with pytest.raises(ValueError, match="tokenizer="):
        lg.quantize(lm, CALIBRATION_TEXT)
    with pytest.raises(TypeError, match="QuantConfig"):
        lg.quantize(lm, torch.zeros(2, 8, dtype=torch.long), {"bits": 4})
    with pytest.raises(ValueError, match="streaming"):
        lg.quantize(model_dir, CALIBRATION_TEXT, streaming=True)
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="integer tensor"):
        lg.quantize(lm, torch.randn(4, 8))


def test_a_quantized_models_folder_records_the_settings_it_was_quantized_with(tmp_path):
    """``quantize()`` then ``save_quantized``: the folder said ``damp_percent: 0.01, static_groups: false`` whatever
    the config, and ``meta`` held no settings; now both come from the run, as ``fit``'s folder has them."""
    import json

    lm, tokenizer = load_causal_lm(str(tiny_model_dir(tmp_path, "llama")))
    windows = CalibrationDataModule(calibration=str(CALIBRATION_TEXT), nsamples=4, seqlen=24).calibration_windows(tokenizer)
    config = lg.QuantConfig(bits=4, group_size=16, damp=0.05, static_groups=True, act_order=True)
    model = lg.quantize(lm, windows, config, method="rtn", accelerator="cpu")
    for save in (lg.save_quantized, lg.save_compressed_tensors):
        folder = save(model, tokenizer, tmp_path / save.__name__)
        meta = json.loads((folder / "config.json").read_text())["quantization_config"]
        if save is lg.save_quantized:
            assert meta["damp_percent"] == 0.05 and meta["static_groups"] is True
            meta = meta["meta"]
        recorded = meta["lightning_gptq"]
        assert recorded["method"] == "rtn" and recorded["quant"] == config.to_dict(), recorded
    folder = lg.save_quantized(model, tokenizer, tmp_path / "given", damp_percent=0.02, settings={"note": "mine"})
    meta = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert meta["damp_percent"] == 0.02 and meta["meta"]["lightning_gptq"]["note"] == "mine"
