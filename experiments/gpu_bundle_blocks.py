"""Which 12 of SmolLM2-135M's 30 blocks to ship in the GPU check's bundle (``scripts/make_gpu_bundle.py --keep``).

The bundle may carry at most 12 blocks (64 MiB travel to the GPU machine). The first 12 alone leave a model
whose WikiText-2 perplexity is about 5e10 (the final norm and head expect the later blocks' residual stream),
a regime where fp16 against fp32 or any rounding moves the score by far more than the check's 1% target
means. This scores the unquantized model with several 12-block selections on Brown text (which the check
neither calibrates nor evaluates on), so the choice is not made on what the check reports.

    python experiments/gpu_bundle_blocks.py [--windows 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lightning_gptq.data.evaluation import own_eval_tokens, perplexity
from lightning_gptq.models.loading import load_causal_lm

SHARED = Path(__file__).resolve().parents[2] / "shared"
SELECTIONS = {
    "first 12 (0-11)": list(range(12)),
    "0-5 + 24-29": [*range(6), *range(24, 30)],
    "0-8 + 27-29": [*range(9), *range(27, 30)],
    "0-9 + 28-29": [*range(10), 28, 29],
    "0-10 + 29": [*range(11), 29],
    "0-7 + 26-29": [*range(8), *range(26, 30)],
    "every 2.5": [0, 3, 5, 8, 10, 13, 15, 18, 20, 23, 25, 29],
    "0-3 + 22-29": [*range(4), *range(22, 30)],
    "0-2 + 21-29": [*range(3), *range(21, 30)],
    "0-1 + 20-29": [0, 1, *range(20, 30)],
    "0 + 19-29": [0, *range(19, 30)],
    "0-1 + 18-19 + 22-29": [0, 1, 18, 19, *range(22, 30)],
    "0-2 + 20-28": [0, 1, 2, *range(20, 29)],
    "0-2 + 4 + 22-29": [0, 1, 2, 4, *range(22, 30)],
    "0-2 + 12 + 22-29": [0, 1, 2, 12, *range(22, 30)],
    "0-2 + 16 + 22-29": [0, 1, 2, 16, *range(22, 30)],
    "0-2 + 19 + 22-29": [0, 1, 2, 19, *range(22, 30)],
}


def keep_blocks(model, keep: list[int]):
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--only", nargs="*", help="selections to score (default: all)")
    args = parser.parse_args()
    model, tokenizer = load_causal_lm(str(SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    tokens = own_eval_tokens(SHARED / "data" / "calibration" / "brown.txt", tokenizer)
    full = perplexity(model, tokens, max_windows=args.windows, progress=False).ppl
    print(f"| blocks kept | Brown perplexity, {args.windows} windows of 2048 |\n|---|---:|\n| all 30 | {full:.2f} |", flush=True)
    for name, keep in SELECTIONS.items():
        if args.only and name not in args.only:
            continue
        layers = keep_blocks(model, keep)
        ppl = perplexity(model, tokens, max_windows=args.windows, progress=False).ppl
        print(f"| {name} | {ppl:.4g} |", flush=True)
        model.model.layers = layers
        for i, layer in enumerate(layers):
            layer.self_attn.layer_idx = i
        model.config.num_hidden_layers = len(layers)


if __name__ == "__main__":
    main()
