"""`validate --model.lm_head=int8` with the head's dequantized copy made once per window (as shipped) or once per
slice of positions (``--per-slice``: as from the sliced scoring of 2026-12-07 (11) until its fix); prints perplexity,
seconds and peak RSS. Run once per variant, one after the other (each process's peak is its own):

    python experiments/int8_head_hold_ab.py [--per-slice] --config configs/smollm2-135m.yaml \\
        --data.eval_max_windows=8 --model.latency=false --trainer.default_root_dir=<dir>
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time

from lightning_gptq.cli import main as cli
from lightning_gptq.data import evaluation

if __name__ == "__main__":
    args = sys.argv[1:]
    per_slice = "--per-slice" in args
    if per_slice:
        args.remove("--per-slice")
        evaluation._held = lambda head: contextlib.nullcontext()
    start = time.perf_counter()
    run = cli(["validate", *args, "--model.lm_head=int8"])
    seconds = time.perf_counter() - start
    for name, row in run.model.results["val"].items():
        print(f"{'per slice' if per_slice else 'per window'}: {name} ppl {row['ppl']!r} over {row['windows']} windows; "
              f"validate {seconds:.1f} s; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
