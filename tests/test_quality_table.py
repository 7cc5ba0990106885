"""scripts/quality_table.py builds the runs it claims: reference rows on Wikipedia alone with the plain
Hessian, choosing runs never score a document they calibrate on, quick runs are small."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("quality_table", ROOT / "scripts" / "quality_table.py")
qt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(qt)

needs_texts = pytest.mark.skipif(not all(p.exists() for p in qt.TEXTS.values()),
                                 reason="the calibration texts in ../shared/data/calibration are not beside this checkout")


def option(args: list[str], name: str) -> str | None:
    found = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return found[-1] if found else None


@needs_texts
def test_choosing_runs_hold_documents_out(tmp_path):
    stage, args = qt.row_args("ours-4", {"wikipedia": 1, "brown": 1}, "choose", True, tmp_path / "run")
    assert stage == "fit" and option(args, "data.nsamples") == "32" and option(args, "data.eval_max_windows") == "16"
    evals = option(args, "data.eval_datasets")
    assert "ptb.valid.txt" in evals and "ptb.test" not in evals and "wiki.test" not in evals
    for name in ("wikipedia", "brown"):
        calib, held = (tmp_path / "held-out" / f"{name}-calibration.txt", tmp_path / "held-out" / f"{name}-held-out.txt")
        assert str(calib) in option(args, "data.calibration") and str(held) in evals
        calibrated = set(calib.read_text().split("\n\n"))
        scored = [d for d in held.read_text().split("\n\n") if d.strip()]
        assert scored and not calibrated.intersection(scored)
        assert len(scored) == pytest.approx(0.1 * (len(calibrated) + len(scored)), rel=0.05)


@needs_texts
def test_reference_rows_are_the_reference_and_test_runs_score_the_test_sets(tmp_path):
    stage, args = qt.row_args("ref-3", {"wikipedia": 1, "brown": 1}, "test", False, tmp_path / "run")
    assert option(args, "hessian.sink_weight") == "1" and option(args, "gptq.quant.bits") == "3"
    assert option(args, "gptq.quant.mse") == "false"  # the paper's min-max grids, whatever the config says
    assert option(args, "gptq.quant.static_groups") == "false" and option(args, "gptq.equalize") == "[]"  # nor these
    assert option(args, "data.calibration") == str(qt.TEXTS["wikipedia"])  # one source, whatever the mix asked
    assert option(args, "data.nsamples") is None and option(args, "data.eval_max_windows") is None  # the config's 128, whole sets
    assert option(args, "data.eval_datasets") == "[wikitext2, ptb-new]"
    stage, args = qt.row_args("rtn-4", {"wikipedia": 1}, "test", False, tmp_path / "run")
    assert option(args, "gptq.method") == "rtn" and option(args, "gptq.quant.mse") == "false"
    assert option(args, "gptq.equalize") == "[]"
    assert option(qt.row_args("ours-4", {"wikipedia": 1}, "test", False, tmp_path / "run")[1], "gptq.quant.mse") is None
    # ours rows: the config, at 3 bits with the 3-bit config stacked on it (before the row's own folders)
    ours3 = qt.row_args("ours-3", {"wikipedia": 1}, "test", False, tmp_path / "run")[1]
    configs = [a.split("=", 1)[1] for a in ours3 if a.startswith("--config=")]
    assert configs == [str(qt.CONFIG), str(qt.CONFIG.with_name("smollm2-135m-3bit.yaml"))]
    assert ours3.index(f"--config={configs[1]}") < ours3.index(f"--trainer.default_root_dir={tmp_path / 'run'}")
    ours4 = qt.row_args("ours-4", {"wikipedia": 1}, "test", False, tmp_path / "run")[1]
    assert [a for a in ours4 if a.startswith("--config=")] == [f"--config={qt.CONFIG}"]
    assert qt.row_args("fp32", {"wikipedia": 1}, "test", False, tmp_path / "run")[0] == "validate"


def test_won_back_share():
    assert qt.won_back(25.0, 30.0, 20.0) == " (50%)"
    assert qt.won_back(25.0, None, 20.0) == ""


def test_default_mix_is_the_configs_calibration():
    """``ours`` rows are the shipped config: the script's default mix must be the one the config calibrates on."""
    import yaml

    config = yaml.safe_load(qt.CONFIG.read_text())
    calibration = config["data"]["calibration"]
    names = {Path(path).name: share for path, share in calibration.items()}
    expected = {qt.TEXTS[name].name: float(share) for name, share in qt.parse_mix(qt.CONFIG_MIX).items()}
    assert {k: float(v) for k, v in names.items()} == expected
