"""Check the Triton backend on a CUDA GPU: correctness against the fp64 oracle, then speed.

    python scripts/check_gpu.py correctness   # every bit width, group, act-order, ragged K, dtype, row count
    python scripts/check_gpu.py bench         # scripts/bench_kernels.py's shapes against fp16 F.linear

``correctness`` is meant to run with ``LIGHTNING_GPTQ_TRITON_AUTOTUNE=0`` (one launch configuration,
so the many small shapes do not each time a dozen); ``bench`` autotunes, and checks each tuned layer
against the oracle again before timing it. Exits non-zero on any error above the tolerance.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from lightning_gptq.nn import LayerSpec
from lightning_gptq.nn.timing import random_layer
from lightning_gptq.nn.triton import TritonQuantLinear

# relative error (‖y − ref‖ / ‖ref‖) allowed per activation dtype: the output's own rounding, and the
# weight tile rounded to that dtype before tl.dot
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
CASES = [  # (out, in), group size, act-order
    ((4096, 4096), 128, False), ((576, 576), 128, True), ((1000, 3000), -1, False), ((72, 80), 16, True),
    ((1536, 576), 32, False), ((130, 160), 32, True),
]


def relative_error(layer, kernel: str, x: torch.Tensor) -> float:
    y = layer.run(kernel, x)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], layer.out_features)
    ref = torch.nn.functional.linear(x.double(), layer.dequantize().double(),
                                     None if layer.bias is None else layer.bias.double())
    return ((y.double() - ref).norm() / ref.norm()).item()


@torch.no_grad()
def correctness(dtypes: list[str], bits_list: list[int]) -> int:
    failures = 0
    for dtype in dtypes:
        for bits in bits_list:
            worst = 0.0
            for (out_f, in_f), group_size, act_order in CASES:
                spec = LayerSpec(in_f, out_f, bits, group_size, False, act_order, True, "cuda", dtype)
                layer = random_layer(TritonQuantLinear, spec)
                gen = torch.Generator().manual_seed(bits)
                for rows in (1, 3, 16, 17, 100, 512):
                    x = torch.randn(rows, in_f, generator=gen).to("cuda", getattr(torch, dtype))
                    for kernel in layer.kernels:
                        error = relative_error(layer, kernel, x)
                        worst = max(worst, error)
                        if not error <= TOLERANCE[dtype]:
                            failures += 1
                            print(f"FAIL {spec.describe()} rows {rows} {kernel}: {error:.2e} > {TOLERANCE[dtype]:g}")
            print(f"{dtype:>8} {bits}-bit: worst relative error {worst:.2e} (tolerance {TOLERANCE[dtype]:g}) "
                  f"over {len(CASES)} shapes x 6 row counts x {len(TritonQuantLinear.kernels)} kernels", flush=True)
    return failures


def graph_seconds(calls) -> float:
    """Seconds per call of ``calls`` captured in one CUDA graph and replayed: GPU time without the
    Python and launch cost (what a server that replays graphs for decoding sees)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(3):
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / 10 / len(calls))
    return sorted(times)[1]


@torch.no_grad()
def bench(cold_mb: float, budget_s: float, bits_list: list[int], rows: list[int]) -> int:
    sys.path.insert(0, "scripts")
    from bench_kernels import SHAPES, bench_layer, markdown

    failures = 0
    rows_all = []
    graph_lines = []
    for bits in bits_list:
        for out_f, in_f in SHAPES:
            spec = LayerSpec(in_f, out_f, bits, 128, False, False, False, "cuda", "float16")
            copies = min(64, max(1, int(cold_mb * 2**20 // (out_f * in_f * 2))))  # graphs of thousands of launches capture slowly
            layers = [random_layer(TritonQuantLinear, spec, seed=i) for i in range(copies)]
            dense = [torch.randn(out_f, in_f, device="cuda", dtype=torch.float16) for _ in range(copies)]
            for m in rows:  # the autotuned configurations, checked before they are timed
                x = torch.randn(m, in_f, device="cuda", dtype=torch.float16)
                line = f"{out_f}x{in_f} {bits}-bit rows {m:>4} CUDA graph, {copies} copies:"
                t_dense = graph_seconds([lambda w=w, x=x: F.linear(x, w) for w in dense])
                line += f" dense fp16 {1e3 * t_dense:.4f} ms |"
                for kernel in TritonQuantLinear.kernels:
                    error = relative_error(layers[0], kernel, x)
                    if not error <= TOLERANCE["float16"]:
                        failures += 1
                        print(f"FAIL {spec.describe()} rows {m} {kernel}: {error:.2e}")
                    t = graph_seconds([lambda q=q, k=kernel, x=x: q.run(k, x) for q in layers])
                    line += f" {kernel} {t_dense / t:.2f}x"
                print(line, flush=True)
                graph_lines.append(line)
            rows_all += bench_layer(spec, rows, budget_s, cold_mb)
    print()
    print(markdown(rows_all))
    print()
    print("\n".join(graph_lines))
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["correctness", "bench"])
    parser.add_argument("--cold", type=float, default=1024, help="MB of dense fp16 copies cycled (L2 is 50+ MB)")
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "float32"])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 128, 2048])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this script checks the Triton backend on a GPU")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    failures = correctness(args.dtypes, args.bits) if args.part == "correctness" else \
        bench(args.cold, args.budget, args.bits, args.rows)
    print(f"{failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
