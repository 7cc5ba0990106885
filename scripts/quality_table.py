"""The README's quality table: fp32 / round-to-nearest / reference GPTQ / ours, SmolLM2-135M.

Each row is one real CLI run (``python -m lightning_gptq fit|validate --config configs/smollm2-135m.yaml``
with overrides), timed from start to finish and appended to ``--out`` as it completes (a run cut
short keeps what it measured). Rows:

- ``fp32``: the unquantized model (``validate``).
- ``rtn-<bits>``: round to nearest, same grid (asymmetric, g128, min-max: no MSE search).
- ``ref-<bits>``: the reference algorithm and its calibration: ``sink_weight: 1``, Wikipedia alone, min-max grids, no
  static groups or input scaling.
- ``ours-<bits>``: the shipped config (``configs/smollm2-135m.yaml``) at ``<bits>``, with the config for that width
  stacked on it where there is one (3 bits: ``configs/smollm2-135m-3bit.yaml``, chosen on the choosing texts).

Two evaluations:

- ``--eval test`` (default): the reported sets, WikiText-2 test and PTB test (``ptb-new``), whole.
- ``--eval choose``: the text that chooses settings, never a reported one: PTB *valid* and held-out
  documents of each calibration text (the last 10% of its documents; calibration then draws from the
  first 90% only, so the held-out text is never calibrated on). Use it for sweeps.

``--quick`` calibrates on 32 windows instead of 128 and scores the first 16 windows of each set.
Anything after ``--`` is passed to every run (e.g. ``-- --gptq.quant.mse=false``); ``--calibration``
names the calibration mix by text (``wikipedia``, ``brown``) and share.

    python scripts/quality_table.py                                   # the README's table (hours)
    python scripts/quality_table.py --rows ours-4 --eval choose --quick --tag no-mse -- --gptq.quant.mse=false
    python scripts/quality_table.py --rows ours-4 --eval choose --quick --calibration wikipedia:1,brown:1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2-135m.yaml"
SHARED = ROOT.parent / "shared" / "data"
TEXTS = {"wikipedia": SHARED / "calibration" / "wikipedia-vital-leads.txt", "brown": SHARED / "calibration" / "brown.txt"}
TEST_SETS = {"wikitext2": SHARED / "wikitext-2-raw" / "wiki.test.raw", "ptb-new": SHARED / "ptb" / "ptb.test.txt"}
HELD_OUT_SHARE = 0.1
CONFIG_MIX = "wikipedia:1,brown:1"  # the calibration of configs/smollm2-135m.yaml (a test checks they agree)
CHOSEN_ON = {  # what text chose each row's settings (the README labels rows with it)
    "fp32": "-",
    "rtn": "- (no calibration)",
    "ref": "the paper's settings; calibration Wikipedia alone",
    "ours": "PTB valid + held-out calibration documents (`--eval choose`)",
}


def split_held_out(name: str, folder: Path) -> tuple[Path, Path]:
    """The first 90% of a calibration text's documents (to calibrate on) and the last 10% (to score)."""
    folder.mkdir(parents=True, exist_ok=True)
    calib, held = folder / f"{name}-calibration.txt", folder / f"{name}-held-out.txt"
    if not (calib.exists() and held.exists()):
        docs = [d for d in TEXTS[name].read_text().split("\n\n") if d.strip()]
        cut = round(len(docs) * (1 - HELD_OUT_SHARE))
        calib.write_text("\n\n".join(docs[:cut]) + "\n")
        held.write_text("\n\n".join(docs[cut:]) + "\n")
    return calib, held


#: configs stacked on the main one for ``ours`` rows at other bit widths (chosen on the choosing texts, docs/quality.md)
OURS_AT_BITS = {"3": CONFIG.with_name("smollm2-135m-3bit.yaml")}


def parse_mix(spec: str) -> dict[str, float]:
    mix = {}
    for part in spec.split(","):
        name, _, share = part.partition(":")
        if name not in TEXTS:
            raise SystemExit(f"--calibration: unknown text {name!r}; known: {', '.join(TEXTS)}")
        mix[name] = float(share or 1)
    return mix


def row_args(row: str, mix: dict[str, float], eval_mode: str, quick: bool, folder: Path) -> tuple[str, list[str]]:
    kind, _, bits = row.partition("-")
    if kind == "ref":
        mix = {"wikipedia": 1.0}
    if eval_mode == "choose":
        paths = {name: split_held_out(name, folder.parent / "held-out")[0] for name in mix}
        held = [f"{name}-held-out={split_held_out(name, folder.parent / 'held-out')[1]}" for name in TEXTS]
        evals = [f"ptb-valid={SHARED / 'ptb' / 'ptb.valid.txt'}", *held]
        eval_paths = "{}"
    else:
        paths = {name: TEXTS[name] for name in mix}
        evals = list(TEST_SETS)
        eval_paths = "{" + ", ".join(f"{k}: {v}" for k, v in TEST_SETS.items()) + "}"
    calibration = str(next(iter(paths.values()))) if len(paths) == 1 else \
        "{" + ", ".join(f"{paths[n]}: {mix[n]:g}" for n in paths) + "}"
    stacked = [f"--config={OURS_AT_BITS[bits]}"] if kind == "ours" and bits in OURS_AT_BITS else []
    common = [f"--config={CONFIG}", *stacked, f"--trainer.default_root_dir={folder}", f"--trainer.logger.init_args.save_dir={folder}",
              f"--data.eval_datasets=[{', '.join(evals)}]", f"--data.eval_paths={eval_paths}",
              "--model.latency=false", "--trainer.enable_progress_bar=false"]
    if quick:
        common.append("--data.eval_max_windows=16")
    if kind == "fp32":
        return "validate", common
    fit = [*common, f"--data.calibration={calibration}", f"--gptq.quant.bits={bits}", "--model.save_quantized=false",
           f"--model.output_dir={folder}"]
    if quick:
        fit.append("--data.nsamples=32")
    if kind == "rtn":  # plain min-max grids, as the paper's baseline
        fit += ["--gptq.method=rtn", "--gptq.quant.mse=false", "--gptq.equalize=[]"]
    elif kind == "ref":
        fit += ["--hessian.sink_weight=1", "--gptq.quant.mse=false", "--gptq.quant.static_groups=false",
                "--gptq.equalize=[]"]
    return "fit", fit


