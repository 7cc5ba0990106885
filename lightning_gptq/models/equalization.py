"""Which linear pairs of a block can trade a per-channel scale, proven on the block itself.

``quant/equalize.py`` solves a layer in scaled input coordinates; that is only an equivalent rewrite
when the layer's input channel ``j`` scales with its producer's output channel ``j``
(``down_proj(act(gate_proj(x)) · up_proj(x))``, ``fc2(relu(fc1(x)))``). Names propose the pairs
(``SCALE_PAIR_NAMES``); :func:`scales_through` checks each on real inputs by scaling the producer's
output by random positive factors and watching the consumer's input, so an architecture that
reuses the names with a non-homogeneous activation in between (GELU, SiLU) is refused, not
silently changed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_gptq.models.adapters import is_linear, linear_in_features, linear_out_features, weight_out_in
from lightning_gptq.models.capture import run_block
from lightning_gptq.nn.quant_linear import QuantLinear

__all__ = ["SCALE_PAIR_NAMES", "candidate_pairs", "divide_output_channels", "scales_through"]

#: (producer, consumer) leaf names under one parent: LLaMA/Mistral/Qwen/Gemma's MLP, OPT's, Mixtral-style
#: experts, GPT-NeoX/BLOOM and GPT-2 (the last two have GELU in between: the probe refuses them).
SCALE_PAIR_NAMES = (("up_proj", "down_proj"), ("fc1", "fc2"), ("w3", "w2"), ("dense_h_to_4h", "dense_4h_to_h"),
                    ("c_fc", "c_proj"))


class _Seen(Exception):
    """Raised by the probe's hook once the consumer has read its input."""


def candidate_pairs(block: nn.Module) -> dict[str, str]:
    """``{consumer name: producer name}`` (relative to ``block``) that ``SCALE_PAIR_NAMES`` propose and
    whose widths match (the producer's outputs are the consumer's inputs)."""
    modules = dict(block.named_modules())
    pairs = {}
    for name, module in modules.items():
        parent, _, leaf = name.rpartition(".")
        for producer_leaf, consumer_leaf in SCALE_PAIR_NAMES:
            producer_name = f"{parent}.{producer_leaf}" if parent else producer_leaf
            producer = modules.get(producer_name)
            if leaf == consumer_leaf and producer is not None and _width(producer, "out") == _width(module, "in"):
                pairs[name] = producer_name
    return pairs


def _width(module: nn.Module, side: str) -> int | None:
    if is_linear(module):
        return linear_in_features(module) if side == "in" else linear_out_features(module)
    value = getattr(module, "in_features" if side == "in" else "out_features", None)  # a quantized linear
    return value if isinstance(value, int) else None


def scales_through(block: nn.Module, producer: str, consumer: str, hidden: Tensor, kwargs: dict,
                   rtol: float = 1e-3) -> bool:
    """Whether scaling ``producer``'s output channels by positive factors scales ``consumer``'s input
    channels by the same factors, on one run of ``block`` over ``hidden`` ``[b, seq, hidden]``."""
    first, second = block.get_submodule(producer), block.get_submodule(consumer)
    factors = torch.empty(_width(first, "out")).uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(0))
    seen: list[Tensor] = []

    def read(module, args):
        seen.append(args[0].detach().to(torch.float64).clone())
        raise _Seen

    def scale(module, args, output):
        return output * factors.to(output.device, output.dtype)

    handles = [second.register_forward_pre_hook(read)]
    try:
        for scaled in (False, True):
            hook = first.register_forward_hook(scale) if scaled else None
            try:
                run_block(block, hidden, kwargs)
            except _Seen:
                pass
            finally:
                if hook is not None:
                    hook.remove()
    finally:
        for handle in handles:
            handle.remove()
    if len(seen) != 2:
        return False
    expected = seen[0] * factors.to(torch.float64).to(seen[0].device)
    return bool(torch.allclose(seen[1], expected, rtol=rtol, atol=rtol * float(expected.abs().max())))


def divide_output_channels(layer: nn.Module, divisors: Tensor) -> None:
    """Divide output channel ``j`` of ``layer`` (weight row and bias) by ``divisors[j]`` in place.

    A dense linear's rows are divided; a quantized one's per-group scales are (its codes and zero
    points stay: ``scale · (q − z) / d`` is exactly the row divided, up to the scales' rounding)."""
    with torch.no_grad():
        if is_linear(layer):
            weight = weight_out_in(layer)
            weight.div_(divisors.to(weight.device, weight.dtype)[:, None])
        elif isinstance(layer, QuantLinear):
            if type(layer) is not QuantLinear or getattr(layer, "_held_dense_t", None) is not None:
                raise RuntimeError(f"divide_output_channels: {type(layer).__name__} keeps its weight in another form "
                                   "than its scales (a kernel layout or a held dense copy); fold before converting")
            layer.scales.div_(divisors.to(layer.scales.device, layer.scales.dtype)[None, :])  # [groups, out]
        else:
            raise TypeError(f"divide_output_channels: {type(layer).__name__} is neither a linear nor a quantized linear")
        bias = getattr(layer, "bias", None)
        if bias is not None:
            bias.div_(divisors.to(bias.device, bias.dtype))


class ScalePartners:
    """The producer each consumer layer may fold its input scales into, probed once per block type and pair.

    ``producer_for(block, name, hidden, kwargs)``: the producer's name, or None when ``name`` has no
    candidate or the probe refused the pair (``refused`` lists those, for one warning)."""

    def __init__(self) -> None:
        self._verdicts: dict[tuple[str, str, str], bool] = {}
        self.refused: list[str] = []

    def producer_for(self, block: nn.Module, name: str, hidden: Tensor | None, kwargs: dict | None) -> str | None:
        producer = candidate_pairs(block).get(name)
        if producer is None:
            return None
        key = (type(block).__name__, producer, name)
        if key not in self._verdicts:
            self._verdicts[key] = hidden is not None and scales_through(block, producer, name, hidden, kwargs or {})
            if not self._verdicts[key]:
                self.refused.append(f"{producer} -> {name}")
        return producer if self._verdicts[key] else None
