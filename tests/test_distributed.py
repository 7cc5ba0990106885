"""Calibration across two CPU processes (gloo): the quantized weights of a single-process run, and a
two-process run that is SIGKILLed and resumed ends where the uninterrupted one did."""

import json
import os
import subprocess
import sys

import pytest
import torch
from test_lightning import cli_args
from test_resume import KILLER
from tiny_lm import tiny_model_dir

from lightning_gptq.checkpoint import load_quantized
from lightning_gptq.cli import main
from lightning_gptq.nn import QuantLinear

# The measured sink weight goes through the all-reduce too.
EXTRA = ["--model.eval_after=false", "--model.latency=false", "--gptq.quant.act_order=true",
         "--hessian.sink_weight=attention"]
DDP = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=gptq_ddp"]


def _fit(args, tmp_path, *more, killer=False):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if killer:
        (tmp_path / "killer.py").write_text(KILLER)
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "lightning_gptq", "fit", *args, *more], check=False, env=env, capture_output=True,
                          text=True, timeout=900)


def _layers(folder):
    model, _ = load_quantized(folder / "model", backend="torch")
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


# Twelve blocks, seven windows (4 on rank 0, 3 on rank 1) and the measured sink rule probing the
# first three windows of the run: the cascade across blocks has room to amplify any rounding
# difference, the split is uneven, and the probed windows are not each rank's own first three.
DEEP = {"num_hidden_layers": 12}
EXACT = ["--data.nsamples=7", "--hessian.sink_probe_windows=3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    model_dir = tiny_model_dir(tmp, "llama", **DEEP)
    main(["fit", *cli_args(model_dir, tmp / "single", *EXTRA, *EXACT, f"--model.output_dir={tmp / 'single-out'}")])
    proc = _fit(cli_args(model_dir, tmp / "ddp", *EXTRA, *EXACT, f"--model.output_dir={tmp / 'ddp-out'}"), tmp, *DDP)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # both processes make the same choices (the LM head's GEMV); one says so, and Lightning's all_gather deprecation
    # (once per block and process) is not shown
    assert proc.stderr.count("LM head ") == 1 and "all_gather is deprecated" not in proc.stderr, proc.stderr[-4000:]
    return tmp, model_dir


def test_two_processes_give_the_single_process_weights(runs):
    """Bit for bit: each window's x·xᵀ is computed alone in fp32 and the products summed in fp64
    (exact), the attention masses likewise, so how the windows are split cannot change a Hessian."""
    tmp, _ = runs
    single, ddp = _layers(tmp / "single-out"), _layers(tmp / "ddp-out")
    assert single.keys() == ddp.keys() and len(single) == 7 * DEEP["num_hidden_layers"]
    for name, layer in single.items():
        for field in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(getattr(layer, field), getattr(ddp[name], field)), f"{name}.{field}"
    weights = [json.loads((tmp / f"{run}-out" / "summary.json").read_text())["hessian"]["block_weights"]
               for run in ("single", "ddp")]
    assert weights[0] == weights[1] and len(weights[0]) == DEEP["num_hidden_layers"]


def test_plain_ddp_is_refused_with_the_strategy_to_use(runs, tmp_path):
    _, model_dir = runs
    proc = _fit(cli_args(model_dir, tmp_path / "r", *EXTRA), tmp_path, "--trainer.accelerator=cpu",
                "--trainer.devices=2", "--trainer.strategy=ddp")
    assert proc.returncode != 0 and "--trainer.strategy=gptq_ddp" in proc.stderr


def test_two_processes_killed_then_resumed(runs, tmp_path):
    tmp, model_dir = runs
    root, out = tmp_path / "runs", tmp_path / "out"
    args = cli_args(model_dir, root, *EXTRA, *EXACT, "--resume.min_interval_s=0", f"--model.output_dir={out}")
    proc = _fit(args, tmp_path, *DDP, "--trainer.callbacks+=killer.KillAt", "--trainer.callbacks.epoch=5", killer=True)
    assert proc.returncode != 0 and not (out / "model").exists()
    assert sorted(p.name.rsplit("-", 1)[1] for p in (root / "checkpoints").glob("activations-*")) == ["rank0.pt", "rank1.pt"]
    proc = _fit(args, tmp_path, *DDP, "--ckpt_path=last")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr
    whole, resumed = _layers(tmp / "ddp-out"), _layers(out)
    for name, layer in whole.items():
        assert torch.equal(layer.qweight, resumed[name].qweight), name
        assert torch.equal(layer.scales, resumed[name].scales), name


def test_two_processes_with_input_scaling_give_the_single_process_model(tmp_path):
    """Each process checks the rewrite on its own first batch; the exponents come from the all-reduced Hessians:
    the written models are the same, rescaled norms included."""
    from safetensors.torch import load_file

    model_dir = tiny_model_dir(tmp_path, "llama", **DEEP)
    scaling = "--gptq.equalize=[0.5, 1.0]"
    main(["fit", *cli_args(model_dir, tmp_path / "single", *EXTRA, *EXACT, scaling,
                           f"--model.output_dir={tmp_path / 'single-out'}")])
    proc = _fit(cli_args(model_dir, tmp_path / "ddp", *EXTRA, *EXACT, scaling, f"--model.output_dir={tmp_path / 'ddp-out'}"),
                tmp_path, *DDP)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single, ddp = (load_file(tmp_path / f"{run}-out" / "model" / "model.safetensors") for run in ("single", "ddp"))
    assert single.keys() == ddp.keys() and all(torch.equal(t, ddp[n]) for n, t in single.items())
    alphas = [r["equalize_alpha"] for r in json.loads((tmp_path / "ddp-out" / "summary.json").read_text())["layers"]]
    assert any(alphas)  # rewrites were made


def test_two_processes_quantize_a_moe_whose_ranks_reach_other_experts(tmp_path):
    """Top-1 routing over 8 experts and a few short windows: each process reaches experts the other does not, so
    each learns only part of which expert layers share an input. The ranks agree on it before the all-reduce
    (before, the collectives paired different accumulators) and the written model is the single process's."""
    from safetensors.torch import load_file
    from tiny_lm import char_tokenizer
    from tiny_models import MOE_FACTORIES

    model_dir = tmp_path / "qwen2_moe"
    MOE_FACTORIES["qwen2_moe"](num_experts_per_tok=1).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    few = ["--model.eval_after=false", "--model.latency=false"]
    main(["fit", *cli_args(model_dir, tmp_path / "single", *few, f"--model.output_dir={tmp_path / 'single-out'}",
                           nsamples=3, seqlen=4, group_size=16)])
    proc = _fit(cli_args(model_dir, tmp_path / "ddp", *few, f"--model.output_dir={tmp_path / 'ddp-out'}", nsamples=3,
                         seqlen=4, group_size=16), tmp_path, *DDP)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single, ddp = (load_file(tmp_path / f"{run}-out" / "model" / "model.safetensors") for run in ("single", "ddp"))
    assert single.keys() == ddp.keys() and all(torch.equal(t, ddp[n]) for n, t in single.items())
    records = json.loads((tmp_path / "ddp-out" / "summary.json").read_text())["layers"]
    assert {r["method"] for r in records if ".experts." in r["name"]} == {"gptq", "rtn"}  # some reached, some not
