"""Is a real fused decode step slower than the same step repeated at one position? Per-step times of 64 real steps
(greedy, positions 128..191) against 64 repeats of the step at position 128 (the cache row rewritten), interleaved
in rounds; each step timed alone, so means, medians and minimums of both can be set side by side. The repeated step
is also timed on one thread (does the spread come from two threads meeting at each kernel's end?).

    python experiments/real_vs_repeated_step.py runs/rtn4/model --rounds 6
"""
import statistics
import time

import torch
from decode_ab import PROMPT, load, parse_args

from lightning_gptq.models.decode import StaticDecoder

args = parse_args()
model = load(args.folder)
d = StaticDecoder(model, 256, fused=True)
STEPS = 64


def real() -> list[float]:
    logits, times = d.prefill(PROMPT), []
    for _ in range(STEPS):
        token = int(logits.argmax())
        start = time.perf_counter()
        logits = d.step(token)
        times.append(time.perf_counter() - start)
    return times


def repeated() -> list[float]:
    logits, times = d.prefill(PROMPT), []
    token = int(logits.argmax())
    for _ in range(STEPS):
        start = time.perf_counter()
        d.step(token)
        times.append(time.perf_counter() - start)
        d.length -= 1  # the same position again
    return times


def loop_overhead() -> list[float]:
    """What the real loop adds outside the step: argmax over the vocabulary and int()."""
    logits, times = d.prefill(PROMPT), []
    for _ in range(STEPS):
        start = time.perf_counter()
        int(logits.argmax())
        times.append(time.perf_counter() - start)
    return times


real(), repeated()  # warm-up
threads = torch.get_num_threads()
got = {"real": [], "repeated": [], "argmax": [], "repeated, 1 thread": []}
for _ in range(args.rounds):
    got["real"] += real()
    got["repeated"] += repeated()
    got["argmax"] += loop_overhead()
    torch.set_num_threads(1)
    got["repeated, 1 thread"] += repeated()
    torch.set_num_threads(threads)
for name, t in got.items():
    ms = [x * 1e3 for x in t]
    print(f"{name:18s} mean {statistics.mean(ms):.3f}  median {statistics.median(ms):.3f}  min {min(ms):.3f}  "
          f"p90 {sorted(ms)[int(len(ms) * 0.9)]:.3f} ms  ({len(ms)} steps)")
