"""Check the CUDA backends (Triton, cuda-int4) on a GPU: correctness against the fp64 oracle, speed, end to end.

    python scripts/check_gpu.py correctness   # every bit width, group, act-order, ragged K, dtype, row count
    python scripts/check_gpu.py bench         # scripts/bench_kernels.py's shapes against fp16 F.linear
    python scripts/check_gpu.py table         # the issue's table: 4096-wide shapes, 1/16/128/2048 rows, cold weights
    python scripts/check_gpu.py --all         # one prepared run on a bare GPU machine (below)

``--all`` is made for a GPU machine that sees only the checkout and no package index: first
``python scripts/make_gpu_bundle.py`` here (writes the git-ignored ``.gpu-check/``: 12 of the 30 blocks of a
SmolLM2 GGUF, text, and wheels of the pure-Python packages the GPU image lacks), then on the GPU,
with ``.gpu-check`` carried: ``python3 scripts/check_gpu.py --all``. It installs the wheels and the
project under ``/tmp``, then runs, each under its own time limit and each reported even if another
fails: the CUDA tests, ``correctness``, ``table``, ``validate`` of the 12-block SmolLM2 unquantized in fp16 (the
baseline), and a 16-window ``fit`` of the same model in fp16 (perplexity and latency after it). Markdown and the full log go to ``$OUT`` (or ``--out``); at most 480 s in all, under the device tool's
600 s per command: each part has its own limit (they add up to 530, as no part's time on a GPU has been measured),
and a part that would run past 480 s in all is cut short.

``correctness`` is meant to run with ``LIGHTNING_GPTQ_TRITON_AUTOTUNE=0`` (one launch configuration,
so the many small shapes do not each time a dozen); ``bench`` autotunes, and checks each tuned layer
against the oracle again before timing it. Exits non-zero on any error above the tolerance.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / ".gpu-check"
if __name__ == "__main__" and "--all" in sys.argv:
    LayerSpec = random_layer = TritonQuantLinear = CudaInt4QuantLinear = None  # imported after set-up, in the parts
else:
    from lightning_gptq.nn import LayerSpec
    from lightning_gptq.nn.cuda_int4 import CudaInt4QuantLinear
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
    reason = CudaInt4QuantLinear.unavailable()
    print(f"cuda-int4: {'available' if reason is None else 'unavailable: ' + reason}", flush=True)
    classes = [TritonQuantLinear] + ([CudaInt4QuantLinear] if reason is None else [])
    for cls in classes:
        for dtype in dtypes:
            for bits in bits_list:
                worst, cases = 0.0, 0
                for (out_f, in_f), group_size, act_order in CASES:
                    spec = LayerSpec(in_f, out_f, bits, group_size, False, act_order, True, "cuda", dtype)
                    if cls.capabilities.unsupported(spec):
                        continue
                    cases += 1
                    layer = random_layer(cls, spec)
                    gen = torch.Generator().manual_seed(bits)
                    for rows in (1, 3, 16, 17, 100, 512):
                        x = torch.randn(rows, in_f, generator=gen).to("cuda", getattr(torch, dtype))
                        for kernel in layer.kernels:
                            error = relative_error(layer, kernel, x)
                            worst = max(worst, error)
                            allowed = max(TOLERANCE[dtype], cls.tolerance_of(kernel))
                            if not error <= allowed:
                                failures += 1
                                print(f"FAIL {cls.backend} {spec.describe()} rows {rows} {kernel}: {error:.2e} > {allowed:g}")
                if cases:
                    print(f"{cls.backend:>9} {dtype:>8} {bits}-bit: worst relative error {worst:.2e} over {cases} shapes "
                          f"x 6 row counts x {len(cls.kernels)} kernels", flush=True)
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


TABLE_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # [out, in]
TABLE_ROWS = [1, 16, 128, 2048]


def table(cold_mb: float, budget_s: float) -> int:
    """Every backend's kernels and ``auto`` against fp16 ``F.linear``, 4-bit g128, weights cycled from HBM."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_kernels import bench_layer, markdown

    rows = []
    for out_f, in_f in TABLE_SHAPES:
        rows += bench_layer(LayerSpec(in_f, out_f, 4, 128, False, False, False, "cuda", "float16"), TABLE_ROWS, budget_s,
                            cold_mb, every=True, rounds=2)
        print(markdown(rows[-len(TABLE_ROWS):]), flush=True)
    print()
    print(markdown(rows))
    return 0


# -- --all: one prepared run on a bare GPU machine ---------------------------------------------------
SITE = Path("/tmp/lightning-gptq-site")
TOTAL_S = 480  # the whole of --all on a GPU, set-up included (each part is also stopped at its own limit)


