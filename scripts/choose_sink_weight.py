"""Choose ``hessian.sink_weight`` on text that no reported number uses: PTB *valid*.

The reported evaluations are WikiText-2 test and PTB test (``ptb-new``); this fits SmolLM2 once per
candidate weight (small calibration: ``--nsamples`` × ``--seqlen`` windows of the calibration text)
and scores the first ``--windows`` windows of ``../shared/data/ptb/ptb.valid.txt``. It prints the
table and the weight with the lowest perplexity there; report the test sets with that weight.

    python scripts/choose_sink_weight.py --weights 1 4 16 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=float, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()

    from lightning_gptq.cli import main as cli

    root = Path(tempfile.mkdtemp(prefix="sink-weight-"))
    common = [
        "--config=configs/smollm2-135m.yaml", f"--model.model={SHARED / 'models'}",
        f"--data.calibration={SHARED / 'data' / 'calibration' / 'wikipedia-vital-leads.txt'}",
        f"--data.nsamples={args.nsamples}", f"--data.seqlen={args.seqlen}", "--data.eval_datasets=[ptb]",
        f"--data.eval_paths={{ptb: {SHARED / 'data' / 'ptb' / 'ptb.valid.txt'}}}", f"--data.eval_max_windows={args.windows}",
        "--model.latency=false", "--model.save_quantized=false", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}", f"--gptq.quant.bits={args.bits}",
    ]
    results = {}
    for weight in args.weights:
        start = time.perf_counter()
        run = cli(["fit", *common, f"--hessian.sink_weight={weight}", f"--model.output_dir={root / str(weight)}"])
        results[weight] = run.model.results["after"]["ptb"]["ppl"]
        print(f"sink_weight {weight:g}: PTB valid {results[weight]:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"\nSmolLM2 {args.bits}-bit g128 asym act-order, calibration {args.nsamples}x{args.seqlen} windows of "
          f"wikipedia-vital-leads.txt (seed 0), PTB valid first {args.windows} windows of 2048:")
    print("| sink_weight | PTB valid |\n|---:|---:|")
    for weight, ppl in results.items():
        print(f"| {weight:g} | {ppl:.4f} |")
    print(f"lowest: sink_weight {min(results, key=results.get):g}")


if __name__ == "__main__":
    main()
