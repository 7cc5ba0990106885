"""How ``auto`` times a candidate: the harness, not the choice (that is :mod:`.selection`'s).

:func:`time_call` gives the median seconds of one call (on CUDA: between events, per call of a batch).
:func:`time_kernels` times every allowed kernel of a set of candidate layers, and a dense ``F.linear`` of the
same shape as the yardstick, at several input row counts: each row count in ``ROUNDS`` interleaved rounds,
up to ``COLD_ROWS`` rows on CPU with the weights coming from memory (each call on the next of enough copies
to overflow the last-level cache), and a kernel far behind dense and falling further is dropped at the
larger row counts (:func:`worth_timing`). Candidates are built on random codes by :func:`random_layer`.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .quant_linear import LayerSpec, QuantLinear

log = logging.getLogger("lightning_gptq")

#: A kernel slower than this fraction of dense ``F.linear``'s speed at two row counts in a row, and losing
#: ground to it, is not timed at larger row counts: on CPUs without fast bf16, a bf16 matmul of 1,024 rows
#: on a 4096×11008 layer runs at 1% of fp32's speed and would take minutes to time, for a kernel that
#: cannot win.
HOPELESS = 0.1

#: Each row count is timed in this many rounds, every candidate once per round, and a candidate's best round
#: counts: a burst of other work on the cores (these machines are shared) then spoils one round of one
#: candidate, not the choice. The time per candidate is about the same as one long timing.
ROUNDS = 3

#: Calls of up to this many rows are bound by reading the weight, and in a model's forward pass that weight comes
#: from memory (every other layer's weights were read since its last call). They are timed that way: each call
#: takes the next of enough copies of the layer (and of the dense weight) to overflow the CPU's last-level cache.
#: Timed in cache, `auto` took `blocked` at 4 rows on the SmolLM2 shapes where `gemm` runs 1.4-1.8x faster from
#: memory (scripts/bench_kernels.py --cold, AVX2 EPYC). Larger row counts are bound by arithmetic: one copy.
COLD_ROWS = 16
#: At most this many copies of a layer (tiny layers would otherwise need thousands to fill the cache).
MAX_COPIES = 512


def random_layer(cls: type[QuantLinear], spec: LayerSpec, seed: int = 0) -> QuantLinear:
    """A ``cls`` layer of ``spec`` with random codes, grid, ``g_idx`` (a random order when act-order) and bias:
    a candidate to time (tests and scripts use it too; it is not part of ``lightning_gptq.nn``'s API)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, spec.dtype)
    layer = cls(spec.in_features, spec.out_features, bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
                bias=spec.bias, dtype=dtype, device=spec.device)
    n_groups = layer.scales.shape[0]
    maxq = (1 << spec.bits) - 1
    codes = torch.randint(0, maxq + 1, (spec.out_features, spec.in_features), generator=gen)
    scales = torch.rand(spec.out_features, n_groups, generator=gen) * 0.02 + 1e-3
    zeros = torch.full_like(scales, (maxq + 1) // 2, dtype=torch.int32) if spec.sym else \
        torch.randint(0, maxq + 1, (spec.out_features, n_groups), generator=gen, dtype=torch.int32)
    width = spec.group_size if spec.group_size > 0 else spec.in_features
    order = torch.randperm(spec.in_features, generator=gen) if spec.act_order else torch.arange(spec.in_features)
    g_idx = (torch.argsort(order) // width).to(torch.int32)
    bias = torch.randn(spec.out_features, generator=gen) if spec.bias else None
    layer.set_weight(codes.to(spec.device), scales.to(spec.device), zeros.to(spec.device), g_idx.to(spec.device),
                     None if bias is None else bias.to(spec.device))
    return layer


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: str = "cpu", budget_s: float = 0.05, max_reps: int = 25, min_reps: int = 3,
              warmup: bool = True) -> float:
    """Median seconds of ``fn()`` after one warm-up, repeating within ``budget_s`` (at least ``min_reps`` times).
    On CUDA: seconds per call of back-to-back calls between CUDA events (median of 3 batches), so
    the GPU's time is measured, and the launch cost where it is larger."""
    if device == "cuda":
        return _time_cuda(fn, budget_s)
    if warmup:
        fn()
        _sync(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < min_reps or (spent < budget_s and len(times) < max_reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return sorted(times)[len(times) // 2]


def _time_cuda(fn, budget_s: float) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    end.synchronize()
    per_call = start.elapsed_time(end) / 3e3
    reps = int(min(2000, max(5, budget_s / 3 / max(per_call, 1e-7))))
    times = []
    for _ in range(3):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return sorted(times)[1]


#: Timings during which other processes kept more than this share of the CPUs busy are used but not stored:
#: on 2 shared cores a quality run beside the timing turned every SmolLM2 kernel's 30-90 µs into ~8 ms (one
#: scheduler slice each), and the cache then kept a random kernel for that shape on this machine for good.
BUSY_ELSEWHERE = 0.25


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy ticks of every CPU, including time stolen by the hypervisor; this process's ticks) from /proc, or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return user + nice + system + irq + softirq + steal, int(own[11]) + int(own[12])  # utime, stime
    except (OSError, ValueError, IndexError):
        return None


class BusyElsewhere:
    """Measures, between construction and :meth:`share`, the fraction of all CPUs' time that other processes (or the
    hypervisor) took: ``with``-free, cheap (two reads of /proc). None where /proc cannot be read."""

    def __init__(self):
        self.start, self.wall = _cpu_ticks(), time.monotonic()

    def share(self) -> float | None:
        end = _cpu_ticks()
        elapsed = time.monotonic() - self.wall
        if self.start is None or end is None or elapsed <= 0:
            return None
        import os

        ticks = os.sysconf("SC_CLK_TCK") * elapsed * (os.cpu_count() or 1)
        others = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return max(0.0, others / ticks)


@functools.cache
def cache_bytes() -> int:
    """The CPU's last-level cache in bytes (Linux sysfs; 32 MiB where it cannot be read)."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
            sizes.append(int(text[:-1]) * {"K": 2**10, "M": 2**20, "G": 2**30}[text[-1]] if text[-1] in "KMG" else int(text))
        except (OSError, ValueError, KeyError, IndexError):
            continue
    return max(sizes, default=32 * 2**20)


def _copies(item, nbytes: int) -> list:
    """``item`` and enough deep copies of it that together they span twice the last-level cache."""
    count = min(MAX_COPIES, max(1, -(-2 * cache_bytes() // max(nbytes, 1))))
    return [item] + [copy.deepcopy(item) for _ in range(count - 1)]


def _cycle(items: list, fn):
    """A call that runs ``fn`` on the next of ``items`` each time."""
    at = [0]

    def call():
        at[0] = (at[0] + 1) % len(items)
        return fn(items[at[0]])
    return call


def _layer_bytes(layer: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*layer.buffers(), *layer.parameters()])


def worth_timing(ratios: list[float]) -> bool:
    """Whether a kernel whose speed ratios to dense (dense time / its time) at the row counts timed so far
    were ``ratios`` should be timed at the next, larger row count: not when the last two are both below
    ``HOPELESS`` and falling (two, so that one timing disturbed by other work cannot drop a kernel)."""
    return len(ratios) < 2 or not (max(ratios[-2:]) < HOPELESS and ratios[-1] < ratios[-2])


@torch.no_grad()
def time_kernels(spec: LayerSpec, layers: dict[str, QuantLinear], kernels: dict[str, list[str]],
                 rows: tuple[int, ...]) -> tuple[dict[str, dict[int, float]], dict[int, float]]:
    """Seconds per call of each of ``kernels[name]`` of each candidate ``layers[name]``, and of a dense
    ``F.linear`` of ``spec``'s shape and dtype, at each row count: ``({"backend/kernel": {rows: s}}, {rows: s})``.
    A kernel that :func:`worth_timing` gives up on is left out at the larger row counts (a backend's last kernel,
    and its last exact one, never are); on CPU, up to ``COLD_ROWS`` rows with the weights coming from memory."""
    dtype = getattr(torch, spec.dtype)
    gen = torch.Generator().manual_seed(1)
    dense_weight = torch.randn(spec.out_features, spec.in_features, generator=gen).to(spec.device, dtype)
    times: dict[str, dict[int, float]] = {}
    dense: dict[int, float] = {}
    timing = {name: list(names) for name, names in kernels.items()}  # less the kernels given up on
    cold = None  # copies of the dense weight and of each layer, for the row counts timed from memory (COLD_ROWS)
    for m in rows:
        x = torch.randn(m, spec.in_features, generator=gen).to(spec.device, dtype)
        if spec.device == "cpu" and m <= COLD_ROWS:
            if cold is None:
                cold = {"dense": _copies(dense_weight, dense_weight.numel() * dense_weight.element_size())}
                cold.update({name: _copies(layer, _layer_bytes(layer)) for name, layer in layers.items()})
            copies = cold
        else:
            cold = None  # past COLD_ROWS: the copies are freed
            copies = {"dense": [dense_weight], **{name: [layer] for name, layer in layers.items()}}
        calls = {"dense": _cycle(copies["dense"], lambda w: F.linear(x, w))}
        for name in layers:
            for kernel in timing[name]:
                calls[f"{name}/{kernel}"] = _cycle(copies[name], lambda layer, kernel=kernel: layer.run(kernel, x))
        seconds: dict[str, float] = {}  # each call's best round
        for round_ in range(ROUNDS):  # interleaved: see ROUNDS
            for key, call in calls.items():
                t = time_call(call, spec.device, budget_s=0.05 / ROUNDS, min_reps=1, warmup=round_ == 0)
                seconds[key] = min(seconds.get(key, math.inf), t)
        dense[m] = seconds.pop("dense")
        for key, t in seconds.items():
            times.setdefault(key, {})[m] = t
        for name, layer in layers.items():
            for kernel in list(timing[name]):
                ratios = [dense[r] / t for r, t in times[f"{name}/{kernel}"].items()]
                exact_left = [k for k in timing[name] if k in layer.exact]
                if not worth_timing(ratios) and len(timing[name]) > 1 and exact_left != [kernel]:
                    timing[name].remove(kernel)
                    log.debug("auto: %s/%s not timed above %d rows (%.3fx dense)", name, kernel, m, ratios[-1])
    return times, dense
