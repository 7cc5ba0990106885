"""Where a block's linears can take their input in scaled coordinates, and the rewrite, checked on the block.

``quant/equalize.py`` solves layers that read one input as if that input were divided per channel by ``s``;
the model must then really feed them ``x / s``: ``1/s`` is folded into what produces the input. Producers are
found two ways (:func:`scale_sources`): a module with a per-channel ``weight`` whose output tensor *is* the
layers' input (the norms before attention and MLP), and the linear pairs of ``SCALE_PAIR_NAMES`` (``up_proj`` →
``down_proj``: the output channel passes through ``act(gate) ·``). Neither proves the rewrite exact (Gemma's norm
multiplies by ``1 + weight``; GPT-2 has GELU between ``c_fc`` and ``c_proj``; a post-norm block adds the norm's
output to the residual), so :func:`rewrite_if_exact` makes it on the block and keeps it only if the block's
output is unchanged on real inputs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from lightning_gptq.models.adapters import is_linear, linear_in_features, linear_out_features, weight_out_in
from lightning_gptq.models.capture import run_block
from lightning_gptq.models.compute_dtype import floating_to, running_in
from lightning_gptq.nn.quant_linear import QuantLinear

__all__ = ["SCALE_PAIR_NAMES", "divide_output_channels", "multiply_input_channels", "rewrite_if_exact",
           "scale_sources"]

#: (producer, consumer) leaf names under one parent: LLaMA/Mistral/Qwen/Gemma's MLP, OPT's, Mixtral-style
#: experts, GPT-NeoX/BLOOM and GPT-2 (the last two have GELU in between: the check refuses them). GPT-OSS experts
#: have no exact rewrite at all: ``(clamp(up, ±limit) + 1) · glu`` changes under any row scale of ``up``.
SCALE_PAIR_NAMES = (("up_proj", "down_proj"), ("fc1", "fc2"), ("w3", "w2"), ("dense_h_to_4h", "dense_4h_to_h"),
                    ("c_fc", "c_proj"))


def _is_linear_like(module: nn.Module) -> bool:
    return is_linear(module) or isinstance(module, QuantLinear)


def _width(module: nn.Module, side: str) -> int:
    if is_linear(module):
        return linear_in_features(module) if side == "in" else linear_out_features(module)
    return module.in_features if side == "in" else module.out_features  # a quantized linear


def _per_channel(module: nn.Module) -> bool:
    """A norm-like module: a 1-D ``weight`` (and maybe ``bias``) scaling its output per channel."""
    weight = getattr(module, "weight", None)
    return (isinstance(weight, nn.Parameter) and weight.dim() == 1 and not _is_linear_like(module)
            and not isinstance(module, nn.Embedding))


def scale_sources(block: nn.Module, hidden: Tensor, kwargs: dict) -> dict[str, list[str]]:
    """``{producer: [the linears reading its output]}`` in ``block`` (names relative to it), from one run over
    ``hidden`` ``[b, seq, hidden]``: per-channel modules whose output object the linears receive, and the
    ``SCALE_PAIR_NAMES`` pairs whose widths match."""
    modules = dict(block.named_modules())
    norms = {name for name, m in modules.items() if name and _per_channel(m)}
    outputs: list[tuple[str, Tensor]] = []  # kept alive: identity, not id(), decides
    readers: dict[str, list[str]] = {}

    def produced(name):
        def hook(module, args, output):
            if isinstance(output, Tensor):
                outputs.append((name, output))
        return hook

    def read(name):
        def hook(module, args):
            source = next((n for n, t in outputs if args and t is args[0]), None)
            if source is not None:
                readers.setdefault(source, []).append(name)
        return hook

    handles = [modules[n].register_forward_hook(produced(n)) for n in norms]
    handles += [m.register_forward_pre_hook(read(n)) for n, m in modules.items() if n and _is_linear_like(m)]
    try:
        run_block(block, hidden, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    sources = {producer: names for producer, names in readers.items()
               if all(_width(modules[n], "in") == modules[producer].weight.numel() for n in names)}
    for name, module in modules.items():
        parent, _, leaf = name.rpartition(".")
        for producer_leaf, consumer_leaf in SCALE_PAIR_NAMES:
            producer = f"{parent}.{producer_leaf}" if parent else producer_leaf
            if leaf == consumer_leaf and _is_linear_like(module) and producer in modules \
                    and _is_linear_like(modules[producer]) and _width(modules[producer], "out") == _width(module, "in"):
                sources[producer] = [name]
    return sources


def divide_output_channels(module: nn.Module, divisors: Tensor) -> None:
    """Divide output channel ``j`` of ``module`` by ``divisors[j]`` in place: a dense linear's weight rows, a
    quantized linear's per-group scales (its codes and zero points stay: ``scale · (q − z) / d`` is the row
    divided, up to the scales' rounding), a norm's ``weight``; and the bias."""
    with torch.no_grad():
        if is_linear(module):
            weight = weight_out_in(module)
            weight.div_(divisors.to(weight.device, weight.dtype)[:, None])
        elif isinstance(module, QuantLinear):
            if type(module) is not QuantLinear or getattr(module, "_held_dense_t", None) is not None:
                raise RuntimeError(f"divide_output_channels: {type(module).__name__} keeps its weight in another form "
                                   "than its scales (a kernel layout or a held dense copy); fold before converting")
            module.scales.div_(divisors.to(module.scales.device, module.scales.dtype)[None, :])  # [groups, out]
        elif _per_channel(module):
            module.weight.div_(divisors.to(module.weight.device, module.weight.dtype))
        else:
            raise TypeError(f"divide_output_channels: {type(module).__name__} has no per-channel output to scale")
        bias = getattr(module, "bias", None)
        if isinstance(bias, Tensor):
            bias.div_(divisors.to(bias.device, bias.dtype))


def multiply_input_channels(layer: nn.Module, factors: Tensor) -> None:
    """Multiply input column ``j`` of a dense linear's weight by ``factors[j]`` in place."""
    with torch.no_grad():
        weight = weight_out_in(layer)
        weight.mul_(factors.to(weight.device, weight.dtype)[None, :])


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, Tensor)}


