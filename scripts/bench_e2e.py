"""End to end: a quantized model folder against its fp32 base, per quantized-linear backend.

Measures what ``validate`` measures (``measure_latency``: batch-1 prefill throughput and greedy
decode with a KV cache), the bytes of the model's tensors, and optionally perplexity on the first
WikiText-2 windows (paper protocol), for the fp32 base and for the quantized model loaded with each
backend, all in one run so the ratios compare like with like on this machine: every model is loaded
first and their latencies are timed in interleaved rounds (``--rounds``), each model's best round counting.

    HF_HUB_OFFLINE=1 python scripts/bench_e2e.py runs/smollm2-135m/lightning_logs/version_0/quantized/model \\
        --backends auto torch cpu-int4 cpu-packed --ppl-windows 16

Decode is timed on the paths ``--decode`` names (``eager``, ``compiled``, ``fused``, ``auto``: eager and the static
path ``validate`` would take; several may be named), each printed, the fastest in the table, compile time apart. ``--lm-head int8`` adds rows with the int8 LM head.
llama.cpp joins as a peer when ``llama_cpp`` is importable here or ``--llama-cpp-python`` names a Python that has
it (``scripts/llama_cpp_peer.py`` runs there, on the GGUF named by ``--base``/``--gguf-file``, in every round).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from lightning_gptq.checkpoint import is_quantized_checkpoint, load_quantized
from lightning_gptq.data.evaluation import eval_tokens, perplexity
from lightning_gptq.models import load_causal_lm
from lightning_gptq.models.decode import share_inputs
from lightning_gptq.models.fused_decode import unavailable as _fused_unavailable
from lightning_gptq.models.latency import measure_latency
from lightning_gptq.nn import GemvHead, Int8Head, QuantLinear, exact_kernels, int8_head, speed_up_head


def fused_unavailable(model) -> str | None:
    share_inputs(model)  # (what measure_latency does first; the fused step needs it)
    return _fused_unavailable(model)


PATH_FIELDS = {"eager": "eager_decode_ms_per_token", "compiled": "compiled_decode_ms_per_token",
               "fused": "fused_decode_ms_per_token"}


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


class Peer:
    """llama.cpp timed by ``scripts/llama_cpp_peer.py``, in this process or under another Python."""

    def __init__(self, gguf: str, python: str | None, args):
        self.gguf, self.python, self.args = gguf, python, args

    @classmethod
    def find(cls, args) -> "Peer | None":
        gguf = str(Path(args.base) / args.gguf_file) if args.gguf_file else args.base
        if args.llama_cpp_python:
            return cls(gguf, args.llama_cpp_python, args)
        if importlib.util.find_spec("llama_cpp") is not None:
            return cls(gguf, None, args)
        return None

    def measure(self) -> dict:
        a = self.args
        if self.python is None:
            sys.path.insert(0, str(Path(__file__).parent))
            import llama_cpp_peer

            return llama_cpp_peer.measure(self.gguf, a.prompt_tokens, a.decode_tokens, torch.get_num_threads(), a.repeats)
        cmd = [self.python, str(Path(__file__).with_name("llama_cpp_peer.py")), self.gguf, "--prompt-tokens",
               str(a.prompt_tokens), "--decode-tokens", str(a.decode_tokens), "--threads", str(torch.get_num_threads()),
               "--repeats", str(a.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"llama.cpp peer failed: {out.stderr.strip()[-500:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("quantized", help="a folder saved by fit")
    parser.add_argument("--base", default="../shared/models")
    parser.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--backends", nargs="+", default=["auto", "torch"])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timings per round (the best counts)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds over all models; each model's best round counts")
    parser.add_argument("--ppl-windows", type=int, default=0, help="also score the first N WikiText-2 windows (0: skip)")
    parser.add_argument("--wikitext", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    parser.add_argument("--floor", action="store_true",
                        help="also time the fp32 model with its block linears replaced by zero-cost stubs: the "
                             "decode time no kernel can go below (framework, attention, norms, LM head)")
    parser.add_argument("--decode", nargs="+", default=["auto"], choices=["eager", "compiled", "fused", "auto"],
                        help="decode paths to time, each as measure_latency's decode= (auto: eager and fused where it "
                             "runs, else compiled); the fastest in the table")
    parser.add_argument("--cpp-wrapper", action="store_true",
                        help="compile decode steps with inductor's C++ wrapper (StaticDecoder(cpp_wrapper=True))")
    parser.add_argument("--lm-head", nargs="+", default=["fp32"], choices=["fp32", "int8"],
                        help="LM head variants of each quantized model (int8: lm_head int8)")
    parser.add_argument("--llama-cpp-python", default=None,
                        help="a Python with llama_cpp installed: llama.cpp joins as a peer on the same GGUF")
    args = parser.parse_args()
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be at least 1")
    if not is_quantized_checkpoint(args.quantized):
        parser.error(f"not a folder saved by fit: {args.quantized}")

    base, tokenizer = load_causal_lm(args.base, gguf_file=args.gguf_file, dtype="float32")
    tokens = eval_tokens("wikitext2", tokenizer, path=args.wikitext) if args.ppl_windows else None
    torch.set_grad_enabled(False)

    def perplexities(model):
        """(fast, exact kernels, one-row kernels) perplexity on the first windows, or Nones."""
        if tokens is None:
            return None, None, None
        score = lambda: perplexity(model, tokens, dataset="wikitext2", max_windows=args.ppl_windows, progress=False).ppl
        fast = score()
        with exact_kernels():
            exact = score()
        with decode_kernels(model):
            decode = score() if any(isinstance(m, QuantLinear) for m in model.modules()) else fast
        return fast, exact, decode

    ppl_text = lambda p: f"; ppl {p[0]:.4f} (exact kernels {p[1]:.4f}, one-row kernels {p[2]:.4f})" if p[0] else ""
    # Every model is loaded first, then their latencies are timed in interleaved rounds and each model's best
    # round counts: this machine's speed drifts by tens of percent within minutes, and timing one model after
    # the other would hand that drift to the ratios.
    entries = [("fp32", "-", base, torch.nn.Linear)]  # name, backends used, model, LM head class to time it with
    # like for like: the fp32 model with the LM head that `auto` gives quantized models (speed_up_head)
    print(speed_up_head(base), flush=True)
    if isinstance(base.get_output_embeddings(), GemvHead):
        entries.append(("fp32, GEMV head", "-", base, GemvHead))
        base.get_output_embeddings().__class__ = torch.nn.Linear
    for backend in args.backends:
        start = time.perf_counter()
        model, _ = load_quantized(args.quantized, backend=backend)
        used = sorted({m.backend for m in model.modules() if isinstance(m, QuantLinear)})
        print(f"{backend}: layers on {','.join(used)}, loaded in {time.perf_counter() - start:.1f} s", flush=True)
        head = type(model.get_output_embeddings())
        if "fp32" in args.lm_head:
            entries.append((backend, ",".join(used), model, head))
        if "int8" in args.lm_head:
            print(int8_head(model), flush=True)
            entries.append((f"{backend}, int8 head", ",".join(used), model, Int8Head))
            model.get_output_embeddings().__class__ = head
    scores = {}
    for name, _, model, head in entries:
        if head is not None:
            model.get_output_embeddings().__class__ = head
        scores[name] = perplexities(model)
    best = {}
    peer, peer_best = Peer.find(args), None
    if peer is None:
        print("llama.cpp peer: skipped (llama_cpp is not importable here and --llama-cpp-python is not given)")
    for round_ in range(1, args.rounds + 1):
        for name, _, model, head in entries:
            if head is not None:
                model.get_output_embeddings().__class__ = head
            for decode in args.decode:
                if decode == "fused" and fused_unavailable(model):
                    if round_ == 1:
                        print(f"{name}: no fused step ({fused_unavailable(model)})", flush=True)
                    continue
                lat = measure_latency(model, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                                      repeats=args.repeats, decode=decode, cpp_wrapper=args.cpp_wrapper)
                print(f"round {round_}, {name}: {lat}", flush=True)
                kept = best.setdefault(name, lat)
                if lat.decode_ms_per_token < kept.decode_ms_per_token:
                    kept.decode_ms_per_token, kept.decode_path = lat.decode_ms_per_token, lat.decode_path
                kept.prefill_tokens_per_s = max(kept.prefill_tokens_per_s, lat.prefill_tokens_per_s)
                for field in PATH_FIELDS.values():
                    if getattr(lat, field) is not None:
                        setattr(kept, field, min(getattr(kept, field) or float("inf"), getattr(lat, field)))
                if lat.compile_s is not None:
                    kept.compile_s = lat.compile_s if kept.compile_s is None else min(kept.compile_s, lat.compile_s)
        if peer is not None:
            lat = peer.measure()
            print(f"round {round_}, llama.cpp: {json.dumps(lat)}", flush=True)
            if peer_best is None:
                peer_best = dict(lat)
            peer_best["decode_ms_per_token"] = min(peer_best["decode_ms_per_token"], lat["decode_ms_per_token"])
            peer_best["prefill_tokens_per_s"] = max(peer_best["prefill_tokens_per_s"], lat["prefill_tokens_per_s"])
    base.get_output_embeddings().__class__ = torch.nn.Linear
    for name, _, _, _ in entries:
        print(f"{name}: best of {args.rounds} rounds: {best[name]}{ppl_text(scores[name])}", flush=True)
    if args.floor:
        floor = measure_latency(with_free_block_linears(base), prompt_tokens=args.prompt_tokens,
                                decode_tokens=args.decode_tokens, repeats=args.repeats)
        print(f"floor (block linears cost nothing): {floor}", flush=True)
    fp32 = best["fp32"]
    decode_ms, prefill = fp32.decode_ms_per_token, fp32.prefill_tokens_per_s
    rows = [(name, used, best[name], *scores[name]) for name, used, _, _ in entries]

    reference = next((r[4] for r in rows if r[0] == "torch"), None)
    rel = lambda p: f"{(p - reference) / reference:+.1e}" if p is not None and reference else "–"
    print()
    scored = args.ppl_windows > 0  # the perplexity columns only when something was scored
    print("| model | backend used | decode ms/token | decode × fp32 | prefill tokens/s | prefill × fp32 | model MiB | × fp32 |"
          + (f" ppl, first {args.ppl_windows} windows (vs torch) | same, exact kernels (vs torch) | "
             "same, the one-row (decode) kernel for every input (vs torch) |" if scored else ""))
    print("|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if scored else ""))
    for name, used, lat, fast, exact, decode in rows:
        cells = [f"{p:.4f} ({rel(p)})" if p is not None else "–" for p in (fast, exact, decode)]
        if name.startswith("fp32"):
            cells = [c.split(" (")[0] for c in cells]
        print(f"| {name} | {used} | {lat.decode_ms_per_token:.2f} ({lat.decode_path}) | {decode_ms / lat.decode_ms_per_token:.2f}× | "
              f"{lat.prefill_tokens_per_s:.0f} | {lat.prefill_tokens_per_s / prefill:.2f}× | {lat.model_mib:.1f} | "
              f"{lat.model_mib / fp32.model_mib:.2f}× |" + (f" {cells[0]} | {cells[1]} | {cells[2]} |" if scored else ""))
    # the strictest yardstick: the best decode and the best prefill of any fp32 variant (the GEMV head changes
    # only calls of up to 4 rows, so for a prefill both fp32 rows time the same computation)
    fp32_rows = [r for r in rows if r[0].startswith("fp32")]
    best_decode = min(r[2].decode_ms_per_token for r in fp32_rows)
    best_prefill = max(r[2].prefill_tokens_per_s for r in fp32_rows)
    print()
    for name, _, lat, *_ in rows:
        if not name.startswith("fp32"):
            print(f"{name} against the best fp32 variant: decode {best_decode / lat.decode_ms_per_token:.2f}×, "
                  f"prefill {lat.prefill_tokens_per_s / best_prefill:.2f}×")
    if peer_best is not None:
        print(f"\nllama.cpp {peer_best['llama_cpp']} on {Path(peer.gguf).name} ({peer_best['model_mib']:.1f} MiB): decode "
              f"{peer_best['decode_ms_per_token']:.2f} ms/token, prefill {peer_best['prefill_tokens_per_s']:.0f} tokens/s")
        for name, _, lat, *_ in rows:
            print(f"{name} against llama.cpp: decode time {lat.decode_ms_per_token / peer_best['decode_ms_per_token']:.2f}× "
                  f"llama.cpp's ({lat.decode_path}), prefill {lat.prefill_tokens_per_s / peer_best['prefill_tokens_per_s']:.2f}×")
    print()
    for name, _, lat, *_ in rows:
        timed = {path: getattr(lat, field) for path, field in PATH_FIELDS.items() if getattr(lat, field) is not None}
        if len(timed) > 1:
            eager = timed.get("eager")
            print(f"{name}: decode " + ", ".join(
                f"{path} {ms:.2f}" + (f" ({eager / ms:.2f}× eager)" if eager and path != "eager" else "")
                for path, ms in timed.items()) + " ms/token"
                + (f"; first compile {lat.compile_s:.1f} s" if lat.compile_s is not None else ""))
    print(f"\n({fp32.threads} threads, {args.prompt_tokens}-token prompt, {args.decode_tokens} decoded tokens; each "
          f"model's best of {args.rounds} interleaved rounds of best-of-{args.repeats})")


if __name__ == "__main__":
    main()
