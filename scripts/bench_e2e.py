"""End to end: a quantized model folder against its fp32 base, per quantized-linear backend.

Measures what ``validate`` measures (``measure_latency``: batch-1 prefill throughput and greedy
decode with a KV cache), the bytes of the model's tensors, and optionally perplexity on the first
WikiText-2 windows (paper protocol), for the fp32 base and for the quantized model loaded with each
backend, all in one run so the ratios compare like with like on this machine.

    HF_HUB_OFFLINE=1 python scripts/bench_e2e.py runs/smollm2-135m/lightning_logs/version_0/quantized/model \\
        --backends auto torch cpu-int4 cpu-packed --ppl-windows 16
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from lightning_gptq.checkpoint import is_quantized_checkpoint, load_quantized
from lightning_gptq.data.evaluation import eval_tokens, perplexity
from lightning_gptq.models import load_causal_lm
from lightning_gptq.models.latency import measure_latency
from lightning_gptq.nn import GemvHead, QuantLinear, exact_kernels, speed_up_head


class _Free(torch.nn.Module):
    """Stands in for a linear layer and costs (almost) nothing: zeros of the right shape."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def with_free_block_linears(model):
    from lightning_gptq.models import get_adapter
    from lightning_gptq.nn import replace_submodule

    adapter = get_adapter(model)
    for block in adapter.blocks(model):
        for name, layer in list(adapter.linear_layers(block).items()):
            replace_submodule(block, name, _Free(layer.out_features))
    return model


@contextlib.contextmanager
def decode_kernels(model):
    """Every quantized layer computes every input with the kernel it uses for one row (the decode path),
    so that path's rounding shows in a perplexity (which otherwise runs the many-row kernels)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    saved = [(layer.dispatch, layer.exact_dispatch) for layer in layers]
    for layer in layers:
        layer.set_dispatch([(1, layer.kernel_for(1))], layer.exact_dispatch)
    try:
        yield
    finally:
        for layer, (dispatch, exact) in zip(layers, saved):
            layer.set_dispatch(dispatch, exact)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("quantized", help="a folder saved by fit")
    parser.add_argument("--base", default="../shared/models")
    parser.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--backends", nargs="+", default=["auto", "torch"])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ppl-windows", type=int, default=0, help="also score the first N WikiText-2 windows (0: skip)")
    parser.add_argument("--wikitext", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    parser.add_argument("--floor", action="store_true",
                        help="also time the fp32 model with its block linears replaced by zero-cost stubs: the "
                             "decode time no kernel can go below (framework, attention, norms, LM head)")
    args = parser.parse_args()
    if not is_quantized_checkpoint(args.quantized):
        parser.error(f"not a folder saved by fit: {args.quantized}")

    base, tokenizer = load_causal_lm(args.base, gguf_file=args.gguf_file, dtype="float32")
    tokens = eval_tokens("wikitext2", tokenizer, path=args.wikitext) if args.ppl_windows else None
    torch.set_grad_enabled(False)

    def measure(model):
        lat = measure_latency(model, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                              repeats=args.repeats)
        if tokens is None:
            return lat, None, None, None
        score = lambda: perplexity(model, tokens, dataset="wikitext2", max_windows=args.ppl_windows, progress=False).ppl
        fast = score()
        with exact_kernels():
            exact = score()
        with decode_kernels(model):
            decode = score() if any(isinstance(m, QuantLinear) for m in model.modules()) else fast
        return lat, fast, exact, decode

    ppl_text = lambda r: f"; ppl {r[3]:.4f} (exact kernels {r[4]:.4f}, one-row kernels {r[5]:.4f})" if r[3] else ""
    rows = [("fp32", "-", *measure(base))]
    print(f"fp32: {rows[0][2]}{ppl_text(rows[0])}", flush=True)
    # like for like: the fp32 model with the LM head that `auto` gives quantized models (speed_up_head)
    decision = speed_up_head(base)
    print(decision, flush=True)
    if isinstance(base.get_output_embeddings(), GemvHead):
        rows.append(("fp32, GEMV head", "-", *measure(base)))
        print(f"fp32, GEMV head: {rows[-1][2]}{ppl_text(rows[-1])}", flush=True)
        base.get_output_embeddings().__class__ = torch.nn.Linear
    for backend in args.backends:
        start = time.perf_counter()
        model, _ = load_quantized(args.quantized, backend=backend)
        load_s = time.perf_counter() - start
        used = sorted({m.backend for m in model.modules() if isinstance(m, QuantLinear)})
        rows.append((backend, ",".join(used), *measure(model)))
        print(f"{backend} (layers on {','.join(used)}, loaded in {load_s:.1f} s): {rows[-1][2]}{ppl_text(rows[-1])}",
              flush=True)
        del model
    if args.floor:
        floor = measure_latency(with_free_block_linears(base), prompt_tokens=args.prompt_tokens,
                                decode_tokens=args.decode_tokens, repeats=args.repeats)
        print(f"floor (block linears cost nothing): {floor}", flush=True)
        base, _ = load_causal_lm(args.base, gguf_file=args.gguf_file, dtype="float32")
    # fp32 once more at the end: the ratios use its best run, so a noisy first run cannot flatter us
    again = measure_latency(base, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens, repeats=args.repeats)
    print(f"fp32 again: {again}", flush=True)
    fp32 = rows[0][2]
    decode_ms = min(fp32.decode_ms_per_token, again.decode_ms_per_token)
    prefill = max(fp32.prefill_tokens_per_s, again.prefill_tokens_per_s)

    reference = next((r[4] for r in rows if r[0] == "torch"), None)
    rel = lambda p: f"{(p - reference) / reference:+.1e}" if p is not None and reference else "–"
    print()
    print(f"| model | backend used | decode ms/token | decode × fp32 | prefill tokens/s | prefill × fp32 | "
          f"model MiB | × fp32 | ppl, first {args.ppl_windows} windows (vs torch) | same, exact kernels (vs torch) | "
          f"same, the one-row (decode) kernel for every input (vs torch) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, used, lat, fast, exact, decode in rows:
        cells = [f"{p:.4f} ({rel(p)})" if p is not None else "–" for p in (fast, exact, decode)]
        if name.startswith("fp32"):
            cells = [c.split(" (")[0] for c in cells]
        print(f"| {name} | {used} | {lat.decode_ms_per_token:.2f} | {decode_ms / lat.decode_ms_per_token:.2f}× | "
              f"{lat.prefill_tokens_per_s:.0f} | {lat.prefill_tokens_per_s / prefill:.2f}× | {lat.model_mib:.1f} | "
              f"{lat.model_mib / fp32.model_mib:.2f}× | {cells[0]} | {cells[1]} | {cells[2]} |")
    print(f"\n({lat.threads} threads, {args.prompt_tokens}-token prompt, {args.decode_tokens} decoded tokens, best of "
          f"{args.repeats}; fp32 measured first and last, its best run used)")


if __name__ == "__main__":
    main()
