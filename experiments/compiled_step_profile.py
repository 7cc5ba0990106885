"""Where a compiled decode step's time goes (torch.profiler, CPU): a saved 4-bit SmolLM2 with the int8 LM head
through ``StaticDecoder(compiled=True)``; per-token milliseconds of the most expensive operators.

    python experiments/compiled_step_profile.py runs/rtn4/model [--attention eager]
"""
import argparse
import time

import torch
from decode_ab import PROMPT as ids
from decode_ab import load
from torch.profiler import ProfilerActivity, profile

from lightning_gptq.models.decode import StaticDecoder

p = argparse.ArgumentParser()
p.add_argument("folder")
p.add_argument("--attention", default="auto")
p.add_argument("--steps", type=int, default=32)
args = p.parse_args()
torch.set_grad_enabled(False)
model = load(args.folder)
d = StaticDecoder(model, 200, compiled=True, attention=args.attention)
d.greedy(ids, 8)  # compiles
for _ in range(3):
    logits = d.prefill(ids)
    start = time.perf_counter()
    for _ in range(args.steps):
        logits = d.step(int(logits.argmax()))
    print(f"{(time.perf_counter() - start) / args.steps * 1e3:.2f} ms/token", flush=True)
logits = d.prefill(ids)
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(args.steps):
        logits = d.step(int(logits.argmax()))
rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:14]
for e in rows:
    print(f"{e.key[:60]:<60} {e.count / args.steps:6.1f} calls {e.self_cpu_time_total / args.steps / 1e3:7.3f} ms/token")
