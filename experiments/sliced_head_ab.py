"""`validate` with the LM head run a slice of positions at a time (as shipped) or on the whole window (``--whole``:
the window's ``[1, seqlen, vocab]`` logits, as before 2026-12-07); prints perplexity, seconds and peak RSS. Run
once per variant, one after the other (each process's peak is its own):

    python experiments/sliced_head_ab.py [--whole] --config configs/smollm2-135m.yaml --data.eval_max_windows=16 \\
        --model.latency=false --trainer.default_root_dir=<dir>
"""

from __future__ import annotations

import resource
import sys
import time

import torch

from lightning_gptq.cli import main as cli
from lightning_gptq.data.evaluation import window_nll, with_bos
from lightning_gptq.lightning import scoring


def whole_window_nll(model, input_ids, *, bos_token_id=None):
    with torch.no_grad():
        logits = model(input_ids=with_bos(input_ids, bos_token_id), use_cache=False).logits
    return window_nll(logits, input_ids, bos=bos_token_id is not None)


if __name__ == "__main__":
    args = sys.argv[1:]
    whole = "--whole" in args
    if whole:
        args.remove("--whole")
        scoring.model_window_nll = whole_window_nll
    start = time.perf_counter()
    run = cli(["validate", *args])
    seconds = time.perf_counter() - start
    for name, row in run.model.results["val"].items():
        print(f"{'whole' if whole else 'sliced'}: {name} ppl {row['ppl']!r} over {row['windows']} windows; "
              f"validate {seconds:.1f} s; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
