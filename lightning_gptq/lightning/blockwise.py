"""Perplexity of a model that is never whole in memory: each block read from its files, run over
every window, then freed (``perplexity_blockwise``), for a full-precision folder (``WeightSource``)
or a quantized checkpoint (``QuantizedWeightSource``)."""

from __future__ import annotations

import dataclasses

from torch import nn

from lightning_gptq.data.evaluation import PerplexityResult, perplexity_blockwise
from lightning_gptq.models import get_adapter
from lightning_gptq.models.streaming import release
from lightning_gptq.nn import exact_kernels


def pinned_adapter(lm: nn.Module):
    """``lm``'s architecture adapter with its block path fixed now: structure detection looks for
    linear layers, which a quantized block no longer has."""
    adapter = get_adapter(lm)
    owner, attribute = adapter.blocks_location(lm)
    owner_name = next(name for name, m in lm.named_modules() if m is owner)
    return dataclasses.replace(adapter, blocks_path=".".join(p for p in (owner_name, attribute) if p))


def score_block_by_block(lm: nn.Module, source, dm, tokenizer, *, device, progress: bool, adapter=None,
                         store=None, bos_token_id: int | None = None) -> dict[str, PerplexityResult]:
    """``{eval set: result}`` for every set ``dm`` scores. Only the embedding stage, the final stage
    and one block are in memory at a time, plus every window's hidden state ([windows, seqlen,
    hidden]; ``store`` may move each to disk). Everything read is freed again before returning."""
    adapter = adapter or pinned_adapter(lm)
    owner, attribute = adapter.blocks_location(lm)
    outside = [child for name, child in owner.named_children() if name != attribute]
    ends = [*outside, *adapter.final_modules(lm)]
    scores = {}
    try:
        for module in ends:
            source.materialize(lm, module)
        for name in dm.eval_datasets:
            with exact_kernels():  # quality, not this machine's fast paths: the same number on every CPU
                scores[name] = perplexity_blockwise(
                    lm, adapter, dm.eval_tokens(name, tokenizer), seqlen=dm.eval_seqlen, dataset=name,
                    max_windows=dm.eval_max_windows, device=device, progress=progress, store=store,
                    bos_token_id=bos_token_id,
                    before_block=lambda block: source.materialize(lm, block), after_block=release)
    finally:
        for module in ends:
            release(module)
    return scores