def _restore(module: nn.Module, state: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for key, value in module.state_dict().items():
            if key in state:
                value.copy_(state[key])


def rewrite_if_exact(block: nn.Module, producer: str, consumers: list[str], scales: Tensor, hidden: Tensor,
                     kwargs: dict, tolerance: float = 1e-4, agree: Callable[[bool], bool] | None = None) -> bool:
    """Divide ``producer``'s output channels by ``scales`` if that, with the (dense) ``consumers``' input columns
    multiplied by them, leaves ``block``'s output on ``hidden`` unchanged (every token's relative error within
    ``tolerance``; an exact rewrite leaves fp32 rounding, ~1e-6); returns whether it did. The check runs the block
    in fp32, on fp32 copies of a 16-bit block's weights (whose own rounding would exceed ``tolerance``);
    the consumers are never changed: they are about to be replaced by their quantized versions, solved for the
    scaled input. ``agree`` (processes that each checked their own ``hidden``): this process's verdict -> the one
    every process acts on, so that all make the rewrite or none."""
    first = block.get_submodule(producer)
    layers = [block.get_submodule(name) for name in consumers]
    if not all(is_linear(layer) for layer in layers):
        return False
    hidden, kwargs = floating_to(hidden, torch.float32), floating_to(kwargs, torch.float32)
    with running_in(block, torch.float32):  # (nothing copied for an fp32 block)
        before = run_block(block, hidden, kwargs).to(torch.float64)
        saved = [(module, _state(module)) for module in (first, *layers)]
        divide_output_channels(first, scales)
        for layer in layers:
            multiply_input_channels(layer, scales)
        try:
            after = run_block(block, hidden, kwargs).to(torch.float64)
        finally:
            for module, state in saved:
                _restore(module, state)
    error = (after - before).norm(dim=-1) / before.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    exact = bool(torch.isfinite(after).all()) and float(error.max()) <= tolerance
    if agree is not None:
        exact = bool(agree(exact))
    if exact:
        divide_output_channels(first, scales)
    return exact
