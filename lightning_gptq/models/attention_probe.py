"""How much attention each key position receives, read while a transformers model runs unchanged.

``probe_attention(modules, record)`` routes the given attention layers through a registered
attention function that first calls the layer's own implementation (sdpa, eager, ...; its output is
returned untouched, so the model computes exactly what it computed before) and then recomputes the
softmax probabilities from the same ``query``/``key``/mask in fp32 (fp64 for fp64 queries) and reports, per key position,
the attention mass it receives summed over queries: ``record(module, received, queries, keys)`` with
``received`` ``[batch, heads, keys]``. Only layers that call transformers' attention interface (LLaMA, Mistral,
Qwen2, Gemma, OPT, GPT-NeoX, ... in transformers 5) can be probed; ``attention_layers`` finds them.
``route_attention(modules, handler)`` is the routing alone (true-sequential replay records and replays through it).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PROBE_NAME", "AttentionProbeError", "attention_layers", "probe_attention", "received_attention",
           "route_attention"]

PROBE_NAME = "lightning_gptq_probe"
_ROUTED: dict[int, tuple[Callable, Callable]] = {}  # id(module) -> (its own attention function, handler)
_QUERY_CHUNK = 256  # query rows per softmax, so a 2048-token window needs heads x 256 x 2048 floats at a time


class AttentionProbeError(RuntimeError):
    """The model's attention cannot be probed (it does not go through transformers' attention interface)."""


def attention_layers(block: nn.Module) -> list[nn.Module]:
    """The attention submodules of ``block`` whose forward dispatches on ``config._attn_implementation``."""
    found = []
    for module in block.modules():
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "_attn_implementation"):
            continue
        source = sys.modules.get(type(module).__module__)
        if type(module).__name__.endswith("Attention") and source is not None and "ALL_ATTENTION_FUNCTIONS" in vars(source):
            found.append(module)
    return found


def received_attention(module: nn.Module, query: Tensor, key: Tensor, attention_mask: Tensor | None,
                       first: int | None = None, **kwargs) -> Tensor:
    """``[batch, heads, keys]``: softmax(q·kᵀ·scaling + mask) summed over queries (a sink logit per head,
    ``s_aux``, joins each row's softmax as GPT-OSS's does), in fp32 (fp64 when
    ``query`` is fp64: an fp64 calibration stream keeps its sink weights to fp64 rounding); with
    ``first``, only the first ``first`` keys' columns (``[batch, heads, first]``; cheaper: the
    probabilities are never formed, only each row's log-sum-exp).

    ``query`` ``[batch, heads, queries, dim]``, ``key`` ``[batch, kv_heads, keys, dim]`` as the attention
    interface receives them (rotary applied, grouped-query keys not yet repeated).
    """
    batch, heads, queries, dim = query.shape
    keys = key.shape[2]
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    if key.shape[1] != heads:
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
    scaling = kwargs.get("scaling")
    scaling = 1.0 / math.sqrt(dim) if scaling is None else float(scaling)
    softcap = kwargs.get("softcap")
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    window = kwargs.get("sliding_window")
    sinks = kwargs.get("s_aux")  # GPT-OSS: a learned logit per head that joins each row's softmax, attending nowhere
    if first is not None and attention_mask is None and causal and not softcap and not window and queries == keys \
            and sinks is None:
        fast = _first_keys_from_flash_lse(query.to(work), key.to(work), scaling, min(first, keys))
        if fast is not None:
            return fast
    k = key.to(work).transpose(-1, -2)
    received = torch.zeros(batch, heads, keys if first is None else min(first, keys), dtype=work,
                           device=query.device)
    key_pos = torch.arange(keys, device=query.device)
    for start in range(0, queries, _QUERY_CHUNK):
        stop = min(start + _QUERY_CHUNK, queries)
        logits = (query[:, :, start:stop].to(work) @ k) * scaling
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        if attention_mask is not None:
            mask = attention_mask[:, :, start:stop, :keys]
            if mask.dtype == torch.bool:
                logits.masked_fill_(~mask, float("-inf"))
            else:
                logits += mask.to(work)
        elif causal and queries > 1:
            query_pos = torch.arange(start, stop, device=query.device)[:, None] + (keys - queries)
            allowed = key_pos[None, :] <= query_pos
            if window:
                allowed &= key_pos[None, :] > query_pos - window
            logits.masked_fill_(~allowed, float("-inf"))
        if first is None and sinks is None:
            received += torch.softmax(logits, dim=-1).sum(dim=-2)
        else:
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            if sinks is not None:
                lse = torch.logaddexp(lse, sinks.to(work).reshape(1, heads, 1, 1))
            received += torch.exp(logits[..., : received.shape[-1]] - lse).sum(dim=-2)
    return received


def _first_keys_from_flash_lse(query: Tensor, key: Tensor, scaling: float, first: int) -> Tensor | None:
    """``received_attention(..., first=first)`` for plain causal self-attention, from each query's
    log-sum-exp as PyTorch's fused CPU attention returns it (4x faster at 2048 tokens than forming the
    scores here: it skips the masked half and never writes the scores out). ``None`` off the CPU or
    where that kernel is unavailable."""
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is None or query.device.type != "cpu":
        return None
    try:
        lse = flash(query, key, key, 0.0, True, scale=scaling)[1]  # [batch, heads, queries]
    except RuntimeError:
        return None
    logits = (query @ key[:, :, :first].transpose(-1, -2)) * scaling  # [batch, heads, queries, first]
    probs = torch.exp(logits - lse.unsqueeze(-1))
    if first > 1:  # query p sees key j only when j <= p
        probs = probs.masked_fill(torch.arange(first) > torch.arange(query.shape[2])[:, None], 0.0)
    return probs.sum(dim=-2)


def _own_function(module: nn.Module, implementation: str | None) -> Callable:
    source = sys.modules[type(module).__module__]
    if implementation in (None, "eager"):
        return source.eager_attention_forward
    return source.ALL_ATTENTION_FUNCTIONS[implementation]


def _routed_forward(module, query, key, value, attention_mask, *args, **kwargs):
    own, handler = _ROUTED[id(module)]
    return handler(own, module, query, key, value, attention_mask, *args, **kwargs)


def _registered_route(implementation: str | None) -> str:
    """The route's name for layers configured with ``implementation``, registered in transformers'
    attention and mask interfaces: whole-model calls still build the mask that implementation expects."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    own = implementation or "eager"
    name = f"{PROBE_NAME}[{own}]"
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _routed_forward)
        if own in AttentionMaskInterface._global_mapping:
            AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[own])
    return name


