"""Is the one-row kernel bound by memory? Our ``cpu-packed`` kernels at one row on weights that come from
memory, against the plainest read of the same bytes (``torch.amax`` over the packed codes), in one run.

Each shape gets enough copies to span ``--mb`` MB of packed codes, so every call reads its weight from
memory, as a model's forward pass does; a kernel close to the ``amax`` time is as fast as this
machine streams such blocks of memory, and only fewer bytes would make it faster.

    python scripts/bench_stream.py                 # SmolLM2's shapes, 4-bit g128, 300 MB of copies
    python scripts/bench_stream.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_gptq.kernels import cpu_gemm


def best_per_call(fn, calls: int, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["576x576", "192x576", "1536x576", "576x1536"], help="OUTxIN")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--mb", type=float, default=300.0, help="MB of packed copies per shape")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if cpu_gemm.unavailable():
        raise SystemExit(f"the C++ kernel is unavailable: {cpu_gemm.unavailable()}")
    print(f"{torch.get_num_threads()} threads, {args.bits}-bit g{args.group_size}, {args.mb:.0f} MB of copies per shape")
    print("| shape | bytes/call | gemm µs | int8x2 µs | amax over the codes µs | int8x2 GB/s | int8x2 / amax |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        try:
            n, k = (int(v) for v in shape.split("x"))
        except ValueError:
            parser.error(f"--shapes takes OUTxIN, e.g. 576x576; got {shape!r}")
        groups = -(-k // args.group_size)
        codes = torch.randint(0, 1 << args.bits, (k, n), dtype=torch.int32, generator=gen)
        qweight = cpu_gemm.pack(codes, args.bits)
        nbytes = qweight.numel() * 4 + 2 * groups * n * 4
        copies = [(qweight.clone(), torch.rand(groups, n, generator=gen), torch.rand(groups, n, generator=gen) * 8)
                  for _ in range(max(4, int(args.mb * 1e6 / nbytes)))]
        x = torch.randn(1, k, generator=gen)

        def kernel(name):
            return lambda: [cpu_gemm.matmul(x, None, q, s, z, None, args.bits, args.group_size, n, cpu_gemm.KERNELS[name])
                            for q, s, z in copies]

        gemm = best_per_call(kernel("gemm"), len(copies))
        int8x2 = best_per_call(kernel("int8x2"), len(copies))
        amax = best_per_call(lambda: [torch.amax(q) for q, _, _ in copies], len(copies))
        print(f"| {n}×{k} | {nbytes / 1e3:.0f} KB | {gemm * 1e6:.1f} | {int8x2 * 1e6:.1f} | {amax * 1e6:.1f} | "
              f"{nbytes / int8x2 / 1e9:.1f} | {int8x2 / amax:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
