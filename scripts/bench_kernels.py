"""Benchmark the quantized-linear backends against a dense ``F.linear`` measured in the same run.

For every weight shape [out, in], bit width and input row count it times each kernel of each
backend that supports the layer on this device, and ``auto`` (the layer ``auto`` builds, through
its own ``forward``, including the time ``auto`` does not see: row counts between the ones it
measured), and prints speed-ups over dense fp32 (``> 1`` = faster). ``bytes`` is the bound from
weight bytes alone: dense weight bytes / packed weight bytes (codes + scales + zeros). Dense, every
kernel and ``auto`` are timed in turn, ``--rounds`` times over, and each one's best round counts.

    python scripts/bench_kernels.py                       # the issue's shapes and rows, 4-bit g128
    python scripts/bench_kernels.py --bits 2 3 4 8 --quick
    python scripts/bench_kernels.py --markdown bench.md   # also write the table
    python scripts/bench_kernels.py --cold 512             # weights not in cache, as in a real model

By default one weight is timed over and over, so it sits in the CPU caches (small layers fit
entirely). ``--cold MB`` cycles through enough copies of every layer (dense and quantized alike)
that the dense ones span that many MB, so each call reads its weight from memory, as a model's
forward pass does.

``auto``'s choice comes from this machine's timing cache when it timed the same layer spec before
(``(timed earlier on this machine: autotune cache)`` beside it, tuning 0 s);
``LIGHTNING_GPTQ_AUTOTUNE_CACHE=0`` makes it time afresh.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch
import torch.nn.functional as F

from lightning_gptq.kernels.packing import pack_rows, unpack_rows
from lightning_gptq.nn import AUTO, LayerSpec, backends, build, choose
from lightning_gptq.nn.timing import random_layer, time_call, worth_timing

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096), (4096, 11008)]  # [out, in]
ROWS = [1, 4, 16, 128, 2048]
MAX_REPS = 10_000  # repeats within --budget: cold runs need many calls so that the median is not one copy's luck


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def packed_bytes(layer) -> int:
    return sum(t.numel() * t.element_size() for k, t in layer.packed_tensors().items() if k != "g_idx")


class Cycle:
    """Calls ``fn(item)`` on the next of ``items`` each time (one item: always the same, cache-hot).
    Built after one call on every item, so first touches and lazy set-up are not timed."""

    def __init__(self, items, fn):
        self.items, self.fn, self.i = items, fn, 0
        for item in items:
            fn(item)

    def __call__(self):
        self.i = (self.i + 1) % len(self.items)
        return self.fn(self.items[self.i])


@torch.no_grad()
def bench_layer(spec: LayerSpec, rows: list[int], budget_s: float, cold_mb: float, every: bool = False,
                rounds: int = 3) -> list[dict]:
    """One line per row count; a kernel below 0.1x dense and falling further behind is not timed at larger
    row counts (as ``auto`` does) unless ``every``."""
    dtype = getattr(torch, spec.dtype)
    gen = torch.Generator().manual_seed(0)
    dense_bytes = spec.out_features * spec.in_features * dtype.itemsize
    copies = max(1, int(cold_mb * 2**20 // dense_bytes)) if cold_mb else 1
    dense_ws = [torch.randn(spec.out_features, spec.in_features, generator=gen).to(spec.device, dtype) for _ in range(copies)]
    start = time.perf_counter()
    auto_layer = build(spec, AUTO)
    tune_s = time.perf_counter() - start
    autos = [auto_layer] + [build(spec, AUTO) for _ in range(copies - 1)]
    for i, layer in enumerate(autos):
        layer.load_state_dict(random_layer(type(layer), spec, seed=i).state_dict())
    layers = {name: [random_layer(cls, spec, seed=i) for i in range(copies)]
              for name, cls in backends().items() if cls.unsupported(spec) is None}
    if cold_mb and spec.device == "cuda":
        # A quantized copy is a quarter of an fp16 one: as many copies as the dense weight's would sit in a GPU's L2
        # (50 MB on an H100) while dense streams from HBM. Each candidate gets copies spanning cold_mb of its own
        # bytes (same codes, other memory: copying is fast where drawing codes is not). (CPUs keep the rule above:
        # there the dense copies are fp32 and the quantized ones span more than the last-level cache.)
        for copies_of in [autos, *layers.values()]:
            wanted = min(64, -(-int(cold_mb * 2**20) // packed_bytes(copies_of[0])))
            copies_of += [copy.deepcopy(copies_of[len(copies_of) % copies]) for _ in range(wanted - len(copies_of))]
    bound = dense_bytes / packed_bytes(auto_layer)
    out = []
    history: dict[str, list[float]] = {}
    for m in rows:
        x = torch.randn(m, spec.in_features, generator=gen).to(spec.device, dtype)
        calls = {"dense": Cycle(dense_ws, lambda w: F.linear(x, w))}
        for name, copies_of in layers.items():
            for kernel in copies_of[0].kernels:
                key = f"{name}/{kernel}"
                if every or worth_timing(history.get(key, [])):  # else shown as "–"
                    calls[key] = Cycle(copies_of, lambda q, kernel=kernel: q.run(kernel, x))
        calls["auto"] = Cycle(autos, lambda q: q(x))
        # Interleaved rounds, each candidate's best round: this machine's speed drifts within seconds, and a
        # baseline timed once, before the others, put `auto` at 0.68x and the kernel it ran at 1.04x in the same row.
        seconds: dict[str, float] = {}
        for round_ in range(rounds):
            for key, call in calls.items():
                t = time_call(call, spec.device, budget_s / rounds, MAX_REPS, min_reps=1, warmup=round_ == 0)
                seconds[key] = min(seconds.get(key, float("inf")), t)
        dense = seconds.pop("dense")
        row = {"shape": f"{spec.out_features}x{spec.in_features}", "bits": spec.bits, "rows": m, "dense_ms": 1e3 * dense,
               "dtype": spec.dtype, "bytes": bound, "tune_s": tune_s}
        for key, t in seconds.items():
            row[key] = dense / t
            if key != "auto":
                history.setdefault(key, []).append(row[key])
        row["auto_path"] = f"{auto_layer.backend}/{auto_layer.kernel_for(m)}"
        out.append(row)
        print(format_row(row), flush=True)
    return out


def columns(rows: list[dict]) -> list[str]:
    fixed = {"shape", "bits", "rows", "dense_ms", "dtype", "bytes", "tune_s", "auto", "auto_path"}
    return sorted({k for r in rows for k in r} - fixed)


def format_row(row: dict) -> str:
    kernels = "  ".join(f"{k} {row[k]:.2f}x" for k in sorted(row) if "/" in k and k != "auto_path")
    return (f"{row['shape']:>11} {row['bits']}-bit rows {row['rows']:>4}: dense {row['dtype']} {row['dense_ms']:8.3f} ms | "
            f"auto {row['auto']:.2f}x ({row['auto_path']}) | {kernels} | bytes bound {row['bytes']:.1f}x")


def bench_packing(bits: int, out_features: int = 11008, in_features: int = 4096) -> str:
    """Seconds to pack and unpack one layer's codes into/from the checkpoint layout (median of 3)."""
    codes = torch.randint(0, 1 << bits, (in_features, out_features), dtype=torch.uint8)
    pack = time_call(lambda: pack_rows(codes, bits), budget_s=0, max_reps=3)
    packed = pack_rows(codes, bits)
    unpack = time_call(lambda: unpack_rows(packed, bits, in_features), budget_s=0, max_reps=3)
    assert torch.equal(unpack_rows(packed, bits, in_features), codes)
    return f"{bits}-bit {out_features}x{in_features}: pack {pack:.3f} s, unpack {unpack:.3f} s (round trip exact)"