def setup() -> dict[str, str]:
    """Install what the GPU image lacks (the bundle's wheels, then this project) under ``SITE``; the
    environment the parts run in."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SITE)}
    shutil.rmtree(SITE, ignore_errors=True)
    wheels = sorted(str(w) for w in (BUNDLE / "wheels").glob("*.whl"))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", str(SITE)]
    subprocess.run([*pip, *wheels], check=True)
    subprocess.run([*pip, "--no-build-isolation", str(ROOT)], check=True)
    return env


def cli(stage: str, dtype: str, out: Path, *extra: str) -> list[str]:
    """``python -m lightning_gptq <stage>`` on the bundle's SmolLM2 and text, in ``dtype``, writing under ``out``."""
    model = next(BUNDLE.glob("SmolLM2-*blocks.gguf"))
    return [sys.executable, "-m", "lightning_gptq", stage, f"--config={ROOT / 'configs/smollm2-135m.yaml'}",
            f"--model.model={BUNDLE}", f"--model.gguf_file={model.name}", f"--model.dtype={dtype}",
            f"--data.eval_paths={{wikitext2: {BUNDLE / 'data/wiki.test.raw'}}}", f"--trainer.default_root_dir={out}",
            f"--trainer.logger.init_args.save_dir={out}", "--trainer.enable_progress_bar=false", *extra]


#: WikiText-2 perplexity of the bundle's model from ``--all --cpu`` (fp32, 2 CPU cores, bundle ``--keep 0-2,21-29``):
#: the scores the GPU run's are compared with (target: within 1%), and ``config_settings_digest()`` of the config they
#: were measured with (``tests/test_gpu_check.py`` fails when the config's settings change: rerun ``--cpu``, update
#: both). Rerun it after a change to the solver or the bundle too.
#: Measured 2026-12-06 on an AMD EPYC (AVX-512); the fit moves between CPUs (fp32 kernels differ, GPTQ cascades).
CPU_PERPLEXITY = {"fit": 3133.6379, "validate": 2652.7698}
CPU_PERPLEXITY_CONFIG = "61dce026f9289863"
#: The same two in bf16 on the same CPU (``--model.dtype=bfloat16``): unquantized the model moves 0.14%, but its fit
#: 3.4%, as 16-bit rounding changes codes that GPTQ's cascade carries through 12 shallow-and-deep blocks. A GPU fit
#: in fp16 can miss 1% of the fp32 fit for that reason alone; the kernels' own check is ``correctness``.
CPU_PERPLEXITY_BF16 = {"fit": 3028.3635, "validate": 2656.3755}


def config_settings_digest(path: Path = ROOT / "configs/smollm2-135m.yaml") -> str:
    """sha256 (first 16 hex digits) of the config's settings: its YAML parsed, so comments and layout do not count."""
    import yaml  # (here: the --all parent process runs before the bundle's packages are installed)

    settings = json.dumps(yaml.safe_load(path.read_text()), sort_keys=True)
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


def against_cpu(stage: str, text: str) -> str | None:
    """The line comparing a stage's WikiText-2 perplexity in ``text`` with ``CPU_PERPLEXITY``."""
    score = re.search(r"wikitext2 perplexity ([0-9.]+)", text)
    if stage not in CPU_PERPLEXITY or not score:
        return None
    ppl, cpu = float(score.group(1)), CPU_PERPLEXITY[stage]
    try:
        stale = "" if config_settings_digest() == CPU_PERPLEXITY_CONFIG else \
            " (the CPU figure was measured with other config settings: rerun --all --cpu)"
    except (ImportError, OSError, ValueError) as error:  # the report must not die on its footnote
        stale = f" (the config's settings could not be compared: {error})"
    bf16 = CPU_PERPLEXITY_BF16[stage]
    return f"perplexity {ppl:.4f} against the CPU run's {cpu:.4f}: {ppl / cpu:.4f}x " \
           f"({'within' if abs(ppl / cpu - 1) <= 0.01 else 'NOT within'} 1%){stale}; the CPU's bf16 run scored " \
           f"{bf16:.4f} ({bf16 / cpu:.4f}x fp32)"


