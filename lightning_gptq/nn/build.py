"""Building quantized layers and putting them into a model: from a solver result (:func:`make_quant_linear`),
from a layer spec (:func:`build`), or by moving a model's layers to another backend (:func:`to_backend`)."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .head import speed_up_head
from .quant_linear import AUTO, LayerSpec, QuantLinear, quant_linear_class, replace_submodule
from .selection import choose

log = logging.getLogger("lightning_gptq")


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
    shape = ((original.out_features, original.in_features) if hasattr(original, "in_features")
             else tuple(original.weight.shape[::-1]))  # (GPT-2's Conv1D holds its weight [in, out])
    if tuple(shape) != (out_features, in_features):
        raise ValueError(f"the solved weight is [{out_features}, {in_features}] (out, in), the layer it stands in for "
                         f"{list(shape)}")
    width = qweight.group_size if qweight.group_size > 0 else in_features
    act_order = not torch.equal(qweight.g_idx.long(), torch.arange(in_features, device=qweight.g_idx.device) // width)
    spec = LayerSpec(in_features, out_features, qweight.bits, qweight.group_size, qweight.sym, act_order, bias is not None,
                     qweight.codes.device.type, str(qweight.dtype).removeprefix("torch."))
    layer = build(spec, backend)
    layer.set_weight(qweight.codes, qweight.scales, qweight.zeros, qweight.g_idx, bias)
    return layer


@torch.no_grad()
def to_backend(model: nn.Module, backend: str = AUTO, *, head: bool = True) -> dict[str, str]:
    """Rebuild every ``QuantLinear`` in ``model`` with ``backend`` (``auto``: the fastest for its spec and
    the device it now sits on), through the checkpoint layout; returns ``{layer name: backend}``. With
    ``auto`` and ``head``, the model's fp32 LM head gets the faster GEMV for its decode calls too
    (``head.speed_up_head``; ``head=False`` for a part of a model, which has no head)."""
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
    if backend == AUTO and head:
        log.info(speed_up_head(model))
    return chosen


def device_at_hand(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device``, or a ``ValueError`` saying why this machine has no such device (before any
    work that would be lost when the move fails: torch's own errors come after it)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"not a device: {device!r} ({err})") from None
    if device.type in ("cpu", "meta"):
        return device
    backend = getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    if is_available is None or not is_available():
        raise ValueError(f"this machine has no {device.type} device (torch {torch.__version__}) to put the model on")
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise ValueError(f"{device} does not exist: this machine has {count} {device.type} device(s)")
    return device


def place(model: nn.Module, device: torch.device | str, backend: str = AUTO, *, choose: bool = False) -> nn.Module:
    """``model`` moved to ``device``; quantized layers whose backend cannot run there (the int4 CPU layout
    on a GPU, a CUDA kernel on the CPU) rebuilt with ``backend`` (:func:`to_backend`), every one of them with
    ``choose`` (layers read in the checkpoint layout, whose kernels are chosen where they run). Returns ``model``."""
    model.to(device_at_hand(device))
    if choose or any(isinstance(m, QuantLinear) and type(m).unsupported(m.spec()) for m in model.modules()):
        to_backend(model, backend)
    return model
