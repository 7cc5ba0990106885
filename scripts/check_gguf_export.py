"""A quantized folder exported to GGUF, scored three ways on the same WikiText-2 windows: our folder, the GGUF read
back by transformers (dense fp32), and llama.cpp (``llama-cpp-python`` in its own environment), with the template
(the model's source GGUF) scored by both as the unquantized reference.

    python scripts/check_gguf_export.py runs/smollm2-135m/lightning_logs/version_0/quantized/model \\
        --llama-cpp-python ../llama-venv/bin/python --windows 16

Prints a markdown table (perplexity, ratio to our folder's, seconds) and the export's report. The perplexities use
the project's protocol (``lightning_gptq.data.perplexity``: each window alone, ``seqlen − 1`` shifted positions);
llama.cpp's side computes the same from its logits (``scripts/llama_cpp_peer.py --perplexity``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lightning_gptq.checkpoint import load_quantized
from lightning_gptq.checkpoint.gguf_export import default_template, save_gguf
from lightning_gptq.data import eval_tokens, perplexity
from lightning_gptq.models import load_causal_lm

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def llama_cpp(python: str, gguf: Path, windows: Path, threads: int) -> dict:
    out = subprocess.run([python, str(ROOT / "scripts" / "llama_cpp_peer.py"), str(gguf), "--perplexity", str(windows),
                          "--threads", str(threads)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ours(model, tokens: torch.Tensor, windows: int, seqlen: int) -> dict:
    result = perplexity(model, tokens, seqlen=seqlen, max_windows=windows, dataset="wikitext2")
    return {"perplexity": result.ppl, "seconds": result.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--template", help="the source GGUF (default: the one the folder records)")
    parser.add_argument("--llama-cpp-python", help="a Python with llama_cpp installed (omit: no llama.cpp rows)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-path", default=str(WIKITEXT))
    parser.add_argument("--keep", help="write the exported GGUF here (default: a temporary file)")
    args = parser.parse_args()
    template = Path(args.template or default_template(args.folder) or sys.exit("no template: pass --template"))
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep or Path(tmp) / "export.gguf")
        model, tokenizer = load_quantized(args.folder)
        start = time.perf_counter()
        report = save_gguf(model, out, template)
        export_s = time.perf_counter() - start
        tokens = eval_tokens("wikitext2", tokenizer, path=args.eval_path, seqlen=args.seqlen)
        if tokens.shape[1] < args.windows * args.seqlen:
            sys.exit(f"{args.eval_path} has {tokens.shape[1]} tokens: fewer than {args.windows} windows of {args.seqlen}")
        windows = tokens[0, : args.windows * args.seqlen].reshape(args.windows, args.seqlen)
        npy = Path(tmp) / "windows.npy"
        np.save(npy, windows.numpy().astype(np.int32))

        rows = [("our folder (GPTQ layout, `auto` kernels)", ours(model, tokens, args.windows, args.seqlen))]
        del model
        back, _ = load_causal_lm(str(out))
        rows.append(("the exported GGUF, read by transformers (dense fp32)", ours(back, tokens, args.windows, args.seqlen)))
        del back
        if args.llama_cpp_python:
            rows.append(("the exported GGUF in llama.cpp", llama_cpp(args.llama_cpp_python, out, npy, args.threads)))
        source, _ = load_causal_lm(str(template))
        rows.append((f"template `{template.name}`, transformers (dense fp32)", ours(source, tokens, args.windows,
                                                                                  args.seqlen)))
        del source
        if args.llama_cpp_python:
            rows.append((f"template `{template.name}` in llama.cpp", llama_cpp(args.llama_cpp_python, template, npy,
                                                                              args.threads)))

    base = rows[0][1]["perplexity"]
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(report.types.items()))
    print(f"\nexport: {kinds} layers, {report.copied} tensors copied, {len(report.rewritten)} rewritten as F32, "
          f"{report.bytes / 2**20:.1f} MiB in {export_s:.1f} s; read back within {report.fp16_error:.3g} grid steps")
    print(f"WikiText-2 test, first {args.windows} windows of {args.seqlen} tokens, {args.threads} threads\n")
    print("| model | perplexity | / our folder | seconds |\n|---|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['perplexity']:.4f} | {r['perplexity'] / base:.4f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
