"""A/B of the C++ CPU kernel: this checkout's ``kernels/cpu_gemm.cpp`` against the one at a git revision,
both built for this machine and loaded into one process, timed alternately on the same inputs.

Prints µs per call for both builds and their ratio, with dense fp32 ``F.linear`` beside them, and checks
that the two builds agree. Cache-hot (one weight); this machine's noise per cell can be ±30%, so look
for a ratio that holds across shapes and runs, not one cell.

    python scripts/ab_kernel.py --rev HEAD~1 --bits 3 4 --rows 1 6 16 --shapes 576x576 4096x4096
    python scripts/ab_kernel.py --rev HEAD~1 --kernel int8x2   # another kernel than fp32 gemm
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lightning_gptq.kernels import cpu_gemm


def load_revision(rev: str):
    """The kernel source at ``rev``, built under its own module name."""
    try:
        source = subprocess.run(["git", "show", f"{rev}:kernels/cpu_gemm.cpp"], check=True, capture_output=True,
                                text=True, cwd=cpu_gemm.SOURCE.parent).stdout
    except subprocess.CalledProcessError as error:
        raise SystemExit(f"cannot read kernels/cpu_gemm.cpp at {rev!r}: {error.stderr.strip()}") from error
    from torch.utils.cpp_extension import load

    name = "ab_cpu_gemm_" + subprocess.run(["git", "rev-parse", "--short", rev], capture_output=True, text=True,
                                           cwd=cpu_gemm.SOURCE.parent).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="ab_kernel_") as folder:  # the source only; torch caches the build
        path = Path(folder) / "cpu_gemm_ab.cpp"
        path.write_text(source)
        return load(name=name, sources=[str(path)], extra_cflags=cpu_gemm.CFLAGS, extra_ldflags=["-fopenmp"])


def layout_of(module) -> str:
    """The 3-bit layout a build reads (builds from before ``three_bit_layout`` existed read planes)."""
    return module.three_bit_layout() if hasattr(module, "three_bit_layout") else "planes"


def per_call_us(fn, seconds: float = 0.2, repeats: int = 5) -> float:
    """Best of ``repeats`` loops of about ``seconds`` each, µs per call."""
    fn()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds / repeats:
        fn()
        n += 1
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="HEAD", help="the git revision to compare the working tree's kernel with")
    parser.add_argument("--bits", type=int, nargs="+", default=[4])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--shapes", nargs="+", default=["576x576", "1536x576", "576x1536", "4096x4096"], help="OUTxIN")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--kernel", default="gemm", choices=list(cpu_gemm.KERNELS),
                        help="which of the C++ matmul's kernels (a revision older than the kernel cannot run it)")
    args = parser.parse_args()
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        parser.error(f"--shapes takes OUTxIN, e.g. 4096x4096; got {args.shapes}")
    if any(b not in cpu_gemm.BITS for b in args.bits):
        parser.error(f"--bits must be among {cpu_gemm.BITS}")
    if args.group_size % 32:
        parser.error("--group-size must be a multiple of 32")
    if cpu_gemm.unavailable():
        raise SystemExit(cpu_gemm.unavailable())

    a, b = load_revision(args.rev), cpu_gemm._load()
    print(f"# {args.rev} against the working tree, {torch.get_num_threads()} threads, kernel {args.kernel}, "
          f"group size {args.group_size}; µs per call (working-tree speed-up; fp32 F.linear over the working tree)")
    gen = torch.Generator().manual_seed(0)
    for n, k in shapes:
        for bits in args.bits:
            k_pad, n_pad = -(-k // 32) * 32, -(-n // 16) * 16
            codes = torch.randint(0, 1 << bits, (k_pad, n_pad), dtype=torch.uint8, generator=gen)
            # each build gets the codes in its own 3-bit layout (revisions before the layouts existed: planes)
            qweights = {id(module): cpu_gemm.pack(codes, bits, layout_of(module)) for module in (a, b)}
            groups = -(-k_pad // args.group_size)
            scales = torch.rand(groups, n_pad, generator=gen) * 0.01
            zeros = torch.rand(groups, n_pad, generator=gen) * (1 << bits)
            dense = torch.randn(n, k, generator=gen)
            cells = []
            for m in args.rows:
                x = torch.randn(m, k, generator=gen)
                call = lambda module: module.gptq_matmul(x, None, qweights[id(module)], scales, zeros, None, bits,
                                                         args.group_size, n, cpu_gemm.KERNELS[args.kernel])
                try:
                    old = call(a)
                except RuntimeError as error:  # e.g. a revision from before the kernel was added
                    raise SystemExit(f"the kernel at {args.rev} cannot run {args.kernel!r}: {error}") from error
                if not torch.allclose(old, call(b), rtol=1e-4, atol=1e-3):
                    raise SystemExit(f"the two builds disagree on {n}x{k} {bits}-bit at {m} rows")
                t_a = min(per_call_us(lambda: call(a)), per_call_us(lambda: call(a)))
                t_b = min(per_call_us(lambda: call(b)), per_call_us(lambda: call(b)))
                t_dense = per_call_us(lambda: F.linear(x, dense))
                cells.append(f"{m} rows {t_a:8.1f} -> {t_b:8.1f} ({t_a / t_b:4.2f}x; fp32 {t_dense / t_b:4.2f}x)")
            print(f"{n}x{k} {bits}-bit | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
