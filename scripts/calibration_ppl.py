"""In-sample check: perplexity of saved quantized models on their own calibration windows.

If GPTQ beats RTN here but not on held-out text, the calibration set does not generalise; if it
loses here too, the per-layer objective is not adding up to a better model.

    python scripts/calibration_ppl.py fp32 runs/a/model runs/b/model --windows 16
"""

from __future__ import annotations

import argparse

from lightning_gptq.checkpoint import is_quantized_checkpoint, load_quantized
from lightning_gptq.data.calibration import calibration_windows
from lightning_gptq.data.evaluation import perplexity
from lightning_gptq.models import load_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="'fp32' (the base model) or folders saved by fit")
    parser.add_argument("--base", default="../shared/models")
    parser.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--calibration", default="../shared/data/calibration/wikipedia-vital-leads.txt")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--windows", type=int, default=16, help="score the first N calibration windows")
    args = parser.parse_args()
    if not 1 <= args.windows <= args.nsamples:
        parser.error(f"--windows must be between 1 and --nsamples ({args.nsamples}), got {args.windows}")
    missing = [m for m in args.models if m != "fp32" and not is_quantized_checkpoint(m)]
    if missing:
        parser.error(f"not a folder saved by fit (no manifest): {', '.join(missing)}")
    base, tokenizer = load_causal_lm(args.base, gguf_file=args.gguf_file, dtype="float32")
    windows = calibration_windows(args.calibration, tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    tokens = windows[: args.windows].reshape(1, -1)
    for name in args.models:
        model = base if name == "fp32" else load_quantized(name)[0]
        result = perplexity(model, tokens, seqlen=args.seqlen, dataset="calibration", progress=False)
        print(f"{name}: perplexity on the first {args.windows} of {args.nsamples} calibration windows {result.ppl:.4f}", flush=True)


if __name__ == "__main__":
    main()
