"""The compressed-tensors ``pack-quantized`` layout (llm-compressor's; vLLM reads it), written from ``QuantLinear``s.

What it adds over the GPTQ layout for vLLM 0.32: asymmetric grids (zero points), which its GPTQ path refuses.
Per quantized linear ``<name>``: ``weight_packed`` int32 ``[out, ceil(in / (32 // bits))]`` (each word holds
``32 // bits`` codes along the input dimension, the first in the lowest bits, stored as ``code`` with the signed
range's offset ``2**(bits-1)`` already added, which is our unsigned code), ``weight_scale`` ``[out, groups]``,
``weight_zero_point`` int32 ``[ceil(out / (32 // bits)), groups]`` (asymmetric grids; packed the same way along the
output dimension), ``weight_shape`` int64 ``[out, in]``. The dense weight is ``(code − zero) · scale``, ours exactly.
It has no column order (vLLM 0.32 reads no ``g_idx``): act-order needs ``static_groups``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_gptq.nn import QuantLinear

from . import shards as shard_io
from .gptq_format import CheckpointError, GPTQSettings
from .hf import check_save_args, publish, staging_for, state_to_save, write_model_files

FORMAT = "compressed-tensors"


def pack_along_rows(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes ``[rows, cols]`` → int32 ``[rows, ceil(cols / (32 // bits))]``: ``32 // bits`` codes a word,
    code ``j`` of a word at bit ``j · bits``; the last word padded with zeros."""
    per_word = 32 // bits
    rows, cols = codes.shape
    padded = torch.zeros(rows, -(-cols // per_word) * per_word, dtype=torch.int64)
    padded[:, :cols] = codes.to(torch.int64)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (padded.view(rows, -1, per_word) << shifts).sum(-1)
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)  # the same 32 bits, signed


def layer_tensors(layer: QuantLinear) -> dict[str, Tensor]:
    """One layer's tensors in this layout (names relative to the layer; its bias stays as it is)."""
    if layer.act_order:
        raise CheckpointError("compressed-tensors stores no column order (vLLM 0.32 reads no g_idx): quantize "
                              "act-order with static_groups=true, which keeps the groups contiguous")
    group = layer.group_size if layer.group_size != -1 else layer.in_features
    if layer.in_features % group:
        raise CheckpointError(f"compressed-tensors needs whole groups: in_features {layer.in_features} is not a "
                              f"multiple of group_size {group} (vLLM sizes scales as in_features // group_size)")
    out = {"weight_packed": pack_along_rows(layer.codes(), layer.bits),
           "weight_scale": layer.scales.T.contiguous(),
           "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)}
    if not layer.sym:
        out["weight_zero_point"] = pack_along_rows(layer.zero_points(), layer.bits).T.contiguous()  # along out
    return out


def export_problems(settings: GPTQSettings, shapes: Mapping[str, tuple[int, int]]) -> list[str]:
    """What ``save_compressed_tensors`` would refuse in a run that writes ``settings`` for linears of ``shapes``
    (``(in_features, out_features)`` by full name): known before the solve, so a run fails at its start."""
    quantized = {n: s for n in shapes if (s := settings.for_layer(n)) is not None}
    problems = []
    if len({(s.bits, s.group_size, s.sym) for s in quantized.values()}) > 1:
        problems.append("it writes one grid for every quantized linear (per-layer bits/groups: use the GPTQ layout)")
    if any(s.desc_act and s.group_size != -1 for s in quantized.values()):
        problems.append("it stores no column order: act-order needs static_groups=true")
    ragged = sorted(n for n, s in quantized.items() if s.group_size > 0 and shapes[n][0] % s.group_size)
    if ragged:
        problems.append(f"it needs whole groups: in_features of {ragged[0]} ({shapes[ragged[0]][0]}) and "
                        f"{len(ragged) - 1} more are not multiples of the group size")
    return problems


def quantization_config(layers: dict[str, QuantLinear], ignore: list[str]) -> dict:
    """``config.json["quantization_config"]``: one scheme for every quantized linear (``ignore``: the dense ones)."""
    grids = {(m.bits, m.group_size, m.sym) for m in layers.values()}
    if len(grids) != 1:
        raise CheckpointError(f"compressed-tensors export writes one grid for every quantized linear; these layers "
                              f"have {len(grids)} (bits, group_size, sym): {sorted(grids)}")
    bits, group_size, sym = grids.pop()
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False, "actorder": None,
               "strategy": "channel" if group_size == -1 else "group",
               "group_size": None if group_size == -1 else group_size}
    return {"quant_method": FORMAT, "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None}},
            "ignore": ignore, "kv_cache_scheme": None}


def save_compressed_tensors(model: nn.Module, tokenizer, folder: str | os.PathLike, *, max_shard_size: int | str = "4GB",
                            dtype: torch.dtype | str | None = None, settings: dict | None = None) -> Path:
    """Write ``model`` (its linears ``QuantLinear``) to ``folder`` in the compressed-tensors ``pack-quantized``
    layout. ``dtype``: of every floating tensor (default: as in memory). Every quantized linear must share one grid,
    keep its groups contiguous and hold whole groups (``CheckpointError`` otherwise, before anything is written).
    Written to ``<folder>.partial`` and renamed."""
    cast = check_save_args(max_shard_size, dtype)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("the model has no quantized layers to save")
    head = model.get_output_embeddings()
    ignore = sorted(n for n, m in model.named_modules()  # the dense linears, the LM head among them
                    if m is head or isinstance(m, nn.Linear) and not isinstance(m, QuantLinear))
    config_block = {**quantization_config(layers, ignore), "lightning_gptq": settings or {}}
    state = state_to_save(model, cast)
    for name, layer in layers.items():
        for packed in layer.packed_tensors():  # the GPTQ layout's tensors, replaced by this layout's
            state.pop(f"{name}.{packed}")
        state.update({f"{name}.{k}": v.to(cast) if cast is not None and v.is_floating_point() else v
                      for k, v in layer_tensors(layer).items()})
    folder = Path(folder)
    staging = staging_for(folder)
    shard_io.write({n: t.contiguous() for n, t in state.items()}, staging, max_shard_size)
    dtype = next((t.dtype for n, t in state.items() if t.is_floating_point() and not n.endswith(".weight_scale")),
                 torch.float32)
    write_model_files(staging, model, tokenizer, config_block, dtype)
    return publish(staging, folder)
