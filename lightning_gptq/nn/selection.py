"""``backend="auto"``: pick the fastest backend and kernels for a layer by timing them here.

CPUs differ (this project's machines have been AVX2-only AMD and AVX-512/AMX Intel) and so does
the fastest path, so nothing is assumed: the first time a layer spec (shape, bits, group, act-order,
device, dtype) is seen, every backend that supports it is built on random codes of that spec and
each of its kernels within ``AUTO_TOLERANCE`` is timed at the row counts ``ROWS``, next to a dense
``F.linear`` of the same shape as the yardstick (how: :mod:`.timing`). The backend with the best
geometric-mean time over those row counts wins, and its fastest kernel at each row count becomes the
layer's dispatch. Results are cached per process (and thread count) and on disk per machine
(``autotune_cache``: a later load on the same machine reuses them); :func:`choices` reports them for
the run summary.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from . import autotune_cache
from .quant_linear import AUTO, LayerSpec, QuantLinear, backends, quant_linear_class
from .timing import BUSY_ELSEWHERE, BusyElsewhere, random_layer, time_kernels

log = logging.getLogger("lightning_gptq")

#: input row counts each candidate is timed at (decode: 1-4 rows; prefill and calibration: more)
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


_CACHE: dict[tuple, Choice] = {}  # (spec, backend asked for, thread count) -> this process's choice


def choices() -> list[Choice]:
    """Every choice made (or read from the disk cache) in this process, for the run summary."""
    return list(_CACHE.values())


def candidates(spec: LayerSpec) -> dict[str, type[QuantLinear]]:
    """Every registered backend that supports ``spec`` (``torch`` always does)."""
    return {name: cls for name, cls in backends().items() if cls.unsupported(spec) is None}


@torch.no_grad()
def measure(spec: LayerSpec, backend_classes: dict[str, type[QuantLinear]], rows: tuple[int, ...] = ROWS) -> Choice:
    """Time every kernel within ``AUTO_TOLERANCE`` of every given backend on a random layer of ``spec``, and a
    dense ``F.linear``, at each row count (:func:`.timing.time_kernels`); the backend with the least geometric-mean
    time of its fastest kernel per row count wins, with those kernels as its dispatch."""
    layers = {name: random_layer(cls, spec) for name, cls in backend_classes.items()}
    allowed = {name: [k for k in layer.kernels if layer.tolerance_of(k) <= AUTO_TOLERANCE] for name, layer in layers.items()}
    times, dense = time_kernels(spec, layers, allowed, rows)
    fastest = lambda name, kernels: tuple(
        (m, min((times[f"{name}/{k}"][m], k) for k in kernels if m in times.get(f"{name}/{k}", {}))[1]) for m in rows)
    score = lambda name, dispatch: sum(math.log(times[f"{name}/{k}"][m]) for m, k in dispatch)
    best = min(layers, key=lambda name: score(name, fastest(name, allowed[name])))
    return Choice(spec, best, fastest(best, allowed[best]), fastest(best, layers[best].exact), times, dense)


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
                start, busy = time.perf_counter(), BusyElsewhere()
                choice = measure(spec, classes)
                elsewhere = busy.share() if spec.device == "cpu" else None
                log.info("auto: timed in %.1f s", time.perf_counter() - start)
                if elsewhere is not None and elsewhere > BUSY_ELSEWHERE:
                    log.warning("auto: other work kept %.0f%% of the CPUs busy while %s was timed: this run uses the "
                                "choice, the timing cache does not keep it", 100 * elsewhere, spec.describe())
                else:
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
