"""True-sequential `fit` with the block's finished child replayed (the default) against every pass run from the
block's input, and the plain (not true-sequential) fit beside them: time per stage, and whether the codes agree.

Each variant is its own process running `python -m lightning_gptq fit --config configs/smollm2-135m.yaml` with
the overrides below, one after the other (``--rounds`` times, alternating); the variant without replay sets
``CalibrationDriver``'s ``replay_parts`` default to False before the CLI starts.

    python experiments/replay_ab.py --nsamples 16 --rounds 1 [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = """
import sys
from lightning_gptq.driver import CalibrationDriver
CalibrationDriver.__init__.__kwdefaults__["replay_parts"] = {replay}
from lightning_gptq.cli import main
main(sys.argv[1:])
"""
VARIANTS = {"true-sequential, replay": ("true", True), "true-sequential, every pass": ("true", False),
            "not true-sequential": ("false", True)}


def run(name: str, root: Path, nsamples: int, dry_run: bool = False) -> dict:
    """One variant's fit in its own process (``dry_run``: first the same command's dry run, in another)."""
    true_sequential, replay = VARIANTS[name]
    out = root / name.replace(" ", "_").replace(",", "")
    args = ["fit", "--config", "configs/smollm2-135m.yaml", f"--data.nsamples={nsamples}", "--model.eval_after=false",
            "--model.latency=false", "--model.save_quantized=false", f"--model.true_sequential={true_sequential}",
            f"--trainer.default_root_dir={out}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            f"--model.output_dir={out / 'quantized'}"]
    command = [sys.executable, "-c", RUN.format(replay=replay), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    estimate = {}
    if dry_run:
        subprocess.run([*command, "--model.dry_run=true", f"--model.output_dir={out / 'plan'}"], cwd=ROOT, check=True,
                       env=env, stdout=subprocess.DEVNULL)
        estimate = json.loads((out / "plan" / "plan.json").read_text())["seconds"]
    subprocess.run(command, cwd=ROOT, check=True, env=env, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "quantized" / "summary.json").read_text())
    codes = {r["name"]: (r["codes_sha256"], r["scales_sha256"]) for r in summary["layers"]}
    return {"timings": summary["timings_s"], "codes": codes, "estimate": estimate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--dry-run", action="store_true", help="also print each variant's dry-run estimate")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in args.variants:
                results[name].append(run(name, Path(tmp) / f"round{r}", args.nsamples, args.dry_run))
                t, e = results[name][-1]["timings"], results[name][-1]["estimate"]
                print(f"round {r} {name}: hessian {t.get('hessian', 0):.1f} s, propagate {t.get('propagate', 0):.1f} s, "
                      f"fit {t.get('total_fit', 0):.1f} s", flush=True)
                if e:
                    print(f"  dry run: calibrate {e['calibrate']:.1f} s, propagate {e['propagate']:.1f} s, "
                          f"solve {e['solve']:.1f} s, total {e['total']:.1f} s", flush=True)
    first = args.variants[0]
    stages = ["hessian", "propagate", "solve", "total_fit"]
    print(f"\n| {args.nsamples} x 2048, best of {args.rounds} (s) | " + " | ".join(args.variants) + " |")
    print("|---|" + "---:|" * len(args.variants))
    for stage in stages:
        best = {n: min(x["timings"].get(stage, 0.0) for x in results[n]) for n in args.variants}
        cells = [f"{best[n]:.1f}" + (f" ({best[n] / best[first]:.2f}x)" if n != first and best[first] else "")
                 for n in args.variants]
        print(f"| {stage} | " + " | ".join(cells) + " |")
    reference = results[first][0]["codes"]
    for name in args.variants[1:]:
        other = results[name][0]["codes"]
        same = sum(reference[k] == other.get(k) for k in reference)
        print(f"codes and scales equal to `{first}`'s: {name}: {same}/{len(reference)} layers")


if __name__ == "__main__":
    main()
