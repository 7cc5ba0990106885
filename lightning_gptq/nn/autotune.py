"""``backend="auto"``: pick the fastest backend and kernels for a layer by timing them here.

CPUs differ (this project's machines have been AVX2-only AMD and AVX-512/AMX Intel) and so does
the fastest path, so nothing is assumed: the first time a layer spec (shape, bits, group, act-order,
device, dtype) is seen, every backend that supports it is built on random codes of that spec and
each of its kernels within ``AUTO_TOLERANCE`` is timed at several input row counts, next to a dense
``F.linear`` of the same shape as the yardstick (on CPU, up to ``COLD_ROWS`` rows with the weights coming from
memory, as in a model's forward pass). The backend with the best geometric-mean time over those row counts wins,
and its fastest kernel at each row count becomes the layer's dispatch. Results are cached per
process (and thread count) and on disk per machine (``autotune_cache``: a later load on the same
machine reuses them); :func:`choices` reports them for the run summary.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import autotune_cache
from .head import speed_up_head
from .quant_linear import AUTO, LayerSpec, QuantLinear, backends, quant_linear_class, replace_submodule

log = logging.getLogger("lightning_gptq")

ROWS = (1, 4, 16, 64, 128, 256, 1024)
#: ``auto`` only considers kernels that promise at most this relative error (``tolerance_of``): bf16 paths
#: (about 3e-3) and two-digit int8 activations (3e-5) qualify; one-digit int8 activations (about 5e-3
#: per matmul, but +0.27% perplexity on SmolLM2 against +0.02% for bf16) do not.
AUTO_TOLERANCE = 1e-2


@dataclass
class Choice:
    """The outcome of timing one layer spec: the backend, its dispatch, and every time measured (seconds)."""

    spec: LayerSpec
    backend: str
    dispatch: tuple[tuple[int, str], ...]
    exact_dispatch: tuple[tuple[int, str], ...]
    times: dict[str, dict[int, float]] = field(default_factory=dict)  # "backend/kernel" -> rows -> s
    dense: dict[int, float] = field(default_factory=dict)  # F.linear with a dense weight, same dtype
    cached: bool = False  # read from this machine's timing cache rather than timed in this process

    def speedup(self, rows: int) -> float | None:
        """Dense time / chosen time at ``rows`` (None when nothing was timed: a single choice)."""
        kernel = dict(self.dispatch)[rows]
        if rows not in self.dense:
            return None
        return self.dense[rows] / self.times[f"{self.backend}/{kernel}"][rows]

    def describe(self) -> str:
        parts = ", ".join(f"{r}:{k} {self.speedup(r):.2f}x" if r in self.dense else f"{r}:{k}" for r, k in self.dispatch)
        exact = ", ".join(f"{r}:{k}" for r, k in self.exact_dispatch)
        cached = " (timed earlier on this machine: autotune cache)" if self.cached else ""
        return f"{self.spec.describe()}: {self.backend} [{parts} vs dense {self.spec.dtype}; calibration: {exact}]{cached}"

    def to_dict(self) -> dict:
        return {"spec": self.spec.to_dict(), "backend": self.backend, "dispatch": [list(d) for d in self.dispatch],
                "exact_dispatch": [list(d) for d in self.exact_dispatch],
                "speedup_vs_dense": {r: round(self.speedup(r), 3) for r, _ in self.dispatch if r in self.dense},
                "from_cache": self.cached}

    def to_record(self) -> dict:
        """Everything but the spec, as JSON (the timing cache's entry)."""
        return {"backend": self.backend, "dispatch": [list(d) for d in self.dispatch],
                "exact_dispatch": [list(d) for d in self.exact_dispatch],
                "times": {k: {str(r): t for r, t in v.items()} for k, v in self.times.items()},
                "dense": {str(r): t for r, t in self.dense.items()}}

    @classmethod
    def from_record(cls, spec: LayerSpec, record: dict, classes: dict[str, type[QuantLinear]]) -> "Choice":
        """The inverse of :meth:`to_record`; ``ValueError`` when the record does not fit ``classes``."""
        try:
            backend = record["backend"]
            dispatch = tuple((int(r), str(k)) for r, k in record["dispatch"])
            exact = tuple((int(r), str(k)) for r, k in record["exact_dispatch"])
            times = {str(k): {int(r): float(t) for r, t in v.items()} for k, v in record["times"].items()}
            dense = {int(r): float(t) for r, t in record["dense"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"malformed record: {error!r}") from error
        if backend not in classes:
            raise ValueError(f"backend {backend!r} is not among the candidates {sorted(classes)}")
        kernels, exact_kernels = classes[backend].kernels, classes[backend].exact
        if not dispatch or not exact or any(k not in kernels for _, k in dispatch) or any(k not in exact_kernels for _, k in exact):
            raise ValueError(f"a kernel it names is not one of {backend}'s {kernels}")
        if any(r in dense and r not in times.get(f"{backend}/{k}", {}) for r, k in dispatch):
            raise ValueError("a chosen kernel's time is missing")
        return cls(spec, backend, dispatch, exact, times, dense, cached=True)


_CACHE: dict[tuple, Choice] = {}


def choices() -> list[Choice]:
    return list(_CACHE.values())


def candidates(spec: LayerSpec) -> dict[str, type[QuantLinear]]:
    """Every registered backend that supports ``spec`` (``torch`` always does)."""
    return {name: cls for name, cls in backends().items() if cls.unsupported(spec) is None}


def random_layer(cls: type[QuantLinear], spec: LayerSpec, seed: int = 0) -> QuantLinear:
    """A layer of ``spec`` with random codes and grid, for timing and tests."""
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


def worth_timing(ratios: list[float]) -> bool:
    """Whether a kernel whose speed ratios to dense (dense time / its time) at the row counts timed so far
    were ``ratios`` should be timed at the next, larger row count: not when the last two are both below
    ``HOPELESS`` and falling (two, so that one timing disturbed by other work cannot drop a kernel)."""
    return len(ratios) < 2 or not (max(ratios[-2:]) < HOPELESS and ratios[-1] < ratios[-2])


@torch.no_grad()
def measure(spec: LayerSpec, backend_classes: dict[str, type[QuantLinear]], rows: tuple[int, ...] = ROWS) -> Choice:
    """Time every kernel of every given backend, and a dense ``F.linear``, at each row count (a kernel that
    :func:`worth_timing` gives up on is left out at the larger row counts; a backend's last kernel, and its
    last exact one, never are); on CPU, up to ``COLD_ROWS`` rows with the weights coming from memory."""
    dtype = getattr(torch, spec.dtype)
    gen = torch.Generator().manual_seed(1)
    dense_weight = torch.randn(spec.out_features, spec.in_features, generator=gen).to(spec.device, dtype)
    times: dict[str, dict[int, float]] = {}
    dense: dict[int, float] = {}
    layers = {name: random_layer(cls, spec) for name, cls in backend_classes.items()}
    allowed = {name: [k for k in layer.kernels if layer.tolerance_of(k) <= AUTO_TOLERANCE] for name, layer in layers.items()}
    timing = {name: list(kernels) for name, kernels in allowed.items()}  # less the kernels given up on
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
    fastest = lambda name, kernels: tuple(
        (m, min((times[f"{name}/{k}"][m], k) for k in kernels if m in times.get(f"{name}/{k}", {}))[1]) for m in rows)
    score = lambda name, dispatch: sum(math.log(times[f"{name}/{k}"][m]) for m, k in dispatch)
    best = min(layers, key=lambda name: score(name, fastest(name, allowed[name])))
    return Choice(spec, best, fastest(best, allowed[best]), fastest(best, layers[best].exact), times, dense)


def _layer_bytes(layer: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*layer.buffers(), *layer.parameters()])


def choose(spec: LayerSpec, backend: str = AUTO) -> Choice:
    """The backend (``auto``: any; else just that one) and dispatch for ``spec``, measured once per process,
    or read from this machine's timing cache when it was measured here before (``autotune_cache``)."""
    key = (spec, backend, torch.get_num_threads())
    if key not in _CACHE:
        if backend == AUTO:
            classes = candidates(spec)
        else:
            cls = quant_linear_class(backend)
            reason = cls.unsupported(spec)
            if reason is not None:
                raise ValueError(f"backend {backend!r} cannot hold a {spec.describe()} layer: {reason}")
            classes = {backend: cls}
        if len(classes) == 1 and len(next(iter(classes.values())).kernels) == 1:
            (name, cls), = classes.items()
            choice = Choice(spec, name, ((1, cls.kernels[0]),), ((1, cls.exact[0]),))
        else:
            choice = _stored(spec, backend, classes)
            if choice is None:
                # a large layer takes tens of seconds on a slow CPU: say what the wait is for
                log.info("auto: timing %s's kernels for %s (once per machine)", ", ".join(classes), spec.describe())
                start = time.perf_counter()
                choice = measure(spec, classes)
                log.info("auto: timed in %.1f s", time.perf_counter() - start)
                autotune_cache.store(spec.device, _entry_key(spec, backend, classes), choice.to_record())
            log.info("quantized linear %s", choice.describe())
        _CACHE[key] = choice
    return _CACHE[key]


def _entry_key(spec: LayerSpec, backend: str, classes: dict[str, type[QuantLinear]]) -> str:
    return autotune_cache.entry_key(spec.to_dict(), backend, {name: cls.kernels for name, cls in classes.items()})


def _stored(spec: LayerSpec, backend: str, classes: dict[str, type[QuantLinear]]) -> Choice | None:
    key = _entry_key(spec, backend, classes)
    record = autotune_cache.lookup(spec.device, key)
    if record is None:
        return None
    try:
        return Choice.from_record(spec, record, classes)
    except ValueError as error:
        autotune_cache.forget(spec.device, key, str(error))
        return None


def build(spec: LayerSpec, backend: str = AUTO) -> QuantLinear:
    """An empty layer for ``spec`` from the chosen backend, dispatch set (fill it with ``set_weight``/``load_state_dict``)."""
    choice = choose(spec, backend)
    layer = quant_linear_class(choice.backend)(
        spec.in_features, spec.out_features, bits=spec.bits, group_size=spec.group_size, sym=spec.sym, bias=spec.bias,
        dtype=getattr(torch, spec.dtype), device=spec.device)
    layer.set_dispatch(choice.dispatch, choice.exact_dispatch)
    return layer


def make_quant_linear(original: nn.Module, qweight, backend: str = AUTO) -> QuantLinear:
    """A quantized layer standing in for ``original`` (``nn.Linear`` or GPT-2 ``Conv1D``) from a solver result."""
    bias: Tensor | None = getattr(original, "bias", None)
    out_features, in_features = qweight.codes.shape
    width = qweight.group_size if qweight.group_size > 0 else in_features
    act_order = not torch.equal(qweight.g_idx.long(), torch.arange(in_features, device=qweight.g_idx.device) // width)
    spec = LayerSpec(in_features, out_features, qweight.bits, qweight.group_size, qweight.sym, act_order, bias is not None,
                     qweight.codes.device.type, str(qweight.dtype).removeprefix("torch."))
    layer = build(spec, backend)
    layer.set_weight(qweight.codes, qweight.scales, qweight.zeros, qweight.g_idx, bias)
    return layer


@torch.no_grad()
def to_backend(model: nn.Module, backend: str = AUTO) -> dict[str, str]:
    """Rebuild every ``QuantLinear`` in ``model`` with ``backend`` (``auto``: the fastest for its spec and
    the device it now sits on), through the checkpoint layout; returns ``{layer name: backend}``. With
    ``auto``, the model's fp32 LM head gets the faster GEMV for its decode calls too (``head.speed_up_head``)."""
    chosen = {}
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]:
        spec = layer.spec()
        new = build(spec, backend)
        if type(new) is type(layer):
            layer.set_dispatch(new.dispatch, new.exact_dispatch)
        else:
            new.load_state_dict(layer.state_dict())
            replace_submodule(model, name, new)
        chosen[name] = new.backend
    if backend == AUTO:
        log.info(speed_up_head(model))
    return chosen
