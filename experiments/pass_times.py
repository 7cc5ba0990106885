"""Seconds per calibration pass (true-sequential: per group) and per propagation, summed over blocks, of one `fit`.

The driver's own timings add every calibration pass into one "hessian" figure; this wraps its ``start``/``end`` to
keep one figure per group. Everything after ``--`` goes to `python -m lightning_gptq fit`:

    python experiments/pass_times.py -- --config configs/smollm2-135m.yaml --data.nsamples=16 \\
        --model.eval_after=false --model.latency=false --model.save_quantized=false --model.true_sequential=true
"""

from __future__ import annotations

import collections
import json
import sys
import time

from lightning_gptq import driver
from lightning_gptq.cli import main as cli

seconds: dict[str, float] = collections.defaultdict(float)
started: dict[int, float] = {}
_start, _end = driver.CalibrationDriver.start, driver.CalibrationDriver.end


def start(self, stage):
    started[id(self)] = time.perf_counter()
    return _start(self, stage)


def end(self, stage):
    if stage.kind in ("calibrate", "propagate"):  # measured before end() solves: the pass alone
        name = f"calibrate, group {stage.group + 1}/{stage.num_groups}" if stage.kind == "calibrate" else "propagate"
        seconds[name] += time.perf_counter() - started[id(self)]
    return _end(self, stage)


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--" in args:
        args = args[args.index("--") + 1:]
    driver.CalibrationDriver.start, driver.CalibrationDriver.end = start, end
    try:
        cli(["fit", *args])
    finally:
        print(json.dumps({k: round(v, 2) for k, v in seconds.items()}, indent=1))