def steps(out: Path, accelerator: str) -> list[tuple[str, list[str], int, dict[str, str]]]:
    """(title, command, seconds allowed, extra environment) of each part of ``--all``."""
    me = [sys.executable, str(Path(__file__).resolve())]
    dtype, device = "float16" if accelerator == "gpu" else "float32", f"--trainer.accelerator={accelerator}"
    fit = cli("fit", dtype, out / "fit", f"--data.calibration={BUNDLE / 'data/wikipedia-vital-leads.txt'}",
              "--data.nsamples=16", f"--model.output_dir={out / 'fit' / 'model'}", device)
    base = cli("validate", dtype, out / "baseline", device)
    return [
        ("CUDA tests (compiled kernels in CUDA graphs, fp16 fit + compiled decode; cuda-int4 emulated)",
         [sys.executable, "-m", "pytest", "-q", "-rs", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT),
          str(ROOT / "tests/test_cuda.py"), str(ROOT / "tests/test_cuda_int4.py")], 100,
         {"LIGHTNING_GPTQ_TRITON_AUTOTUNE": "0"}),  # (each test's shapes would autotune a dozen compiles each)
        # 3 and 4 bits run the same compiled kernels (nibbles), 8 the byte ones: every kernel variant, few compiles
        ("correctness against the fp64 oracle", [*me, "correctness", "--dtypes", "float16", "bfloat16", "--bits", "3",
                                                 "8"], 50, {"LIGHTNING_GPTQ_TRITON_AUTOTUNE": "0"}),
        ("kernel table: 4-bit g128 against fp16 F.linear", [*me, "table"], 90, {}),
        # the baseline before the fit: it is cheaper, and what the fit's latency is compared with; both time a
        # compiled decode in a CUDA graph (an Inductor compile each)
        ("validate: the same model unquantized (baseline)", base, 90, {}),
        ("fit: 16 windows, SmolLM2 12 blocks", fit, 200, {}),
    ]


def run_all(out: Path, accelerator: str = "gpu") -> int:
    out.mkdir(parents=True, exist_ok=True)
    log, report = open(out / "check_gpu.log", "w"), [f"# check_gpu.py --all, {time.strftime('%Y-%m-%d %H:%M')}"]
    start = time.perf_counter()
    env = setup()
    report.append(f"set-up (wheels and the project into {SITE}): {time.perf_counter() - start:.0f} s")
    failures = 0
    for title, cmd, limit, extra in steps(out, accelerator):
        began = time.perf_counter()
        if accelerator == "cpu" and cmd[2] in ("correctness", "table"):
            report.append(f"\n## {title}: not run (--cpu: it needs a CUDA GPU)")
            continue
        if accelerator == "gpu":  # the bound on the whole run, set-up included
            limit = min(limit, int(TOTAL_S - (time.perf_counter() - start)))
            if limit < 10:
                report.append(f"\n## {title}: not run ({TOTAL_S} s spent)")
                failures += 1
                continue
        try:  # not from the checkout: its lightning_gptq/ would shadow the installed one (kernels/ maps inside it)
            limit *= 1 if accelerator == "gpu" else 6  # two CPU cores: the rehearsal of the run, not its time
            proc = subprocess.run(cmd, env={**env, **extra}, cwd=out, capture_output=True, text=True, timeout=limit)
            status, text = f"exit {proc.returncode}", proc.stdout + proc.stderr
            failures += proc.returncode != 0
        except subprocess.TimeoutExpired as expired:
            status = f"stopped at its {limit} s limit"
            text = "".join(b.decode() if isinstance(b, bytes) else (b or "") for b in (expired.stdout, expired.stderr))
            failures += 1
        log.write(f"\n===== {title}: {' '.join(cmd)}\n{text}")
        log.flush()
        keep = [line for line in text.splitlines() if line.startswith(("|", "FAIL", "#")) or re.search(
            r"perplexity|latency|worst relative|cuda-int4|passed|failed|error|Error|auto:|rewrite", line)]
        section = [f"\n## {title}: {status}, {time.perf_counter() - began:.0f} s\n", *keep[-60:]]
        if cmd[2] == "lightning_gptq" and (line := against_cpu(cmd[3], text)):
            section.append(line)
        report += section
        print("\n".join(section), flush=True)
    report.append(f"\n{failures} parts failed; {time.perf_counter() - start:.0f} s in all")
    (out / "check_gpu.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))
    return failures


def main() -> None:
    if "--all" in sys.argv:
        out = Path(os.environ.get("OUT") or "runs/check_gpu")
        if "--out" in sys.argv:
            out = Path(sys.argv[sys.argv.index("--out") + 1])
        sys.exit(1 if run_all(out, "cpu" if "--cpu" in sys.argv else "gpu") else 0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["correctness", "bench", "table"])
    parser.add_argument("--cold", type=float, default=1024, help="MB of dense fp16 copies cycled (L2 is 50+ MB)")
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "float32"])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 128, 2048])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this script checks the Triton backend on a GPU")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    if args.part == "table":
        failures = table(256, args.budget)
    else:
        failures = correctness(args.dtypes, args.bits) if args.part == "correctness" else \
            bench(args.cold, args.budget, args.bits, args.rows)
    print(f"{failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
