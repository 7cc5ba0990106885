"""Peak resident memory of a streaming ``fit`` against the model's fp32 size, and the dry run's estimate.

Runs ``python -m lightning_gptq fit --model.streaming=true`` on a local model folder in a child
process (small calibration: this is about memory), reads the child's peak RSS from the kernel, and
first runs the same command with ``--model.dry_run=true`` to set its estimate beside the measurement.

    python scripts/make_synthetic_llama.py --out /tmp/llama-1b
    python scripts/measure_streaming.py /tmp/llama-1b --nsamples 8 --seqlen 512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"


def run(argv: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in bytes) of one child process."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: exec the CLI (fork + exec keeps the RSS measurement to this child alone)
        os.execv(sys.executable, [sys.executable, "-m", "lightning_gptq", *argv])
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"fit failed ({status}): {' '.join(argv)}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--in-memory", action="store_true", help="also run the ordinary in-memory fit")
    args = parser.parse_args()

    folder = Path(args.model)
    fp32 = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    root = Path(tempfile.mkdtemp(prefix="streaming-"))
    common = ["fit", f"--model.model={folder}", f"--data.calibration={SHARED / 'data/calibration/wikipedia-vital-leads.txt'}",
              f"--data.nsamples={args.nsamples}", f"--data.seqlen={args.seqlen}", "--data.eval_datasets=[]",
              "--model.eval_after=false", "--model.latency=false", f"--gptq.quant.bits={args.bits}",
              "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _, _ = run([*common, "--model.streaming=true", "--model.dry_run=true", f"--model.output_dir={root / 'plan'}"])
    plan = json.loads((root / "plan" / "plan.json").read_text())
    seconds, peak = run([*common, "--model.streaming=true", f"--model.output_dir={root / 'streamed'}"])
    summary = json.loads((root / "streamed" / "summary.json").read_text())
    print(f"model {folder}: {fp32 / 2**30:.2f} GiB of fp32 safetensors")
    print(f"streaming fit: peak RSS {peak / 2**20:,.0f} MiB = {peak / fp32:.1%} of fp32 (goal < 30%), {seconds:.0f} s")
    print(f"dry run estimate: peak {plan['bytes']['peak'] / 2**20:,.0f} MiB ({plan['bytes']['peak'] / peak - 1:+.0%}), "
          f"time {plan['seconds']['total']:.0f} s vs fit {summary['timings_s'].get('total_fit', 0):.0f} s "
          f"({plan['seconds']['total'] / max(summary['timings_s'].get('total_fit', 1), 1e-9) - 1:+.0%})")
    for stage in ("calibrate", "propagate", "solve"):
        measured = summary["timings_s"].get("hessian" if stage == "calibrate" else stage)
        if measured:
            print(f"  {stage}: estimate {plan['seconds'].get(stage, 0):.1f} s, measured {measured:.1f} s")
    if args.in_memory:
        seconds, peak = run([*common, f"--model.output_dir={root / 'whole'}"])
        print(f"in-memory fit: peak RSS {peak / 2**20:,.0f} MiB = {peak / fp32:.1%} of fp32, {seconds:.0f} s")


if __name__ == "__main__":
    main()
