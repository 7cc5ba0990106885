"""Does a compiled decode step beat eager on this CPU? SmolLM2 4-bit (round to nearest: its codes
decode exactly like GPTQ's), batch 1, greedy: eager with transformers' dynamic KV cache against
``StaticDecoder`` (static cache, the one-token step compiled once; compile time reported apart), with the
fp32 or the int8 LM head; tokens compared with eager's.

    python experiments/compiled_decode.py --prompt 128 --tokens 32 [--cpp-wrapper] [--threads 1]
"""
import argparse
import time
from pathlib import Path

import torch

from lightning_gptq import QuantConfig, quantize
from lightning_gptq.models.decode import StaticDecoder
from lightning_gptq.nn import GemvHead, int8_head

SHARED = Path(__file__).resolve().parents[2] / "shared"
p = argparse.ArgumentParser()
p.add_argument("--prompt", type=int, default=128)
p.add_argument("--tokens", type=int, default=32)
p.add_argument("--mode", default=None, help="torch.compile mode")
p.add_argument("--cpp-wrapper", action="store_true", help="inductor's C++ wrapper (no Python between kernels)")
p.add_argument("--threads", type=int, default=0)
p.add_argument("--rounds", type=int, default=3)
args = p.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
if args.cpp_wrapper:
    torch._inductor.config.cpp_wrapper = True
model = quantize(str(SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"), torch.randint(0, 1000, (1, 16)),
                 QuantConfig(bits=4, group_size=128, sym=False), method="rtn")
torch.set_grad_enabled(False)  # (the fit inside quantize() leaves grad mode on)
model.requires_grad_(False).eval()
print("head:", type(model.get_output_embeddings()).__name__, flush=True)
ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))


def eager_decode() -> tuple[list[int], float]:
    out = model(input_ids=ids, use_cache=True)
    cache, token, tokens = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), []
    start = time.perf_counter()
    for _ in range(args.tokens):
        tokens.append(int(token))
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return tokens, (time.perf_counter() - start) / args.tokens


def static_decode(decoder) -> tuple[list[int], float]:
    logits = decoder.prefill(ids)
    tokens = []
    start = time.perf_counter()
    for _ in range(args.tokens):
        tokens.append(int(logits.argmax()))
        logits = decoder.step(tokens[-1])
    return tokens, (time.perf_counter() - start) / args.tokens


def best(f, *a):
    return min((f(*a) for _ in range(args.rounds)), key=lambda r: r[1])


length = args.prompt + args.tokens + 1
results = {}
eager_decode()
results["eager, dynamic cache, GEMV head"] = best(eager_decode)
static = StaticDecoder(model, length, compiled=False)
results["eager, static cache"] = best(static_decode, static)
compiled = StaticDecoder(model, length, compiled=True, mode=args.mode)
static_decode(compiled)
print(f"compile (first step): {compiled.compile_s:.1f} s", flush=True)
results["compiled, static cache, GEMV head"] = best(static_decode, compiled)
print(int8_head(model), flush=True)
torch._dynamo.reset()
compiled8 = StaticDecoder(model, length, compiled=True, mode=args.mode)
static_decode(compiled8)
print(f"compile (first step): {compiled8.compile_s:.1f} s", flush=True)
results["compiled, static cache, int8 head"] = best(static_decode, compiled8)
results["eager, dynamic cache, int8 head"] = best(eager_decode)
reference = results["eager, dynamic cache, GEMV head"]
for name, (tokens, seconds) in results.items():
    print(f"{name}: {seconds * 1e3:.2f} ms/token ({reference[1] / seconds:.2f}x eager); tokens equal eager's: "
          f"{tokens == reference[0]}")
print(f"({torch.get_num_threads()} threads, cpp_wrapper {args.cpp_wrapper}, mode {args.mode})")
