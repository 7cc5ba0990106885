"""Quantized replacements for ``nn.Linear`` (and GPT-2's ``Conv1D``), their backends and registry.

Every backend is a ``QuantLinear`` subclass registered under a name. All of them take and give
the ecosystem's packed GPTQ layout (``qweight``/``qzeros``/``scales``/``g_idx``, see
``lightning_gptq.kernels.packing``), which is what ``state_dict`` holds; a backend may convert it
once into its kernel's own layout in :meth:`QuantLinear.post_init`, as long as it keeps one copy and
writes the ecosystem layout back when saved.

A backend declares what it supports as data (``capabilities``), from which
:meth:`QuantLinear.unsupported` answers for a given layer, and which compute paths (``kernels``)
it has; ``dispatch`` maps the number of input rows to the path to take, so a layer can use a
GEMV-like kernel for decode and a dequantize-then-GEMM one for prefill.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from lightning_gptq.kernels import torch_ref
from lightning_gptq.kernels.packing import pack_cols, pack_rows, packed_length, unpack_cols, unpack_rows
from lightning_gptq.quant.linalg import fp32_matmuls


@dataclass(frozen=True)
class LayerSpec:
    """What a backend must support to hold one layer: its shape, grid, device type and activation dtype."""

    in_features: int
    out_features: int
    bits: int
    group_size: int
    sym: bool
    act_order: bool
    bias: bool
    device: str = "cpu"
    dtype: str = "float32"

    def describe(self) -> str:
        group = "per-row" if self.group_size == -1 else f"g{self.group_size}"
        flags = "".join([", act-order" if self.act_order else "", ", sym" if self.sym else ", asym"])
        return f"{self.out_features}x{self.in_features} {self.bits}-bit {group}{flags} on {self.device} {self.dtype}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can hold. Every backend takes any input-row count (its ``dispatch`` picks the
    kernel per row count), ragged last groups and both symmetric and asymmetric grids."""

    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    group_multiple: int = 1  # group sizes it takes are multiples of this (per-row, -1, always)
    act_order: bool = True  # arbitrary g_idx (permuted groups)
    devices: tuple[str, ...] = ("cpu", "cuda", "mps", "xpu")
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")  # activation dtypes
    rounding: str = "none: fp32 arithmetic"  # what it rounds beyond fp32 summation order

    def unsupported(self, spec: "LayerSpec") -> str | None:
        if spec.device not in self.devices:
            return f"{'/'.join(self.devices)} only" if len(self.devices) < 3 else f"not on {spec.device}"
        if spec.bits not in self.bits:
            return f"bits must be one of {self.bits}"
        if spec.group_size != -1 and spec.group_size % self.group_multiple:
            return f"group size {spec.group_size} is not a multiple of {self.group_multiple}"
        if spec.act_order and not self.act_order:
            return "no act-order (permuted g_idx)"
        if spec.dtype not in self.dtypes:
            return f"activations must be {'/'.join(self.dtypes)}"
        return None

    def describe(self) -> str:
        groups = "any group size" if self.group_multiple == 1 else f"group size a multiple of {self.group_multiple}"
        return (f"bits {','.join(map(str, self.bits))}; {groups} or per-row, ragged last group; "
                f"act-order {'yes' if self.act_order else 'no'}; sym and asym; {'/'.join(self.devices)}; "
                f"activations {'/'.join(self.dtypes)}; any row count; rounding: {self.rounding}")


#: Depth of nested ``exact_kernels()`` blocks in the current context: each thread (and asyncio task) has its own,
#: so a thread calibrating under ``exact_kernels()`` does not change the kernels another thread's forward pass takes.
_EXACT: contextvars.ContextVar[int] = contextvars.ContextVar("lightning_gptq_exact_kernels", default=0)