def markdown(rows: list[dict]) -> str:
    cols = columns(rows)
    head = ["shape [out×in]", "bits", "rows", f"dense {rows[0]['dtype']} ms", "**auto**", "auto path", *cols, "bytes bound"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["shape"], str(r["bits"]), str(r["rows"]), f"{r['dense_ms']:.3f}", f"**{r['auto']:.2f}×**", r["auto_path"],
                 *[f"{r[c]:.2f}×" if c in r else "–" for c in cols], f"{r['bytes']:.1f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[4])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--rows", type=int, nargs="+", default=ROWS)
    parser.add_argument("--shapes", nargs="+", default=None, help="OUTxIN, e.g. 4096x4096")
    parser.add_argument("--quick", action="store_true", help="the three SmolLM2 shapes and 4096x4096 only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--budget", type=float, default=0.2, help="seconds of repeats per timing, over all rounds")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each candidate's best round counts")
    parser.add_argument("--cold", type=float, default=0, metavar="MB",
                        help="cycle through copies of each layer whose dense weights span this many MB (0: one, cache-hot)")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    parser.add_argument("--every", action="store_true",
                        help="time every kernel at every row count (default: as auto, a kernel below 0.1x dense that "
                             "falls further behind is not timed at larger row counts and shows as -)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES[:4] if args.quick else SHAPES
    print(f"# {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device} {args.dtype}, "
          f"group size {args.group_size}, act-order {args.act_order}, asym, "
          + (f"cold: weights cycled through {args.cold:g} MB of dense copies" if args.cold else "hot: one weight, in cache"))
    from lightning_gptq.kernels import cpu_gemm

    if not cpu_gemm.unavailable():  # which dot product the int8 kernels run on this CPU
        print(f"# cpu-packed int8 dot product: {cpu_gemm.int8_dot_isa()}")
    for bits in args.bits:
        print("packing:", bench_packing(bits), flush=True)
    rows = []
    for bits in args.bits:
        for out_f, in_f in shapes:
            spec = LayerSpec(in_f, out_f, bits, args.group_size, False, args.act_order, False, args.device, args.dtype)
            rows += bench_layer(spec, args.rows, args.budget, args.cold, args.every, args.rounds)
            print(f"  auto for {spec.describe()}: {choose(spec).describe()} (tuning took {rows[-1]['tune_s']:.1f} s)")
    table = markdown(rows)
    print()
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
