"""A quantized folder exported to GGUF, scored three ways on the same WikiText-2 windows: our folder, the GGUF read
back by transformers (dense fp32), and llama.cpp (``llama-cpp-python`` in its own environment), with the template
(the model's source GGUF) scored by both as the unquantized reference.

    python scripts/check_gguf_export.py runs/smollm2-135m/lightning_logs/version_0/quantized/model \\
        --llama-cpp-python ../llama-venv/bin/python --windows 16

Prints a markdown table (file size, perplexity, ratio to our folder's, seconds) and the export's report.
``--llama-quantize Q4_0`` adds llama.cpp's own quantization of the template to that type (its ``llama-quantize``,
without an importance matrix), which is what a GPTQ export of the same bytes competes with; ``--llama-tools
<folder with llama-imatrix and llama-quantize>`` adds the same types quantized with llama.cpp's importance matrix,
computed on the fit's own calibration windows (llama.cpp's strongest answer at those bytes). The perplexities use
the project's protocol (``lightning_gptq.data.perplexity``: each window alone, ``seqlen − 1`` shifted positions);
llama.cpp's side computes the same from its logits (``scripts/llama_cpp_peer.py --perplexity``).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from lightning_gptq.checkpoint import load_quantized
from lightning_gptq.checkpoint.gguf_export import default_template, save_gguf
from lightning_gptq.data import eval_tokens, mixed_calibration_windows, perplexity
from lightning_gptq.models import load_causal_lm

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def run(command: list[str]) -> subprocess.CompletedProcess:
    """``command`` run to the end, its output captured; on failure, exit with the end of its stderr."""
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{Path(command[0]).name} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return out


def peer(python: str, gguf: Path, *args: str, threads: int) -> dict:
    """``scripts/llama_cpp_peer.py`` in the llama.cpp Python: its JSON line."""
    out = run([python, str(ROOT / "scripts" / "llama_cpp_peer.py"), str(gguf), *args, "--threads", str(threads)])
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_cpp(python: str, gguf: Path, windows: Path, threads: int) -> dict:
    return peer(python, gguf, "--perplexity", str(windows), threads=threads) | {"bytes": gguf.stat().st_size}


def ours(model, tokens: torch.Tensor, windows: int, seqlen: int) -> dict:
    result = perplexity(model, tokens, seqlen=seqlen, max_windows=windows, dataset="wikitext2")
    return {"perplexity": result.ppl, "seconds": result.seconds}


def calibration_text(folder: str, tokenizer, out: Path) -> tuple[Path, int, int]:
    """The fit's own calibration windows (``summary.json`` beside the folder), decoded to text for ``llama-imatrix``:
    ``(file, windows, seqlen)``."""
    summary = Path(folder).parent / "summary.json"
    try:
        calib = json.loads(summary.read_text())["calibration"]
    except (OSError, ValueError, KeyError) as err:
        sys.exit(f"--llama-tools needs the fit's {summary} (its calibration windows feed llama-imatrix): {err}")
    source = calib["source"] if isinstance(calib["source"], dict) else {calib["source"]: 1}
    windows = mixed_calibration_windows(source, tokenizer, nsamples=calib["nsamples"], seqlen=calib["seqlen"],
                                        seed=calib["seed"])
    out.write_text("\n".join(tokenizer.decode(w) for w in windows))
    return out, windows.shape[0], windows.shape[1]


def importance_matrix(tools: Path, template: Path, text: Path, chunks: int, ctx: int, threads: int,
                      out: Path) -> tuple[Path, int]:
    """llama.cpp's importance matrix (``llama-imatrix``: per input column, the mean square activation) of the template
    over ``text``, and the number of ``ctx``-token chunks it says it computed over."""
    command = [str(tools / "llama-imatrix"), "-m", str(template), "-f", str(text), "-o", str(out), "-c", str(ctx),
               "--chunks", str(chunks), "-t", str(threads)]
    done = run(command)
    said = re.search(r"computing over (\d+) chunks", done.stdout + done.stderr)
    return out, int(said.group(1)) if said else -1


def llama_quantize(tools: Path, template: Path, out: Path, kind: str, embedding: str, imatrix: Path, threads: int):
    run([str(tools / "llama-quantize"), "--allow-requantize", "--imatrix", str(imatrix), "--token-embedding-type",
         embedding, "--output-tensor-type", embedding, str(template), str(out), kind, str(threads)])


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
    parser.add_argument("--llama-quantize", nargs="+", default=[], metavar="TYPE",
                        help="also score llama.cpp's own quantization of the template to each TYPE (Q4_0, Q4_K_M, ...; "
                             "no importance matrix; embedding as in the template), the baseline the export competes with")
    parser.add_argument("--llama-tools", type=Path, help="a folder with llama.cpp's llama-imatrix and llama-quantize: "
                        "each --llama-quantize type is also written with an importance matrix of the fit's own "
                        "calibration windows (read from summary.json beside the folder)")
    args = parser.parse_args()
    if args.llama_quantize and not args.llama_cpp_python:
        parser.error("--llama-quantize needs --llama-cpp-python")
    if args.llama_tools and not args.llama_quantize:
        parser.error("--llama-tools needs --llama-quantize")
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
        embedding = next((t.tensor_type.name for t in gguf.GGUFReader(template).tensors if t.name == "token_embd.weight"),
                         "Q8_0")
        imatrix = None
        if args.llama_tools:
            text, chunks, ctx = calibration_text(args.folder, tokenizer, Path(tmp) / "calibration.txt")
            start = time.perf_counter()
            imatrix, used = importance_matrix(args.llama_tools, template, text, chunks, ctx, args.threads,
                                              Path(tmp) / "imatrix.gguf")
            print(f"llama-imatrix: over {used} chunks of {ctx} tokens (asked: {chunks}, the fit's calibration windows "
                  f"as text) in {time.perf_counter() - start:.0f} s")
        for kind in args.llama_quantize:
            theirs = Path(tmp) / f"llama-{kind}.gguf"
            peer(args.llama_cpp_python, template, "--quantize", str(theirs), kind, "--embedding-type", embedding,
                 threads=args.threads)
            rows.append((f"llama.cpp's own `{kind}` of the template ({embedding} embedding), in llama.cpp",
                         llama_cpp(args.llama_cpp_python, theirs, npy, args.threads)))
            if imatrix is not None:
                llama_quantize(args.llama_tools, template, theirs, kind, embedding, imatrix, args.threads)
                rows.append((f"llama.cpp's own `{kind}` with its importance matrix, in llama.cpp",
                             llama_cpp(args.llama_cpp_python, theirs, npy, args.threads)))
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
    print("| model | file MiB | perplexity | / our folder | seconds |\n|---|---:|---:|---:|---:|")
    for name, r in rows:
        size = f"{r['bytes'] / 2**20:.1f}" if "bytes" in r else "–"
        print(f"| {name} | {size} | {r['perplexity']:.4f} | {r['perplexity'] / base:.4f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
