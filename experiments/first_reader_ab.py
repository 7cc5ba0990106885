"""A true-sequential `fit` with its passes ending at the first reader of a shared input (as shipped) or running on
to the last reader (``--no-share``: the driver's ``ctx.same_input`` kept empty), seconds per pass. Everything
else goes to `python -m lightning_gptq fit`; run it once per variant, one after the other:

    python experiments/first_reader_ab.py --config configs/smollm2-135m.yaml --data.nsamples=16 \\
        --hessian.sink_probe_windows=2 --model.eval_after=false --model.latency=false --model.save_quantized=false \\
        --model.true_sequential=true [--no-share] --trainer.default_root_dir=<dir>

Compare the two runs' ``summary.json`` layer digests: the Hessians, codes and scales must be equal.
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
_start, _end, _stop = (driver.CalibrationDriver.start, driver.CalibrationDriver.end,
                       driver.CalibrationDriver._stop_after_last_linear)


class Ignored(dict):
    """A ``same_input`` that forgets what it is told: every pass runs to its group's last reader."""

    def __setitem__(self, key, value):
        pass


def start(self, stage):
    started[id(self)] = time.perf_counter()
    return _start(self, stage)


def end(self, stage):
    if stage.kind in ("calibrate", "propagate"):  # the pass alone, before end() solves
        name = f"group {stage.group + 1}/{stage.num_groups}" if stage.kind == "calibrate" else "propagate"
        seconds[name] += time.perf_counter() - started[id(self)]
    return _end(self, stage)


def no_share(self, block):
    self._ctx.same_input = Ignored()
    return _stop(self, block)


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--no-share" in args:
        args.remove("--no-share")
        driver.CalibrationDriver._stop_after_last_linear = no_share
    driver.CalibrationDriver.start, driver.CalibrationDriver.end = start, end
    began = time.perf_counter()
    try:
        cli(["fit", *args])
    finally:
        print("passes (s):", json.dumps({k: round(v, 2) for k, v in seconds.items()}),
              f"fit {time.perf_counter() - began:.1f} s")
