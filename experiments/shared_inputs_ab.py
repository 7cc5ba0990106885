"""Decode with q/k/v and gate/up as one kernel call each (``share_inputs``) against separate calls: two copies
of a saved 4-bit SmolLM2 in one process, int8 LM head, each through a compiled ``StaticDecoder``, timed in
alternating rounds (this machine's speed drifts by tens of percent within minutes).

    python experiments/shared_inputs_ab.py runs/rtn4/model --rounds 8
"""
import argparse
import time

import torch

import lightning_gptq.models.decode as decode
from lightning_gptq.checkpoint import load_quantized
from lightning_gptq.nn import int8_head

p = argparse.ArgumentParser()
p.add_argument("folder")
p.add_argument("--rounds", type=int, default=8)
args = p.parse_args()
torch.set_grad_enabled(False)
ids = torch.randint(0, 49152, (1, 128), generator=torch.Generator().manual_seed(0))
share = decode.share_inputs
decoders, tokens = {}, {}
for name in ("separate", "shared"):
    model, _ = load_quantized(args.folder)
    model.eval()
    int8_head(model)
    decode.share_inputs = share if name == "shared" else (lambda model: 0)
    decoders[name] = decode.StaticDecoder(model, 200, compiled=True)
decode.share_inputs = share


def run(d) -> tuple[float, list[int]]:
    logits, out = d.prefill(ids), []
    start = time.perf_counter()
    for _ in range(32):
        out.append(int(logits.argmax()))
        logits = d.step(out[-1])
    return (time.perf_counter() - start) / 32 * 1e3, out


for d in decoders.values():
    run(d)  # compiles
times = {name: [] for name in decoders}
for _ in range(args.rounds):
    for name, d in decoders.items():
        ms, tokens[name] = run(d)
        times[name].append(ms)
for name, ms in times.items():
    print(f"{name}: best {min(ms):.2f}, median {sorted(ms)[len(ms) // 2]:.2f} ms/token")
ratios = sorted(a / b for a, b in zip(times["separate"], times["shared"]))
print(f"separate/shared per round: median {ratios[len(ratios) // 2]:.3f} (min {ratios[0]:.3f}, max {ratios[-1]:.3f}); "
      f"greedy tokens equal: {tokens['separate'] == tokens['shared']}")
