"""What running the calibration passes in bf16 costs (``model.calibration_dtype``), on text no reported number uses.

Fits SmolLM2 with the shipped config once per (calibration dtype, calibration seed), scores the first
``--windows`` windows of PTB *valid* (never a reported test set), and prints each perplexity, the
calibration time (fit up to scoring) and, per dtype, the mean and spread over seeds: bf16 passes are
worth offering where their perplexity stays within the fp32 runs' seed spread. Run it from the
repository root.

    python scripts/choose_calibration_dtype.py                       # 16 x 2048 windows, seeds 0 1, PTB valid[:16]
    python scripts/choose_calibration_dtype.py --dtypes float32 bfloat16 --seeds 0 1 2 --nsamples 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

SHARED = Path("../shared")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2-135m.yaml")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--eval", default=f"ptb-valid={SHARED / 'data' / 'ptb' / 'ptb.valid.txt'}",
                        help="name=path of the text that chooses (never a reported test set)")
    parser.add_argument("--jsonl", help="append one JSON line per run here")
    args = parser.parse_args()

    from lightning_gptq.cli import main as cli

    name = args.eval.split("=", 1)[0]
    root = Path(tempfile.mkdtemp(prefix="calibration-dtype-"))
    results: dict[str, dict[int, tuple[float, float]]] = {}
    for dtype in args.dtypes:
        for seed in args.seeds:
            label = f"{dtype}-{seed}"
            start = time.perf_counter()
            run = cli(["fit", f"--config={args.config}", f"--model.calibration_dtype={dtype}",
                       f"--data.nsamples={args.nsamples}", f"--data.seqlen={args.seqlen}", f"--data.seed={seed}",
                       f"--data.eval_datasets=[{args.eval}]", f"--data.eval_max_windows={args.windows}",
                       "--model.latency=false", "--model.save_quantized=false", "--trainer.logger=false",
                       "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root / label}",
                       "--resume.every_n_blocks=0", f"--model.output_dir={root / label}"])
            ppl = run.model.results["after"][name]["ppl"]
            calibration = run.model.timings["total_fit"]
            results.setdefault(dtype, {})[seed] = (ppl, calibration)
            print(f"{label}: {name} {ppl:.4f}, calibration {calibration:.0f} s ({time.perf_counter() - start:.0f} s "
                  "with scoring)", flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps({"dtype": dtype, "seed": seed, name: ppl, "calibration_s": round(calibration, 1),
                                        "nsamples": args.nsamples, "seqlen": args.seqlen, "windows": args.windows}) + "\n")
    print(f"\n{args.config}, calibration {args.nsamples}x{args.seqlen}, {name} first {args.windows} windows:")
    print(f"| calibration dtype | {name} per seed | mean | calibration (s), mean |\n|---|---|---:|---:|")
    for dtype, runs in results.items():
        ppls = [p for p, _ in runs.values()]
        print(f"| {dtype} | " + " / ".join(f"{p:.4f}" for p in ppls) + f" | {statistics.mean(ppls):.4f} | "
              f"{statistics.mean(t for _, t in runs.values()):.0f} |")


if __name__ == "__main__":
    main()
