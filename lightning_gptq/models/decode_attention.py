"""Attention for the one-token decode step as one C++ operator (``lightning_gptq::decode_attention``).

Registered with transformers as the attention implementation ``lightning_gptq_decode`` (its mask: the
additive float one of ``eager``). A step that reads one new token (query length 1, fp32, CPU, no dropout,
no logit soft-capping or attention sinks) attends over the KV cache in one call: per head, scores,
softmax and the weighted sum of values, grouped-query heads reading their shared cache head in place,
masked positions skipped. Anything else (the prompt, other dtypes and devices) goes to ``sdpa``, and attention
with sinks (GPT-OSS) or soft-capped logits, which ``sdpa`` would drop, to the model's own eager attention.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

NAME = "lightning_gptq_decode"


def _plain(module: nn.Module, kwargs: dict) -> bool:
    """No attention sinks and no logit soft-capping: what both our kernel and ``sdpa`` compute."""
    return (getattr(module, "attn_logit_softcapping", None) is None and kwargs.get("softcap") is None
            and kwargs.get("s_aux") is None and kwargs.get("sinks") is None)


def _fast_path_ok(module: nn.Module, query: Tensor, dropout: float, kwargs: dict) -> bool:
    return (query.shape[2] == 1 and query.device.type == "cpu" and query.dtype == torch.float32 and dropout == 0.0
            and _plain(module, kwargs))


def _fallback(module: nn.Module, kwargs: dict):
    """``sdpa``, or the model's own eager attention (its modeling file's ``eager_attention_forward``) where sinks
    or soft-capping need it."""
    own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if own is not None and not _plain(module, kwargs):
        return own
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def decode_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                             scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers' attention-function signature: ``query`` [B, H, q, D], ``key``/``value`` [B, Hkv, L, D] →
    (``[B, q, H, D]``, None)."""
    if _fast_path_ok(module, query, dropout, kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        mask = attention_mask[..., -1:, :] if attention_mask is not None else None
        return torch.ops.lightning_gptq.decode_attention(query, key, value, mask, scale), None
    return _fallback(module, kwargs)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)


def register() -> str | None:
    """Make ``NAME`` a transformers attention implementation; None (and nothing registered) when our C++ kernels
    cannot be built here or transformers has no attention registry."""
    from lightning_gptq.kernels import cpu_gemm

    if cpu_gemm.unavailable() is not None:
        return None
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask
    except ImportError:
        return None
    cpu_gemm._load()  # builds the kernels and defines the operator
    AttentionInterface.register(NAME, decode_attention_forward)
    AttentionMaskInterface.register(NAME, eager_mask)
    return NAME