@contextmanager
def route_attention(modules: list[nn.Module], handler: Callable[..., Any]) -> Iterator[None]:
    """While active, each module in ``modules`` calls ``handler(own, module, query, key, value, attention_mask,
    *args, **kwargs)`` instead of its attention function, ``own`` being that function (sdpa, eager, ...).

    The modules' configs are switched to the route's name and restored on exit. A config shared with
    layers outside ``modules`` (every block of a model shares one) is switched too, so only run the
    routed layers while the route is active; others would fail loudly rather than silently.
    """
    if any(id(m) in _ROUTED for m in modules):
        raise RuntimeError("route_attention: a layer's attention is already routed (one route at a time)")
    configs = {id(m.config): m.config for m in modules}
    saved = {key: config._attn_implementation for key, config in configs.items()}
    for module in modules:
        _ROUTED[id(module)] = (_own_function(module, module.config._attn_implementation), handler)
    try:
        for config in configs.values():
            config._attn_implementation_internal = _registered_route(saved[id(config)])  # sub-configs keep theirs
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation_internal = saved[key]
        for module in modules:
            _ROUTED.pop(id(module), None)


def probe_attention(modules: list[nn.Module], record: Callable[..., None], first: int | None = None):
    """A context in which each module in ``modules`` also calls ``record(module, received, queries, keys)`` with
    ``received`` ``[batch, heads, keys]``
    (``[batch, heads, first]`` with ``first``: the attention received by the first keys only; every
    query's row sums to 1, so the rest is ``queries − received.sum(-1)`` per batch and head). The layers'
    own outputs are returned untouched. Routed by ``route_attention`` (only run the probed layers inside).
    """
    if not modules:
        raise AttentionProbeError(
            "No attention layer here calls transformers' attention interface, so the attention each "
            "position receives cannot be measured; use a numeric sink_weight instead."
        )

    def probe(own, module, query, key, value, attention_mask, *args, **kwargs):
        output = own(module, query, key, value, attention_mask, *args, **kwargs)
        with torch.no_grad():
            received = received_attention(module, query, key, attention_mask, first=first, **kwargs)
            record(module, received, query.shape[2], key.shape[2])
        return output

    return route_attention(modules, probe)
