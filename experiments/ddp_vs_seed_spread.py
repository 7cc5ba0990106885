"""Is a two-process (gptq_ddp) fit as good as a single-process one? Compared with the spread of
single-process fits over calibration seeds, on SmolLM2 with the shipped config.

Runs ``fit`` for calibration seeds 0..S-1 in one process and for seed 0 in two processes, each scoring
the first ``--eval-windows`` WikiText-2 windows; prints each perplexity, the seed spread, and how many
packed words of each block differ between the single- and two-process checkpoints of seed 0.

    python experiments/ddp_vs_seed_spread.py --nsamples 16 --seqlen 512 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"


def fit(root: Path, name: str, seed: int, args, ddp: bool) -> float:
    out = root / name
    command = [sys.executable, "-m", "lightning_gptq", "fit", f"--config={args.config}",
               f"--model.model={args.model}", f"--data.calibration={args.calibration}",
               f"--data.nsamples={args.nsamples}", f"--data.seqlen={args.seqlen}", f"--data.seed={seed}",
               f"--data.eval_paths={{wikitext2: {args.wikitext}}}", f"--data.eval_max_windows={args.eval_windows}",
               "--model.latency=false", f"--model.output_dir={out}", f"--trainer.default_root_dir={root / (name + '-root')}",
               "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--resume.every_n_blocks=0"]
    if ddp:
        command += ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=gptq_ddp"]
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())["results"]["after"]["wikitext2"]["ppl"]


def differing_words(a: Path, b: Path) -> dict[int, float]:
    """Per block: the share of packed qweight words that differ between two checkpoints."""
    from safetensors.torch import load_file

    x, y = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    differ, total = defaultdict(int), defaultdict(int)
    for name in x:
        if name.endswith(".qweight"):
            block = int(name.split(".layers.")[1].split(".")[0])
            differ[block] += int((x[name] != y[name]).sum())
            total[block] += x[name].numel()
    print(f"tensors bit-equal between the two checkpoints: {sum(torch_equal(x[n], y[n]) for n in x)} of {len(x)}")
    return {b: differ[b] / total[b] for b in sorted(total)}


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2-135m.yaml")
    parser.add_argument("--model", default=str(SHARED / "models"))
    parser.add_argument("--calibration", default=str(SHARED / "data" / "calibration" / "wikipedia-vital-leads.txt"))
    parser.add_argument("--wikitext", default=str(SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"))
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3, help="single-process calibration seeds 0..S-1")
    parser.add_argument("--ddp-seeds", type=int, default=1, help="two-process calibration seeds 0..S-1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ddp-spread-") as scratch:
        root = Path(scratch)
        single = {seed: fit(root, f"single-{seed}", seed, args, ddp=False) for seed in range(args.seeds)}
        for seed, ppl in single.items():
            print(f"single process, seed {seed}: WikiText-2 ppl {ppl:.4f}", flush=True)
        two = {seed: fit(root, f"ddp-{seed}", seed, args, ddp=True) for seed in range(args.ddp_seeds)}
        for seed, ppl in two.items():
            print(f"two processes,  seed {seed}: WikiText-2 ppl {ppl:.4f}", flush=True)
        if len(single) >= 2:
            values = list(single.values())
            low, high = min(values), max(values)
            print(f"single-process seed spread {low:.4f}..{high:.4f} (stdev {statistics.stdev(values):.4f})")
        if len(two) >= 2:
            print(f"two-process seed spread {min(two.values()):.4f}..{max(two.values()):.4f} "
                  f"(stdev {statistics.stdev(two.values()):.4f})")
        if 0 in single and 0 in two:
            print(f"seed 0: |two processes - single| = {abs(two[0] - single[0]):.4f}")
            differ = differing_words(root / "single-0", root / "ddp-0")
            print("share of qweight words differing, single vs two processes, per block: "
                  + " ".join(f"{b}:{s:.3f}" for b, s in differ.items()))

if __name__ == "__main__":
    main()
