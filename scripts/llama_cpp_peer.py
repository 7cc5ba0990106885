"""llama.cpp as a peer in latency benchmarks: batch-1 prefill and greedy-step decode of a GGUF file through
``llama-cpp-python``, timed like ``measure_latency`` (the same random prompt ids, best of ``--repeats``), printed
as one JSON line. It runs under whatever Python has ``llama_cpp`` installed (keep it out of this project's
environment: ``scripts/bench_e2e.py --llama-cpp-python /path/to/venv/bin/python`` runs this file there).

    /path/to/llama-venv/bin/python scripts/llama_cpp_peer.py ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --prompt-tokens 128 --decode-tokens 32 --threads 2

Prefill evaluates the prompt in one batch (logits of its last position only, as generation needs); each decode
step evaluates one token with the KV cache (llama.cpp's ``llama_decode``), without sampling: the next token is the
argmax of the returned logits, as in our greedy decode.

``--perplexity windows.npy`` instead scores token windows (int32 ``[n, seqlen]``, e.g. written by
``scripts/check_gguf_export.py``) by the project's protocol: each window evaluated alone from an empty cache, the
mean cross-entropy of its ``seqlen − 1`` shifted positions times ``seqlen``, summed, over ``n · seqlen``.

``--quantize out.gguf Q4_0`` writes llama.cpp's own quantization of the model (its ``llama-quantize``, no
importance matrix; the embedding and head as ``--embedding-type``), the baseline a GPTQ export competes with.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time


def measure(gguf: str, prompt_tokens: int, decode_tokens: int, threads: int, repeats: int, seed: int = 0) -> dict:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=prompt_tokens + decode_tokens + 8, n_batch=max(prompt_tokens, 8),
                          n_threads=threads, n_threads_batch=threads, verbose=False, logits_all=False)
    vocab = llm.n_vocab()

    def next_token() -> int:  # argmax of the last evaluated position's logits
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(vocab,))))

    ids = random.Random(seed).choices(range(vocab), k=prompt_tokens)

    def prefill() -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        return time.perf_counter() - start

    def decode() -> float:
        prefill()
        token = next_token()
        start = time.perf_counter()
        for _ in range(decode_tokens):
            llm.eval([token])
            token = next_token()
        return time.perf_counter() - start

    prefill(), decode()  # warm-up
    prefill_s = min(prefill() for _ in range(repeats))
    decode_s = min(decode() for _ in range(repeats))
    return {"prefill_tokens_per_s": prompt_tokens / prefill_s, "decode_ms_per_token": 1000 * decode_s / decode_tokens,
            "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, "threads": threads,
            "model_mib": os.path.getsize(gguf) / 2**20, "llama_cpp": llama_cpp.__version__}


def perplexity(gguf: str, windows_path: str, threads: int) -> dict:
    import llama_cpp
    import numpy as np

    windows = np.load(windows_path)
    n, seqlen = windows.shape
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=seqlen, n_batch=seqlen, n_threads=threads, n_threads_batch=threads,
                          verbose=False, logits_all=True)
    start, nll = time.perf_counter(), 0.0
    for window in windows:
        llm.reset()
        llm.eval([int(t) for t in window])
        losses = []
        for lo in range(0, seqlen - 1, 256):  # float64 a few rows at a time: all of them take ~0.8 GB at 49k words
            hi = min(lo + 256, seqlen - 1)
            logits = np.asarray(llm.scores[lo:hi], dtype=np.float64)
            top = logits.max(axis=1, keepdims=True)
            log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
            losses.append(log_z - logits[np.arange(hi - lo), window[lo + 1: hi + 1]])
        nll += float(np.concatenate(losses).mean()) * seqlen
    return {"perplexity": float(np.exp(nll / (n * seqlen))), "windows": int(n), "seqlen": int(seqlen),
            "seconds": time.perf_counter() - start, "threads": threads, "llama_cpp": llama_cpp.__version__}


def quantize(gguf: str, out: str, kind: str, embedding: str, threads: int) -> dict:
    """llama.cpp's own quantizer (``llama-quantize``, without an importance matrix) from ``gguf``'s weights to
    ``kind`` (a ``LLAMA_FTYPE_MOSTLY_*`` name: ``Q4_0``, ``Q4_K_M``, ...), the token embedding and output head as
    ``embedding`` (a GGML type name). Quantized source tensors are dequantized first (``allow_requantize``)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = threads
    params.allow_requantize = True
    params.token_embedding_type = params.output_tensor_type = getattr(llama_cpp, f"GGML_TYPE_{embedding}")
    start = time.perf_counter()
    if llama_cpp.llama_model_quantize(gguf.encode(), out.encode(), params) != 0:
        raise SystemExit(f"llama.cpp could not quantize {gguf} to {kind}")
    return {"path": out, "type": kind, "embedding": embedding, "bytes": os.path.getsize(out),
            "seconds": time.perf_counter() - start, "llama_cpp": llama_cpp.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--perplexity", metavar="WINDOWS_NPY", help="score these token windows instead of timing")
    parser.add_argument("--quantize", nargs=2, metavar=("OUT_GGUF", "TYPE"),
                        help="write llama.cpp's own TYPE quantization of the model instead of timing")
    parser.add_argument("--embedding-type", default="Q8_0", help="with --quantize: the token embedding's and head's type")
    args = parser.parse_args()
    if args.quantize:
        print(json.dumps(quantize(args.gguf, *args.quantize, args.embedding_type, args.threads)))
        return
    if args.perplexity:
        print(json.dumps(perplexity(args.gguf, args.perplexity, args.threads)))
        return
    print(json.dumps(measure(args.gguf, args.prompt_tokens, args.decode_tokens, args.threads, args.repeats)))


if __name__ == "__main__":
    main()
