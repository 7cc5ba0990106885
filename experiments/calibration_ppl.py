"""In-sample check: perplexity of saved quantized models on their own calibration windows.

If GPTQ beats RTN here but not on held-out text, the calibration set does not generalise; if it
loses here too, the per-layer objective is not adding up to a better model.

    python experiments/calibration_ppl.py fp32 runs/a/model runs/b/model --windows 16
"""

from __future__ import annotations

from _saved_models import parse_and_load, parser_for

from lightning_gptq.checkpoint import load_quantized
from lightning_gptq.data.evaluation import perplexity


def main() -> None:
    args, base, windows = parse_and_load(parser_for(__doc__, windows=16, allow_fp32=True))
    tokens = windows.reshape(1, -1)
    for name in args.models:
        model = base if name == "fp32" else load_quantized(name)[0]
        result = perplexity(model, tokens, seqlen=args.seqlen, dataset="calibration", progress=False)
        print(f"{name}: perplexity on the first {args.windows} of {args.nsamples} calibration windows {result.ppl:.4f}", flush=True)


if __name__ == "__main__":
    main()