@contextlib.contextmanager
def exact_kernels() -> Iterator[None]:
    """Inside this block every quantized layer computes with its fastest kernel among those that round
    nothing beyond fp32 (``exact_kernels``): calibration runs here, so that the inputs GPTQ sees for
    later blocks do not depend on which kernels this machine happens to favour.

    The block holds for the code it wraps, in the thread (or asyncio task) that entered it: other threads
    running the same model meanwhile keep their own dispatch (a new thread starts outside any block).
    Dense fp32 matmuls run in fp32 too, whatever ``torch.set_float32_matmul_precision`` says
    (:func:`lightning_gptq.quant.linalg.fp32_matmuls`; that one is process-wide while the block lasts)."""
    token = _EXACT.set(_EXACT.get() + 1)
    try:
        with fp32_matmuls():
            yield
    finally:
        _EXACT.reset(token)


@contextlib.contextmanager
def dense_weights_held(module: nn.Module, dtype: torch.dtype = torch.float32) -> Iterator[None]:
    """Inside this block every oracle layer (the ``torch`` backend) under ``module`` dequantizes its
    weight once and keeps it, instead of once per call: the same numbers (the same dense weight, the
    same matmul), for the memory of the dense weights. Calibration runs each quantized block over
    every batch this way, as the reference runs its fake-quantized dense layers."""
    layers = [m for m in module.modules() if type(m) is QuantLinear]
    for layer in layers:
        t = layer.packed_tensors()
        layer._held_dense_t = torch_ref.dequantize_t(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], layer.bits,
                                                     layer.in_features, dtype, group_size=layer.contiguous_group_size())
    try:
        yield
    finally:
        for layer in layers:
            layer._held_dense_t = None


@torch._dynamo.assume_constant_result
def _exact_when_traced() -> int:
    """``exact_depth()`` read once while a graph is traced (dynamo cannot read a ContextVar): a compiled
    model keeps the kernels chosen when it was traced."""
    return _EXACT.get()


def exact_depth() -> int:
    """How many ``exact_kernels()`` blocks the current thread (or task) is inside."""
    return _EXACT.get()


def _table(dispatch, kernels: tuple[str, ...]) -> tuple[tuple[tuple[int, str], ...], list[float]]:
    entries = tuple(sorted((int(b), str(k)) for b, k in dispatch))
    unknown = {k for _, k in entries} - set(kernels)
    if not entries or unknown:
        raise ValueError(f"the layer has kernels {kernels}; dispatch names {sorted(unknown) or 'none'}")
    # switch points: geometric midpoints between neighbouring measured row counts
    return entries, [math.sqrt(a * b) for (a, _), (b, _) in zip(entries, entries[1:])]


def _lookup(entries, bounds, rows: int) -> str:
    for bound, (_, kernel) in zip(bounds, entries):
        if rows <= bound:
            return kernel
    return entries[-1][1]


