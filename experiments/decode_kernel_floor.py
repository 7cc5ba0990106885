"""How much of a compiled decode step is our kernels: the step (``StaticDecoder``, int8 head) against the same
token's kernel calls alone, in a Python loop (the block linears' one-row calls as the step makes them, shared
q/k/v and gate/up inputs as one call each, then the int8 head), alternating rounds in one process.

    python experiments/decode_kernel_floor.py runs/rtn4/model --rounds 6
"""
import argparse
import time

import torch
from decode_ab import PROMPT as ids
from decode_ab import load

from lightning_gptq.kernels import cpu_gemm
from lightning_gptq.models.decode import StaticDecoder
from lightning_gptq.nn.cpu_packed import CpuPackedQuantLinear

p = argparse.ArgumentParser()
p.add_argument("folder")
p.add_argument("--rounds", type=int, default=6)
p.add_argument("--steps", type=int, default=32)
p.add_argument("--cpp-wrapper", action="store_true")
args = p.parse_args()
torch.set_grad_enabled(False)
model = load(args.folder)
d = StaticDecoder(model, 200, compiled=True, cpp_wrapper=args.cpp_wrapper)
start = time.perf_counter()
d.greedy(ids, 4)
print(f"compile {time.perf_counter() - start:.1f} s", flush=True)

calls, seen = [], set()  # (x, args) per kernel call of one token, in block order
for name, m in model.named_modules():
    if type(m) is CpuPackedQuantLinear:
        shared = m.__dict__.get("_shared")
        if shared is not None:
            if id(shared) in seen:
                continue
            seen.add(id(shared))
            a = shared.args
        else:
            a = m.__dict__["_matmul_args"] + (cpu_gemm.KERNELS[m.kernel_for(1)],)
        calls.append((torch.randn(1, 1, m.in_features), a))
head = model.get_output_embeddings()
hx = torch.randn(1, 1, head.in_features)
print(f"{len(calls)} block-linear calls per token + head", flush=True)


def kernels_only():
    for x, a in calls:
        cpu_gemm.matmul(x, *a)
    cpu_gemm.int8_row_gemv(hx, head.int8_weight, head.int8_step)


def blocks_only():
    for x, a in calls:
        cpu_gemm.matmul(x, *a)


def head_only():
    cpu_gemm.int8_row_gemv(hx, head.int8_weight, head.int8_step)


def step_loop():
    logits = d.prefill(ids)
    start = time.perf_counter()
    for _ in range(args.steps):
        logits = d.step(int(logits.argmax()))
    return (time.perf_counter() - start) / args.steps


def loop(fn):
    fn()
    start = time.perf_counter()
    for _ in range(args.steps):
        fn()
    return (time.perf_counter() - start) / args.steps


best = {}
for r in range(args.rounds):
    row = {"compiled step": step_loop(), "kernels alone": loop(kernels_only), "block linears": loop(blocks_only),
           "int8 head": loop(head_only)}
    print(f"round {r}: " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in row.items()) + " ms", flush=True)
    for k, v in row.items():
        best[k] = min(best.get(k, v), v)
print("best: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in best.items()))
print(f"kernels alone / compiled step: {best['kernels alone'] / best['compiled step']:.2f}")
