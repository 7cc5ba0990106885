"""Shared by the decode A/B studies: two compiled ``StaticDecoder``s timed in alternating rounds in one process
(this machine's speed drifts by tens of percent within minutes), greedy tokens compared. Not a study itself."""
import argparse
import contextlib
import time

import torch

from lightning_gptq.checkpoint import load_quantized
from lightning_gptq.nn import int8_head

PROMPT = torch.randint(0, 49152, (1, 128), generator=torch.Generator().manual_seed(0))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("folder", help="a saved quantized SmolLM2 folder, e.g. runs/rtn4/model")
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    return args


def load(folder: str):
    """The saved model in eval mode with the int8 LM head."""
    model, _ = load_quantized(folder)
    model.eval()
    int8_head(model)
    return model


def run(decoder, tokens: int = 32) -> tuple[float, list[int]]:
    """(ms per token, greedy tokens) of ``tokens`` steps after the prompt."""
    logits, out = decoder.prefill(PROMPT), []
    start = time.perf_counter()
    for _ in range(tokens):
        out.append(int(logits.argmax()))
        logits = decoder.step(out[-1])
    return (time.perf_counter() - start) / tokens * 1e3, out


def compare(decoders: dict, rounds: int, compile_context=lambda name: contextlib.nullcontext()) -> None:
    """Compile each (inside ``compile_context(name)``), then time them in ``rounds`` alternating rounds; prints
    best and median per decoder and the first's time over the second's per round."""
    for name, d in decoders.items():
        with compile_context(name):
            run(d)  # the first step compiles
        print(f"{name}: compile {d.compile_s:.1f} s", flush=True)
    times, tokens = {name: [] for name in decoders}, {}
    for _ in range(rounds):
        for name, d in decoders.items():
            ms, tokens[name] = run(d)
            times[name].append(ms)
    for name, ms in times.items():
        print(f"{name}: best {min(ms):.2f}, median {sorted(ms)[len(ms) // 2]:.2f} ms/token")
    a, b = decoders
    ratios = sorted(x / y for x, y in zip(times[a], times[b]))
    print(f"{a}/{b} per round: median {ratios[len(ratios) // 2]:.3f} (min {ratios[0]:.3f}, max {ratios[-1]:.3f}); "
          f"greedy tokens equal: {tokens[a] == tokens[b]}")
