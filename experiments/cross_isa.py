"""Why does the same `fit` give different codes on different CPUs? The same fit, on this one machine,
under settings that make PyTorch, MKL and oneDNN take other code paths, as another CPU would: the
instruction set capped at AVX2 (``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``,
``ONEDNN_MAX_CPU_ISA``) and one thread instead of two. Prints, per variant, the perplexity and the
share of packed words of each block that differ from the first variant's checkpoint.

    python experiments/cross_isa.py --nsamples 16 --seqlen 512 [--calibration-dtype float64]
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

from ddp_vs_seed_spread import differing_words  # per block: the share of packed words that differ (same folder)

SHARED = Path(__file__).resolve().parents[2] / "shared"

VARIANTS = {
    "default": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "1-thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
}


def fit(out: Path, args, env: dict) -> tuple[float, float]:
    command = [sys.executable, "-m", "lightning_gptq", "fit", f"--config={args.config}",
               f"--data.nsamples={args.nsamples}", f"--data.seqlen={args.seqlen}",
               f"--data.eval_max_windows={args.eval_windows}", "--model.latency=false",
               f"--model.output_dir={out}", f"--trainer.default_root_dir={out}-root", "--trainer.logger=false",
               "--trainer.enable_progress_bar=false", "--resume.every_n_blocks=0"]
    if args.calibration_dtype:
        command.append(f"--model.calibration_dtype={args.calibration_dtype}")
    start = time.perf_counter()
    with open(f"{out}.log", "w") as log:
        subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, stdout=log, stderr=log)
    summary = json.loads((out / "summary.json").read_text())
    return summary["results"]["after"]["wikitext2"]["ppl"], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smollm2-135m.yaml")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--calibration-dtype", default=None, help="GPTQModule.calibration_dtype (e.g. float64)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--root", default=None, help="keep the checkpoints here (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="cross-isa-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"calibration_dtype {args.calibration_dtype or 'the model’s (fp32)'}; {args.nsamples} x {args.seqlen} "
          f"windows; checkpoints in {root}")
    first = None
    for name in args.variants:
        out = root / name
        ppl, seconds = fit(out, args, VARIANTS[name])
        line = f"{name:9s} ppl {ppl:.6f} ({seconds:.0f} s)"
        if first is None:
            first = out
        else:
            shares = differing_words(first, out)
            changed = [b for b, s in shares.items() if s > 0]
            line += (f"; blocks with differing words: {len(changed)} of {len(shares)}"
                     + (f", first {changed[0]}; share per block: "
                        + " ".join(f"{shares[b]:.3f}" for b in shares) if changed else " (bit-equal checkpoints)"))
        print(line, flush=True)


if __name__ == "__main__":
    main()
