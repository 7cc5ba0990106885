"""scripts/check_gpu.py compares a GPU fit's perplexity with a CPU rehearsal's: those figures must belong to the
config the GPU run will use, or the comparison says nothing."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_check_gpu():
    spec = importlib.util.spec_from_file_location("check_gpu", ROOT / "scripts" / "check_gpu.py")
    module = importlib.util.module_from_spec(spec)
    argv, sys.argv = sys.argv, ["check_gpu.py"]
    try:
        spec.loader.exec_module(module)
    finally:
        sys.argv = argv
    return module


def test_cpu_figures_were_measured_with_the_configs_settings():
    check = load_check_gpu()
    assert check.CPU_PERPLEXITY_CONFIG == check.config_settings_digest(), (
        "configs/smollm2-135m.yaml's settings changed since CPU_PERPLEXITY was measured: run `python "
        "scripts/make_gpu_bundle.py && python scripts/check_gpu.py --all --cpu`, then update CPU_PERPLEXITY and "
        "CPU_PERPLEXITY_CONFIG in scripts/check_gpu.py")


def test_the_digest_reads_settings_not_comments(tmp_path):
    check = load_check_gpu()
    a, b, c = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "c.yaml"
    a.write_text("gptq:\n  quant:\n    bits: 4\n")
    b.write_text("# a comment\ngptq:\n    quant: {bits: 4}   # same settings\n")
    c.write_text("gptq:\n  quant:\n    bits: 3\n")
    assert check.config_settings_digest(a) == check.config_settings_digest(b) != check.config_settings_digest(c)


def test_a_stale_figure_is_said_in_the_report():
    check = load_check_gpu()
    text = f"eval_after: wikitext2 perplexity {check.CPU_PERPLEXITY['fit'] * 1.02:.4f} [protocol ...]"
    line = check.against_cpu("fit", text)
    assert "1.0200x (NOT within 1%)" in line
    check.CPU_PERPLEXITY_CONFIG = "0" * 16
    assert "rerun --all --cpu" in check.against_cpu("fit", text)
