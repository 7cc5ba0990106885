"""Where a decode step's time goes: the block linears (each kind timed inside the real forward pass) and
everything else, for the fp32 model and a quantized folder, in one run. ``--prefill``: the same for the
prompt's forward pass (all its rows at once, as ``validate``'s prefill latency runs it).

Each linear's ``forward`` is wrapped with a timer, so the numbers are what the layers cost where they
run (weights coming from memory, caches holding whatever the rest of the step left), not in a loop
over one weight. ``rest`` is the step minus the block linears: embedding, norms, rotary, attention,
KV-cache updates, the LM head and the framework's Python.

    HF_HUB_OFFLINE=1 python scripts/decode_breakdown.py runs/smollm2-135m/lightning_logs/version_0/quantized/model
    HF_HUB_OFFLINE=1 python scripts/decode_breakdown.py <folder> --prefill
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_gptq.checkpoint import is_quantized_checkpoint, load_quantized
from lightning_gptq.models import load_causal_lm
from lightning_gptq.nn import QuantLinear


def time_linears(model, kinds) -> dict[str, float]:
    """Wrap every block linear's forward; returns the dict its seconds accumulate in, by layer name's last part."""
    spent: dict[str, float] = {}
    for name, module in model.named_modules():
        if isinstance(module, kinds) and ".layers." in name:
            forward, key = module.forward, name.rpartition(".")[2]

            def timed(x, forward=forward, key=key):
                start = time.perf_counter()
                y = forward(x)
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - start
                return y

            module.forward = timed
    return spent


@torch.no_grad()
def breakdown(model, spent: dict[str, float], prompt_tokens: int, tokens: int, repeats: int) -> tuple[float, dict[str, float]]:
    """Best of ``repeats`` greedy decodes of ``tokens`` tokens after a ``prompt_tokens`` prompt: ms/token, and
    ms/token per linear kind."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    best = None
    for _ in range(repeats + 1):  # the first is a warm-up
        out = model(input_ids=ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        spent.clear()
        start = time.perf_counter()
        for _ in range(tokens):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        ms = (time.perf_counter() - start) / tokens * 1e3
        parts = {k: v / tokens * 1e3 for k, v in spent.items()}
        if best is None or ms < best[0]:
            best = (ms, parts)
    return best


@torch.no_grad()
def prefill_breakdown(model, spent: dict[str, float], prompt_tokens: int, repeats: int) -> tuple[float, dict[str, float]]:
    """Best of ``repeats`` forward passes over a ``prompt_tokens`` prompt without a cache: ms per pass, and ms per
    linear kind."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    best = None
    for _ in range(repeats + 1):  # the first is a warm-up
        spent.clear()
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        ms = (time.perf_counter() - start) * 1e3
        if best is None or ms < best[0]:
            best = (ms, {k: v * 1e3 for k, v in spent.items()})
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("quantized", help="a folder saved by fit")
    parser.add_argument("--base", default="../shared/models")
    parser.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill", action="store_true", help="break down the prompt's forward pass instead")
    args = parser.parse_args()
    if not is_quantized_checkpoint(args.quantized):
        parser.error(f"not a folder saved by fit: {args.quantized}")

    base, _ = load_causal_lm(args.base, gguf_file=args.gguf_file, dtype="float32")
    quantized, _ = load_quantized(args.quantized, backend=args.backend)
    results = []
    for label, model, kinds in (("fp32", base, torch.nn.Linear), (args.backend, quantized, QuantLinear)):
        model.eval()
        spent = time_linears(model, kinds)
        if args.prefill:
            ms, parts = prefill_breakdown(model, spent, args.prompt_tokens, args.repeats)
        else:
            ms, parts = breakdown(model, spent, args.prompt_tokens, args.tokens, args.repeats)
        linears = sum(parts.values())
        results.append((label, ms, linears, parts))
        unit = f"ms per {args.prompt_tokens}-token prompt" if args.prefill else "ms/token"
        print(f"{label}: {ms:.2f} {unit} = block linears {linears:.2f} + rest {ms - linears:.2f}; "
              + ", ".join(f"{k} {v:.2f}" for k, v in sorted(parts.items())), flush=True)
    (_, fp32_ms, fp32_lin, _), (_, q_ms, q_lin, _) = results
    print(f"{'prefill' if args.prefill else 'decode'} {fp32_ms / q_ms:.2f}x fp32; block linears {fp32_lin / q_lin:.2f}x; rest {(fp32_ms - fp32_lin) / (q_ms - q_lin):.2f}x "
          f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
