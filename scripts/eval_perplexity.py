"""Perplexity of a causal LM by the GPTQ paper's protocol, whole-model and/or block by block.

Example (the shared SmolLM2 and WikiText-2 copy):

    HF_HUB_OFFLINE=1 python scripts/eval_perplexity.py \\
        --model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --dataset wikitext2 --path ../shared/data/wikitext-2-raw/wiki.test.raw --both
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_gptq.data.evaluation import EVAL_DATASETS, eval_tokens, perplexity, perplexity_blockwise
from lightning_gptq.models.adapters import get_adapter
from lightning_gptq.models.loading import load_causal_lm


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="hub id, local folder, or .gguf file")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --model's folder")
    parser.add_argument("--dataset", default="wikitext2", choices=EVAL_DATASETS)
    parser.add_argument("--path", default=None, help="local copy of the evaluation text (see data/evaluation.py)")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=None, help="score only the first windows (partial)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default=None, help="device for the evaluation (default: where the model is)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--blockwise", action="store_true", help="only the block-by-block evaluator")
    which.add_argument("--both", action="store_true", help="whole-model and block-by-block evaluators")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    model, tokenizer = load_causal_lm(args.model, gguf_file=args.gguf_file, dtype=args.dtype)
    if args.device is not None and not args.blockwise:
        model.to(args.device)
    print(f"loaded {type(model).__name__} ({model.config.model_type}, {model.dtype}) in {time.perf_counter() - start:.1f} s",
          flush=True)

    start = time.perf_counter()
    tokens = eval_tokens(args.dataset, tokenizer, path=args.path, seqlen=args.seqlen)
    print(f"{args.dataset}: {tokens.shape[1]:,} tokens ({tokens.shape[1] // args.seqlen} windows of {args.seqlen}) "
          f"from {args.path or 'the hub'} in {time.perf_counter() - start:.1f} s", flush=True)

    common = dict(seqlen=args.seqlen, dataset=args.dataset, max_windows=args.max_windows)
    results = []
    torch.set_grad_enabled(False)
    if not args.blockwise:
        result = perplexity(model, tokens, **common)
        results.append(result)
        print(f"{result}\n  wall time whole-model: {result.seconds:.1f} s", flush=True)
    if args.blockwise or args.both:
        result = perplexity_blockwise(model, get_adapter(model), tokens, device=args.device, **common)
        results.append(result)
        print(f"{result}\n  wall time blockwise: {result.seconds:.1f} s", flush=True)
    if len(results) == 2:
        relative = abs(results[0].ppl - results[1].ppl) / results[0].ppl
        print(f"whole-model vs blockwise: relative difference {relative:.2e}", flush=True)


if __name__ == "__main__":
    main()
