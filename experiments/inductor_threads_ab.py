"""The compiled decode step with inductor's generated kernels on one thread (``cpp.threads=1``: no OpenMP fork and
join around each small elementwise kernel; our C++ operators keep torch's threads) against the default (all
threads), two compiled ``StaticDecoder``s of one saved 4-bit SmolLM2 (int8 head) in alternating rounds.

    python experiments/inductor_threads_ab.py runs/rtn4/model --rounds 8
"""
import argparse
import time

import torch

from lightning_gptq.checkpoint import load_quantized
from lightning_gptq.models.decode import StaticDecoder
from lightning_gptq.nn import int8_head

p = argparse.ArgumentParser()
p.add_argument("folder")
p.add_argument("--rounds", type=int, default=8)
args = p.parse_args()
torch.set_grad_enabled(False)
ids = torch.randint(0, 49152, (1, 128), generator=torch.Generator().manual_seed(0))
model, _ = load_quantized(args.folder)
model.eval()
int8_head(model)
decoders = {threads: StaticDecoder(model, 200, compiled=True) for threads in ("all", "one")}


def run(d) -> tuple[float, list[int]]:
    logits, out = d.prefill(ids), []
    start = time.perf_counter()
    for _ in range(32):
        out.append(int(logits.argmax()))
        logits = d.step(out[-1])
    return (time.perf_counter() - start) / 32 * 1e3, out


for name, d in decoders.items():
    with torch._inductor.config.patch({"cpp.threads": 1 if name == "one" else -1}):
        run(d)  # compiles
    print(f"{name}: compile {d.compile_s:.1f} s", flush=True)
times, tokens = {name: [] for name in decoders}, {}
for _ in range(args.rounds):
    for name, d in decoders.items():
        ms, tokens[name] = run(d)
        times[name].append(ms)
for name, ms in times.items():
    print(f"{name}: best {min(ms):.2f}, median {sorted(ms)[len(ms) // 2]:.2f} ms/token")
ratios = sorted(a / b for a, b in zip(times["all"], times["one"]))
print(f"all/one per round: median {ratios[len(ratios) // 2]:.3f} (min {ratios[0]:.3f}, max {ratios[-1]:.3f}); "
      f"greedy tokens equal: {tokens['all'] == tokens['one']}")
