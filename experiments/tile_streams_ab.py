"""One-row calls of the int8x2 layer kernel on SmolLM2's block shapes (4-bit g128), one output tile at a time
against two tiles at once (``cpu_gemm`` ``set_tile_streams``), alternating rounds in one process; caches cold (a
256 MiB buffer streamed between calls, as the rest of a decode step evicts a layer's codes) and warm.

    python experiments/tile_streams_ab.py --rounds 6
"""
import argparse
import statistics
import time

import torch

from lightning_gptq.kernels import cpu_gemm
from lightning_gptq.quant import QuantConfig, rtn_quantize
from lightning_gptq.nn import make_quant_linear

p = argparse.ArgumentParser()
p.add_argument("--rounds", type=int, default=6)
p.add_argument("--calls", type=int, default=30)
p.add_argument("--kernel", default="int8x2")
args = p.parse_args()
torch.set_grad_enabled(False)
torch.manual_seed(0)
SHAPES = {"q/k/v joined": (960, 576), "o": (576, 576), "gate/up joined": (3072, 576), "down": (576, 1536)}
layers = {}
for name, (n, k) in SHAPES.items():
    lin = torch.nn.Linear(k, n, bias=False)
    qw = rtn_quantize(lin.weight, QuantConfig(bits=4, group_size=128, sym=False))
    layers[name] = make_quant_linear(lin, qw, "cpu-packed")
x = {name: torch.randn(1, 1, k) for name, (n, k) in SHAPES.items()}
ext = cpu_gemm._load()
evict = torch.ones(64 << 20)
ref = {}
for streams in (1, 2):
    ext.set_tile_streams(streams)
    ref[streams] = {name: layers[name].run(args.kernel, x[name]) for name in SHAPES}
for name in SHAPES:
    assert torch.equal(ref[1][name], ref[2][name]), name  # the same arithmetic, in another order of tiles
times = {(s, name, mode): [] for s in (1, 2) for name in SHAPES for mode in ("cold", "warm")}
for r in range(args.rounds):
    for streams in (1, 2):
        ext.set_tile_streams(streams)
        for name in SHAPES:
            for mode in ("cold", "warm"):
                ts = []
                for _ in range(args.calls):
                    if mode == "cold":
                        evict.add_(1)
                    t = time.perf_counter()
                    layers[name].run(args.kernel, x[name])
                    ts.append(time.perf_counter() - t)
                times[(streams, name, mode)].append(statistics.median(ts))
ext.set_tile_streams(2)
print(f"{torch.get_num_threads()} threads, kernel {args.kernel}, {args.rounds} rounds x {args.calls} calls; best round's median, µs")
print("| shape | 1 tile cold | 2 tiles cold | ratio | 1 tile warm | 2 tiles warm | ratio |\n|---|---:|---:|---:|---:|---:|---:|")
for name in SHAPES:
    c1, c2 = min(times[(1, name, "cold")]), min(times[(2, name, "cold")])
    w1, w2 = min(times[(1, name, "warm")]), min(times[(2, name, "warm")])
    print(f"| {name} {SHAPES[name]} | {c1 * 1e6:.1f} | {c2 * 1e6:.1f} | {c1 / c2:.2f}x | {w1 * 1e6:.1f} | {w2 * 1e6:.1f} | {w1 / w2:.2f}x |")
