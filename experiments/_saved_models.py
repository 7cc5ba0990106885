"""Shared command line of the scripts that examine saved models on their calibration windows."""

from __future__ import annotations

import argparse

from lightning_gptq.checkpoint import is_quantized_checkpoint
from lightning_gptq.data.calibration import calibration_windows
from lightning_gptq.models import load_causal_lm


def parser_for(doc: str, windows: int, allow_fp32: bool) -> argparse.ArgumentParser:
    """Arguments: saved model folders, the base model, and which calibration windows to use."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("models", nargs="+", help=("'fp32' (the base model) or " if allow_fp32 else "") + "folders saved by fit")
    parser.add_argument("--base", default="../shared/models")
    parser.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--calibration", default="../shared/data/calibration/wikipedia-vital-leads.txt")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--windows", type=int, default=windows, help="use the first N calibration windows")
    parser.set_defaults(allow_fp32=allow_fp32)
    return parser


def parse_and_load(parser: argparse.ArgumentParser):
    """Check the arguments before any loading, then return ``(args, base model, windows [N, seqlen])``."""
    args = parser.parse_args()
    if not 1 <= args.windows <= args.nsamples:
        parser.error(f"--windows must be between 1 and --nsamples ({args.nsamples}), got {args.windows}")
    missing = [m for m in args.models if not (args.allow_fp32 and m == "fp32") and not is_quantized_checkpoint(m)]
    if missing:
        parser.error(f"not a folder saved by fit (no manifest): {', '.join(missing)}")
    base, tokenizer = load_causal_lm(args.base, gguf_file=args.gguf_file, dtype="float32")
    windows = calibration_windows(args.calibration, tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    return args, base, windows[: args.windows]
