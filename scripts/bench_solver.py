"""Benchmark the GPTQ solver and Hessian accumulation on real LLM layer shapes (fp32, this machine).

Every figure is printed as achieved GFLOP/s and as a fraction of this machine's fp32 matmul peak,
measured in the same run (machines here are noisy; absolute seconds mean little across runs).

    python scripts/bench_solver.py            # all shapes (a few minutes on 2 cores)
    python scripts/bench_solver.py --quick    # the small shapes only
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_gptq import HessianAccumulator, QuantConfig, gptq_quantize

SHAPES = [(768, 768), (3072, 768), (768, 3072), (4096, 4096), (11008, 4096), (4096, 11008)]  # [out, in]


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_peak(n: int = 4096, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_time(lambda: a @ b, repeats) / 1e9


def problem(rows: int, cols: int, tokens: int = 2048):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(tokens, cols // 8, generator=gen) @ torch.randn(cols // 8, cols, generator=gen)
    X += 0.1 * torch.randn(tokens, cols, generator=gen)
    acc = HessianAccumulator(cols)
    acc.add(X[None])
    return torch.randn(rows, cols, generator=gen) * 0.02, acc.hessian, X


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the shapes up to 3072 wide")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32")
    peak = matmul_peak()
    print(f"fp32 matmul peak (4096^3, best of 5): {peak:.1f} GFLOP/s (measured again at the end; the larger is used)\n")
    rows_out = []
    cfg = QuantConfig(bits=args.bits, group_size=args.group_size)
    for rows, cols in SHAPES:
        if args.quick and max(rows, cols) > 3072:
            continue
        W, H, X = problem(rows, cols)
        solve = best_time(lambda: gptq_quantize(W, H, cfg), args.repeats)
        solve_flops = rows * cols**2 + cols**3  # lazy updates + Cholesky inverse chain, as the issue counts it
        acc = HessianAccumulator(cols)
        batch = X[None]  # one 2048-token sample
        hacc = best_time(lambda: acc.add(batch), 3)
        hacc_flops = 2 * X.shape[0] * cols**2
        rows_out.append((rows, cols, solve, solve_flops / solve / 1e9, hacc, hacc_flops / hacc / 1e9))
    peak_end = matmul_peak()
    peak = max(peak, peak_end)
    print(f"fp32 matmul peak at the end: {peak_end:.1f} GFLOP/s -> using {peak:.1f}\n")
    print(f"{'shape [out x in]':>18} | {'solve s':>8} | {'GFLOP/s':>8} | {'of peak':>7} || {'H acc s':>8} | {'GFLOP/s':>8} | {'of peak':>7}")
    for rows, cols, solve, solve_gf, hacc, hacc_gf in rows_out:
        print(
            f"{rows:>8} x {cols:<7} | {solve:8.3f} | {solve_gf:8.1f} | {solve_gf / peak:7.1%}"
            f" || {hacc:8.4f} | {hacc_gf:8.1f} | {hacc_gf / peak:7.1%}"
        )
    print(f"\nsolve FLOPs counted as rows*cols^2 + cols^3; Hessian accumulation as 2*2048*cols^2 per 2048-token batch")
    print(f"config: {cfg}")


if __name__ == "__main__":
    main()