def n_groups_for(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


class QuantLinear(nn.Module):
    """A linear layer holding GPTQ-packed weights; computes ``x @ Wᵀ + b``. The plain-torch backend.

    Buffers (the checkpoint layout): ``qweight`` int32 [in·bits/32, out], ``qzeros`` int32
    [n_groups, out·bits/32] (true zero codes), ``scales`` [n_groups, out], ``g_idx`` int32 [in],
    ``bias`` [out] or None. This backend supports every layer on every device and is the oracle
    other backends are tested against: it dequantizes the whole weight, then runs one matmul.
    """

    backend = "torch"
    capabilities = Capabilities()
    kernels: tuple[str, ...] = ("dequant",)
    #: The kernels that round nothing beyond fp32 summation order (used inside ``exact_kernels()``).
    exact: tuple[str, ...] = ("dequant",)
    #: Relative error ``‖y − y_oracle‖ / ‖y_oracle‖`` this backend promises (fp32 summation order only).
    tolerance = 1e-5
    #: Promises for single kernels that differ from ``tolerance`` (the loosest of them all).
    kernel_tolerance: dict[str, float] = {}

    @classmethod
    def tolerance_of(cls, kernel: str) -> float:
        """The relative error ``kernel`` promises: 1e-5 for the exact ones (fp32 summation order only)."""
        return 1e-5 if kernel in cls.exact else cls.kernel_tolerance.get(kernel, cls.tolerance)

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int, sym: bool, bias: bool,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        n_groups = n_groups_for(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(packed_length(in_features, bits), out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(n_groups, packed_length(out_features, bits), dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=dtype, device=device))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.set_dispatch([(1, self.kernels[0])], [(1, self.exact[0])])

    # -- capabilities -----------------------------------------------------------------------------
    @classmethod
    def unsupported(cls, spec: LayerSpec) -> str | None:
        """Why this backend cannot hold a layer like ``spec``, or None when it can: its declared
        ``capabilities``, then :meth:`unavailable` (a kernel missing on this machine)."""
        return cls.capabilities.unsupported(spec) or cls.unavailable()

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this backend's kernel cannot run in this installation, or None."""
        return None

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qweight, bias: Tensor | None = None) -> "QuantLinear":
        """Build from a solver result (``codes`` [out, in], ``scales``/``zeros`` [out, n_groups], ``g_idx``, grid settings)."""
        out_features, in_features = qweight.codes.shape
        layer = cls(in_features, out_features, bits=qweight.bits, group_size=qweight.group_size, sym=qweight.sym,
                    bias=bias is not None, dtype=qweight.dtype, device=qweight.codes.device)
        layer.set_weight(qweight.codes, qweight.scales, qweight.zeros, qweight.g_idx, bias)
        return layer

    @torch.no_grad()
    def set_weight(self, codes: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor, bias: Tensor | None = None) -> None:
        """Pack solver-layout tensors (``codes`` [out, in], ``scales``/``zeros`` [out, n_groups]) into this layer."""
        self.qweight = pack_rows(codes.T, self.bits).to(self.g_idx.device)
        self.qzeros = pack_cols(zeros.T, self.bits).to(self.g_idx.device)
        self.scales = scales.T.to(self.scales).contiguous()
        self.g_idx = g_idx.to(self.g_idx)
        if bias is not None:
            self.bias = bias.detach().to(self.bias).clone()
        self.contiguous_group_size()
        self.post_init()

    def post_init(self) -> None:
        """Called whenever the packed buffers have been (re)written; backends convert here."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.contiguous_group_size()
        self.post_init()

    # -- reading the weight -----------------------------------------------------------------------
    @property
    def act_order(self) -> bool:
        return self.contiguous_group_size() is None

    def spec(self) -> LayerSpec:
        return LayerSpec(self.in_features, self.out_features, self.bits, self.group_size, self.sym, self.act_order,
                         self.bias is not None, self.g_idx.device.type, str(self.scales.dtype).removeprefix("torch."))

    def contiguous_group_size(self) -> int | None:
        """The group width when ``g_idx`` is the plain ``i // group_size`` (no act-order reordering).
        While a graph is traced, the answer of the last eager call (refreshed whenever ``g_idx`` is
        written): comparing tensors to decide is a data-dependent branch, a graph break."""
        if torch.compiler.is_compiling() and "_group_width" in self.__dict__:
            return self.__dict__["_group_width"]
        width = self.group_size if self.group_size > 0 else self.in_features
        natural = torch.arange(self.in_features, device=self.g_idx.device) // width
        self.__dict__["_group_width"] = width if torch.equal(self.g_idx.long(), natural) else None
        return self.__dict__["_group_width"]

    def packed_tensors(self) -> dict[str, Tensor]:
        """The checkpoint-layout tensors (what ``state_dict`` holds), whatever this backend keeps in memory."""
        return {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}

    def codes(self) -> Tensor:
        """uint8 [out, in] codes."""
        return unpack_rows(self.packed_tensors()["qweight"], self.bits, self.in_features).T

    def zero_points(self) -> Tensor:
        """uint8 [n_groups, out] true zero codes."""
        return unpack_cols(self.qzeros, self.bits, self.out_features)

    def dequantize(self) -> Tensor:
        """The dense weight [out, in] this layer represents (computed by the oracle)."""
        t = self.packed_tensors()
        return torch_ref.dequantize_t(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], self.bits, self.in_features,
                                      group_size=self.contiguous_group_size()).T

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def weight(self) -> Tensor:
        """The dequantized weight [out, in], for code that reads ``.weight`` (a fresh tensor each time)."""
        return self.dequantize()

    # -- compute ----------------------------------------------------------------------------------
    def set_dispatch(self, dispatch, exact_dispatch=None) -> None:
        """``dispatch``: ``[(rows, kernel), ...]``; an input of ``m`` rows takes the kernel whose ``rows``
        is nearest to ``m`` on a log scale. ``exact_dispatch``: the same among ``exact`` kernels, for
        ``exact_kernels()`` blocks (default: the first exact kernel for every row count)."""
        self.dispatch, self._bounds = _table(dispatch, self.kernels)
        self.exact_dispatch, self._exact_bounds = _table(exact_dispatch or [(1, self.exact[0])], self.exact)

    def kernel_for(self, rows: int) -> str:
        if (_exact_when_traced() if torch.compiler.is_compiling() else _EXACT.get()):
            return _lookup(self.exact_dispatch, self._exact_bounds, rows)
        return _lookup(self.dispatch, self._bounds, rows)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:  # (the reference kernel would read only the first x.shape[-1] rows)
            raise ValueError(f"{type(self).__name__} takes inputs [..., {self.in_features}], got {tuple(x.shape)}")
        return self.run(self.kernel_for(x.numel() // self.in_features), x)

    def run(self, kernel: str, x: Tensor) -> Tensor:
        """Compute with a named kernel (what ``forward`` does after picking one)."""
        dense_t = self._held_dense_t
        if dense_t is None or dense_t.dtype != x.dtype:
            return torch_ref.quant_matmul(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.bias,
                                          group_size=self.contiguous_group_size())
        y = torch.matmul(x, dense_t)  # what quant_matmul computes, minus the dequantization
        return y if self.bias is None else y + self.bias.to(y.dtype)

    _held_dense_t: Tensor | None = None  # set inside ``dense_weights_held`` (the oracle only)

    def extra_repr(self) -> str:
        path = ", ".join(f"{b}:{k}" for b, k in self.dispatch)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, bias={self.bias is not None}, backend={self.backend}, "
                f"kernels=[{path}]")


_BACKENDS: dict[str, type[QuantLinear]] = {"torch": QuantLinear}
AUTO = "auto"


def register_quant_linear(name: str) -> Callable[[type[QuantLinear]], type[QuantLinear]]:
    """Class decorator: make a ``QuantLinear`` subclass selectable as ``backend=name``."""

    def register(cls: type[QuantLinear]) -> type[QuantLinear]:
        cls.backend = name
        _BACKENDS[name] = cls
        return cls

    return register


def backends() -> dict[str, type[QuantLinear]]:
    return dict(_BACKENDS)


def quant_linear_class(backend: str) -> type[QuantLinear]:
    if backend not in _BACKENDS:
        raise ValueError(f"unknown quantized-linear backend {backend!r}; available: {sorted(_BACKENDS) + [AUTO]}")
    return _BACKENDS[backend]


def check_backend(backend: str) -> None:
    """Raise the registry's clear error for an unknown name (``auto`` is always known)."""
    if backend != AUTO:
        quant_linear_class(backend)


def backend_unavailable_on(backend: str, device_type: str) -> str | None:
    """Why ``backend`` can hold no layer on a ``device_type`` device (``"cpu"``, ``"cuda"``), or None (``auto``
    always can). Checked before work that would end by building the layers (a fit, a scoring run)."""
    if backend == AUTO:
        return None
    devices = quant_linear_class(backend).capabilities.devices
    if device_type not in devices:
        return f"backend {backend!r} runs on {'/'.join(devices)} only, and this run computes on {device_type}"
    return None


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted path ``name`` under ``root``; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