def run(row: str, args, folder: Path) -> dict:
    stage, argv = row_args(row, parse_mix(args.calibration), args.eval, args.quick, folder)
    cmd = [sys.executable, "-m", "lightning_gptq", stage, *argv, *args.extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    folder.parent.mkdir(parents=True, exist_ok=True)
    (folder.parent / f"{folder.name}.log").write_text(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{row} failed (exit {proc.returncode}); see {folder.parent / f'{folder.name}.log'}")
    if stage == "validate":
        found = [re.search(r"val: (\S+) perplexity ([0-9.]+)", l) for l in (proc.stdout + proc.stderr).splitlines()]
        return {"ppl": {m.group(1): float(m.group(2)) for m in found if m}, "wall_s": wall}
    summary = json.loads((folder / "summary.json").read_text())
    return {"ppl": {k: v["ppl"] for k, v in summary["results"]["after"].items()}, "wall_s": wall,
            "timings": summary["timings_s"]}


def won_back(ppl: float, rtn: float | None, fp32: float | None) -> str:
    if rtn is None or fp32 is None or rtn == fp32:
        return ""
    return f" ({100 * (rtn - ppl) / (rtn - fp32):.0f}%)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=["fp32", "rtn-4", "ref-4", "ours-4", "rtn-3", "ref-3", "ours-3"],
                        help="fp32, rtn-<bits>, ref-<bits>, ours-<bits>")
    parser.add_argument("--eval", choices=("test", "choose"), default="test")
    parser.add_argument("--quick", action="store_true", help="32 calibration windows, 16 scored windows per set")
    parser.add_argument("--calibration", default=CONFIG_MIX,
                        help=f"calibration mix for rtn/ours rows, e.g. wikipedia:1 (default {CONFIG_MIX}: the config's "
                             "own; ref rows: wikipedia)")
    parser.add_argument("--tag", default="", help="label for this variant (e.g. the overrides after --)")
    parser.add_argument("--out", default="runs/quality_table.md")
    parser.add_argument("--jsonl", default="runs/quality_table.jsonl")
    parser.add_argument("--workdir", default="runs/quality_table")
    parser.add_argument("extra", nargs="*", help="CLI overrides for every run, after --")
    args = parser.parse_args()
    for row in args.rows:
        kind, _, bits = row.partition("-")
        if kind not in CHOSEN_ON or (kind == "fp32") != (bits == ""):
            parser.error(f"unknown row {row!r}")
    workdir = (ROOT / args.workdir).resolve()
    out, jsonl = (ROOT / args.out).resolve(), (ROOT / args.jsonl).resolve()
    known = {}  # (eval, quick, row) -> ppl, from earlier runs, for the "won back" share
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            r = json.loads(line)
            if r["row"] in ("fp32",) or r["row"].startswith("rtn-"):
                known[(r["eval"], r["quick"], r["row"])] = r["ppl"]
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("| row | variant | eval | perplexity (share of RTN's loss won back) | wall (s) | settings chosen on |\n"
                       "|---|---|---|---|---:|---|\n")
    for row in args.rows:
        label = "-".join(p for p in (row, args.tag or None, "quick" if args.quick else None, args.eval) if p)
        result = run(row, args, workdir / re.sub(r"[^\w.-]", "_", label))
        kind, _, bits = row.partition("-")
        if kind in ("fp32", "rtn"):
            known[(args.eval, args.quick, row)] = result["ppl"]
        fp32, rtn = known.get((args.eval, args.quick, "fp32"), {}), known.get((args.eval, args.quick, f"rtn-{bits}"), {})
        scores = ", ".join(f"{k} {v:.3f}" + ("" if kind in ("fp32", "rtn") else won_back(v, rtn.get(k), fp32.get(k)))
                           for k, v in result["ppl"].items())
        variant = ", ".join(p for p in (args.tag, f"calibration {args.calibration}" if kind == "ours" else "",
                                        "quick" if args.quick else "") if p)
        with out.open("a") as f:
            f.write(f"| {row} | {variant} | {args.eval} | {scores} | {result['wall_s']:.0f} | {CHOSEN_ON[kind]} |\n")
        with jsonl.open("a") as f:
            f.write(json.dumps({"row": row, "tag": args.tag, "calibration": args.calibration, "eval": args.eval,
                                "quick": args.quick, "extra": args.extra, **result}) + "\n")
        print(f"{label}: {scores}, {result['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
