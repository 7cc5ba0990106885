"""The real SmolLM2-135M through the CLI: GPTQ beats round-to-nearest (slow: minutes; `pytest -m slow`).

Small calibration (32 × 512 tokens) and the first 16 of 147 WikiText-2 windows keep this inside a few
minutes on 2 cores; the full-size table (128 × 2048, all windows) comes from scripts/smollm2_table.py.
"""

import pytest

from lightning_gptq.cli import main
from tiny_lm import CALIBRATION_TEXT, SMOLLM2_GGUF, WIKITEXT_TEST

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason=f"needs the shared model at {SMOLLM2_GGUF}"),
]


def run(command, root, *extra):
    args = [
        command, "--config=configs/smollm2-135m.yaml", f"--data.calibration={CALIBRATION_TEXT}",
        f"--data.eval_paths={{wikitext2: {WIKITEXT_TEST}}}", f"--model.model={SMOLLM2_GGUF.parent}",
        "--data.nsamples=32", "--data.seqlen=512", "--data.eval_max_windows=16", "--model.latency=false",
        "--model.save_quantized=false", f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.enable_progress_bar=false", *extra,
    ]
    cli = main(args)
    return cli.model.results["val" if command == "validate" else "after"]["wikitext2"]["ppl"]


@pytest.fixture(scope="module")
def ppl(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    results = {"fp32": run("validate", root / "fp32")}
    for method in ("rtn", "gptq"):
        for bits in (4, 3):
            plain = ["--gptq.quant.mse=false"] if method == "rtn" else []  # the paper's baseline: min-max grids
            results[f"{method}{bits}"] = run("fit", root / f"{method}{bits}", f"--gptq.method={method}",
                                             f"--gptq.quant.bits={bits}", f"--model.output_dir={root / method}{bits}",
                                             *plain)
    print("SmolLM2 WikiText-2 ppl (first 16 windows of 2048; calibration 32x512):", results)
    return results


# Measured 2026-11-30 (act-order, sink_weight 16, as configs/smollm2-135m.yaml): fp32 20.82, RTN-4 27.83,
# GPTQ-4 25.17, RTN-3 110.22, GPTQ-3 55.33. With sink_weight 64 (2026-11-24) GPTQ-4 was 24.93 and GPTQ-3
# 58.74; with 1 (the reference) 26.18 and 67.69. This 135M model (already 4-bit in its GGUF) loses a lot at 4 bits.


def test_gptq_4bit_g128_beats_rtn_and_stays_close_to_fp32(ppl):
    assert ppl["gptq4"] < 0.95 * ppl["rtn4"]  # measured 0.905x
    assert ppl["gptq4"] < 1.3 * ppl["fp32"]  # measured 1.21x


def test_gptq_3bit_g128_is_far_better_than_rtn(ppl):
    assert ppl["gptq3"] < 0.6 * ppl["rtn3"]  # measured 0.50x


def test_saved_checkpoint_reloads_to_the_same_perplexity_and_talks(tmp_path):
    """fit (RTN: seconds) writes the HF GPTQ folder; validate on it scores exactly fit's number;
    the folder is far smaller than the fp16 model; predict answers."""
    import json

    out = tmp_path / "out"
    common = ["--data.eval_max_windows=4", "--gptq.method=rtn"]
    after = run("fit", tmp_path / "fit", *common, "--model.save_quantized=true", f"--model.output_dir={out}")
    folder = out / "model"
    config = json.loads((folder / "quantize_config.json").read_text())
    assert config["bits"] == 4 and config["checkpoint_format"] in ("gptq", "gptq_v2")
    assert config["meta"]["quantizer"][0].startswith("lightning-gptq:")
    assert (folder / "model.safetensors").stat().st_size < 0.7 * 269_030_016  # fp16 SmolLM2: 134.5 M params
    reloaded = run("validate", tmp_path / "val", *common, f"--model.model={folder}", "--model.gguf_file=null")
    assert reloaded == after
    cli = main(["predict", "--config=configs/smollm2-135m.yaml", f"--model.model={folder}", "--model.gguf_file=null",
                "--data.prompts=[What is the capital of France?]", "--model.generation.max_new_tokens=12",
                f"--completions.output={tmp_path / 'c.jsonl'}", f"--trainer.default_root_dir={tmp_path / 'pred'}",
                "--trainer.logger=false", "--trainer.enable_progress_bar=false"])
    assert cli is not None
    row = json.loads((tmp_path / "c.jsonl").read_text())
    assert row["new_tokens"] >= 1 and row["completion"].strip()
