"""Where the 4-bit model's remaining loss sits: put full-precision layers back, one kind at a time.

Quantizes SmolLM2 as the config does (4-bit g128 asym act-order, MSE grid, measured sink rule on
q/k/v, Wikipedia + Brown 1:1 from the calibration part of each text, ``--nsamples`` windows, seed 0),
then scores the choosing texts with the quantized model and with each kind of linear (q, k, v, o,
gate, up, down), or a range of blocks, restored to its full-precision weights. The share of the
loss a kind carries is ``(ppl_all − ppl_restored) / (ppl_all − ppl_fp32)``; the shares need not
add to one (the errors interact). Run from the repository root after
``python scripts/quality_table.py --eval choose --quick ...`` has written the held-out split::

    python experiments/restore_study.py --nsamples 32 --windows 16
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from lightning_gptq import QuantConfig
from lightning_gptq.api import quantize
from lightning_gptq.data.calibration import mixed_calibration_windows
from lightning_gptq.data.evaluation import own_eval_tokens, perplexity
from lightning_gptq.models import load_causal_lm

SHARED = Path("../shared")
HELD = Path("runs/quality_table/held-out")
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def restore(quantized: torch.nn.Module, original: torch.nn.Module, keep) -> int:
    """Swap ``original``'s linears back into ``quantized`` where ``keep(block, kind)``; returns how many."""
    swapped = 0
    for b, (qb, ob) in enumerate(zip(quantized.model.layers, original.model.layers)):
        for name, module in ob.named_modules():
            kind = name.rsplit(".", 1)[-1]
            if kind in KINDS and keep(b, kind):
                parent, _, leaf = name.rpartition(".")
                setattr(qb.get_submodule(parent), leaf, module)
                swapped += 1
    return swapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model_path = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fp32, tokenizer = load_causal_lm(str(model_path), dtype="float32")
    fp32.eval()
    texts = {
        "ptb-valid": SHARED / "data" / "ptb" / "ptb.valid.txt",
        "wikipedia-held-out": HELD / "wikipedia-held-out.txt",
        "brown-held-out": HELD / "brown-held-out.txt",
    }
    tokens = {name: own_eval_tokens(path, tokenizer) for name, path in texts.items()}

    def score(model) -> dict[str, float]:
        return {n: perplexity(model, t, max_windows=args.windows, progress=False).ppl for n, t in tokens.items()}

    windows = mixed_calibration_windows(
        {str(HELD / "wikipedia-calibration.txt"): 1, str(HELD / "brown-calibration.txt"): 1},
        tokenizer, nsamples=args.nsamples, seqlen=2048, seed=args.seed)
    config = QuantConfig(bits=4, group_size=128, sym=False, act_order=True, mse=True)
    start = time.perf_counter()
    quantized = quantize(copy.deepcopy(fp32), windows, config, tokenizer=tokenizer, sink_weight="attention",
                         sink_layers="attention", sink_probe_windows=16, backend="torch")
    print(f"quantized in {time.perf_counter() - start:.0f} s", flush=True)

    blocks = len(fp32.model.layers)
    variants = [("fp32 (every layer restored)", None), ("none restored (the 4-bit model)", lambda b, k: False)]
    variants += [(f"{k} restored", lambda b, k, kind=k: k == kind) for k in KINDS]
    variants += [("q, k, v restored", lambda b, k: k in ("q_proj", "k_proj", "v_proj"))]
    variants += [("gate, up, down restored", lambda b, k: k in ("gate_proj", "up_proj", "down_proj"))]
    thirds = [(0, blocks // 3), (blocks // 3, 2 * blocks // 3), (2 * blocks // 3, blocks)]
    variants += [(f"blocks {lo}-{hi - 1} restored", lambda b, k, lo=lo, hi=hi: lo <= b < hi) for lo, hi in thirds]

    rows = []
    for label, keep in variants:
        if keep is None:
            result = score(fp32)
        else:
            model = copy.deepcopy(quantized)
            n = restore(model, copy.deepcopy(fp32), keep)
            result = score(model)
            label += f" ({n} layers)" if n else ""
        rows.append((label, result))
        print(label, {k: round(v, 3) for k, v in result.items()}, flush=True)

    fp, full = rows[0][1], rows[1][1]
    print(f"\n4-bit g128, {args.nsamples} x 2048 calibration windows (seed {args.seed}), first {args.windows} windows; "
          "in brackets the share of the 4-bit model's loss (over fp32) that restoring removes")
    print("| variant | " + " | ".join(texts) + " |\n|---|" + "---:|" * len(texts))
    for label, result in rows:
        cells = [f"{result[n]:.3f}" + ("" if label.startswith(("fp32", "none")) else
                                      f" ({(full[n] - result[n]) / (full[n] - fp[n]):.0%})") for n in texts]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
