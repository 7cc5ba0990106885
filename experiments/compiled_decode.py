"""Does a compiled decode step beat eager on this CPU? SmolLM2 4-bit (round to nearest: its codes
decode exactly like GPTQ's), batch 1, greedy: eager with the dynamic KV cache against one
``torch.compile``d forward over a static KV cache (compile time reported apart), tokens compared.

    python experiments/compiled_decode.py --prompt 128 --tokens 32
"""
import argparse
import time
from pathlib import Path

import torch
from transformers.cache_utils import StaticCache

from lightning_gptq import QuantConfig, quantize

SHARED = Path(__file__).resolve().parents[2] / "shared"
p = argparse.ArgumentParser()
p.add_argument("--prompt", type=int, default=128)
p.add_argument("--tokens", type=int, default=32)
p.add_argument("--mode", default="default", help="torch.compile mode")
args = p.parse_args()
torch.set_grad_enabled(False)
model = quantize(str(SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"), torch.randint(0, 1000, (1, 16)),
                 QuantConfig(bits=4, group_size=128, sym=False), method="rtn")
torch.set_grad_enabled(False)  # (the fit inside quantize() leaves grad mode on)
model.requires_grad_(False)
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


step = torch.compile(model.forward, mode=args.mode, fullgraph=False, dynamic=False)


def static_decode(forward) -> tuple[list[int], float]:
    cache = StaticCache(config=model.config, max_cache_len=args.prompt + args.tokens + 1)
    positions = torch.arange(args.prompt)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=positions)
    token, tokens = out.logits[:, -1].argmax(-1, keepdim=True), []
    start = time.perf_counter()
    for i in range(args.tokens):
        tokens.append(int(token))
        out = forward(input_ids=token, past_key_values=cache, use_cache=True,
                      cache_position=torch.tensor([args.prompt + i]))
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return tokens, (time.perf_counter() - start) / args.tokens


eager_decode()
reference, eager_ms = min((eager_decode() for _ in range(3)), key=lambda r: r[1])
start = time.perf_counter()
static_decode(step)  # traces and compiles
compile_s = time.perf_counter() - start
compiled, compiled_ms = min((static_decode(step) for _ in range(3)), key=lambda r: r[1])
static_eager, static_ms = min((static_decode(model.forward) for _ in range(2)), key=lambda r: r[1])
print(f"eager, dynamic cache: {eager_ms * 1e3:.2f} ms/token")
print(f"eager, static cache:  {static_ms * 1e3:.2f} ms/token")
print(f"compiled ({args.mode}), static cache: {compiled_ms * 1e3:.2f} ms/token ({eager_ms / compiled_ms:.2f}x eager); "
      f"first call (compile) {compile_s:.0f} s")
print(f"greedy tokens equal to eager's: compiled {compiled == reference}, static eager {static_eager == reference}")
