"""The compressed-tensors ``pack-quantized`` layout (llm-compressor's; vLLM reads it): written from ``QuantLinear``s,
and read back into them (ours, and llm-compressor's integer weight-only checkpoints: W4A16, W8A16, ...).

What it adds over the GPTQ layout for vLLM 0.32: asymmetric grids (zero points), which its GPTQ path refuses.
Per quantized linear ``<name>``: ``weight_packed`` int32 ``[out, ceil(in / (32 // bits))]`` (each word holds
``32 // bits`` codes along the input dimension, the first in the lowest bits, stored as ``code`` with the signed
range's offset ``2**(bits-1)`` already added, which is our unsigned code), ``weight_scale`` ``[out, groups]``,
``weight_zero_point`` int32 ``[ceil(out / (32 // bits)), groups]`` (asymmetric grids; packed the same way along the
output dimension), ``weight_shape`` int64 ``[out, in]``. The dense weight is ``(code − zero) · scale``, ours exactly.
We write no column order (vLLM 0.32 reads no ``g_idx``): act-order needs ``static_groups``. We read one
(``weight_g_idx`` ``[in]``, llm-compressor's ``actorder: group``). Which layer holds which scheme: the first of the
``config_groups`` targets matching it, exact names before ``re:`` patterns before class names (``Linear``), as
compressed-tensors orders them; ``ignore`` leaves a layer dense.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_gptq.nn import AUTO, QuantLinear

from . import shards as shard_io
from .gptq_format import (
    FORMAT_REVISION,
    V2,
    CheckpointError,
    GPTQSettings,
    check_layer_values,
    layer_grids_rules,
    names_pattern,
    natural_g_idx,
)
from .hf import (
    GPTQReader,
    check_hf_model,
    check_save_args,
    linear_shape,
    load_with,
    publish,
    staging_for,
    state_to_save,
    write_model_files,
)
from .names import file_names_of

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


def unpack_along_rows(words: Tensor, bits: int, cols: int) -> Tensor:
    """``pack_along_rows`` undone: int32 ``[rows, words]`` → uint8 codes ``[rows, cols]``."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    codes = (words.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> shifts & ((1 << bits) - 1)
    return codes.reshape(words.shape[0], -1)[:, :cols].to(torch.uint8)


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
    if any(s.desc_act and s.group_size != -1 for s in quantized.values()):
        problems.append("it stores no column order: act-order needs static_groups=true")
    ragged = sorted(n for n, s in quantized.items() if s.group_size > 0 and shapes[n][0] % s.group_size)
    if ragged:
        problems.append(f"it needs whole groups: in_features of {ragged[0]} ({shapes[ragged[0]][0]}) and "
                        f"{len(ragged) - 1} more are not multiples of the group size")
    return problems


def quantization_config(layers: dict[str, QuantLinear], ignore: list[str]) -> dict:
    """``config.json["quantization_config"]``: the most common grid for every ``Linear``, each other grid for its
    layers by exact name (exact names win over the class name in compressed-tensors and in vLLM; ``ignore``: the
    dense linears)."""
    by_grid: dict[tuple[int, int, bool], list[str]] = {}
    for name, m in layers.items():
        by_grid.setdefault((m.bits, m.group_size, m.sym), []).append(name)
    order = sorted(by_grid, key=lambda grid: -len(by_grid[grid]))  # stable: ties keep the model's order
    groups = {}
    for i, (bits, group_size, sym) in enumerate(order):
        weights = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False, "actorder": None,
                   "strategy": "channel" if group_size == -1 else "group",
                   "group_size": None if group_size == -1 else group_size}
        targets = ["Linear"] if i == 0 else sorted(by_grid[(bits, group_size, sym)])
        groups[f"group_{i}"] = {"targets": targets, "weights": weights, "input_activations": None,
                                "output_activations": None}
    return {"quant_method": FORMAT, "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None}


def save_compressed_tensors(model: nn.Module, tokenizer, folder: str | os.PathLike, *, max_shard_size: int | str = "4GB",
                            dtype: torch.dtype | str | None = None, settings: dict | None = None,
                            names: str = "files") -> Path:
    """Write ``model`` (its linears ``QuantLinear``) to ``folder`` in the compressed-tensors ``pack-quantized``
    layout, one config group per grid. ``dtype``: of every floating tensor (default: as in memory). ``names``: as
    ``save_quantized``'s (targets and ``ignore`` are written in the same spelling). Every quantized
    linear must keep its groups contiguous and hold whole groups (``CheckpointError`` otherwise, before anything is
    written).
    Written to ``<folder>.partial`` and renamed."""
    check_hf_model(model)
    cast = check_save_args(max_shard_size, dtype)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("the model has no quantized layers to save")
    rename = file_names_of(model, names)
    head = model.get_output_embeddings()
    ignore = sorted(rename(n) for n, m in model.named_modules()  # the dense linears, the LM head among them
                    if m is head or isinstance(m, nn.Linear) and not isinstance(m, QuantLinear))
    config_block = {**quantization_config({rename(n): m for n, m in layers.items()}, ignore),
                    "lightning_gptq": {**(settings if settings is not None else getattr(model, "gptq_settings", None)
                                          or {}), "format_revision": FORMAT_REVISION}}
    state = state_to_save(model, cast)
    for name, layer in layers.items():
        for packed in layer.packed_tensors():  # the GPTQ layout's tensors, replaced by this layout's
            state.pop(f"{name}.{packed}")
        state.update({f"{name}.{k}": v.to(cast) if cast is not None and v.is_floating_point() else v
                      for k, v in layer_tensors(layer).items()})
    state = {rename(name): tensor for name, tensor in state.items()}  # Mixtral's block_sparse_moe.experts.<e>.w1, ...
    folder = Path(os.path.abspath(os.path.expanduser(folder)))  # ("." and "~/x": a name to stage beside)
    staging = staging_for(folder)
    digests = shard_io.write({n: t.contiguous() for n, t in state.items()}, staging, max_shard_size)
    dtype = next((t.dtype for n, t in state.items() if t.is_floating_point() and not n.endswith(".weight_scale")),
                 torch.float32)
    config_block["lightning_gptq"] = {**config_block["lightning_gptq"], "sha256": digests}
    write_model_files(staging, model, tokenizer, config_block, dtype)
    return publish(staging, folder)


# -- reading -------------------------------------------------------------------------------------
PRESETS = {  # compressed-tensors' preset schemes a config group may name instead of spelling its weights out
    "W4A16": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128},
    "W4A16_ASYM": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 128},
    "W8A16": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128},
}
PACKED = "pack-quantized"


def is_compressed_tensors_folder(folder: Path) -> bool:
    try:
        block = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(block, dict) and block.get("quant_method") == FORMAT


def _scheme(name: str, group, default_format: str, source: str) -> tuple[list[str], GPTQSettings | str]:
    """``(targets, settings)`` of one config group; ``settings`` is why we cannot read it when it is a string."""
    if isinstance(group, list):  # {"W4A16": ["Linear"]}: a preset named by the group's key
        targets, weights, fmt, activations = group, PRESETS.get(name), default_format, None
        if weights is None:
            return targets, f"preset scheme {name!r} (readable presets: {', '.join(PRESETS)})"
    elif isinstance(group, dict):
        targets, weights = group.get("targets") or [], group.get("weights")
        fmt, activations = group.get("format") or default_format, group.get("input_activations")
    else:
        raise CheckpointError(f"{source}: config group {name!r} is neither a scheme nor a preset's targets")
    if fmt != PACKED:
        return targets, f"format {fmt!r} (this tool reads {PACKED!r}: integer weights packed in int32)"
    if not weights or weights.get("type", "int") != "int" or weights.get("dynamic"):
        return targets, "weights that are not static integer grids"
    if activations:
        return targets, "quantized activations (this tool reads weight-only schemes)"
    bits, strategy, size = int(weights.get("num_bits", 8)), weights.get("strategy"), weights.get("group_size")
    if strategy is None:  # as compressed-tensors infers it
        strategy = "channel" if size == -1 else "group" if size else "tensor"
    if not 2 <= bits <= 8:
        return targets, f"{bits}-bit weights (2 to 8 are read)"
    if strategy not in ("group", "channel"):
        return targets, f"strategy {strategy!r} (group and channel are read)"
    group_size = int(size or 0) if strategy == "group" else -1
    if strategy == "group" and group_size < 1:
        raise CheckpointError(f"{source}: config group {name!r} has strategy 'group' but group_size {size!r}")
    settings = GPTQSettings(bits=bits, group_size=group_size, sym=bool(weights.get("symmetric", True)),
                            desc_act=weights.get("actorder") == "group", checkpoint_format=V2)
    return targets, settings


def _matches(name: str, linear: nn.Module, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    if target == "Linear":  # any linear layer, GPT-2's Conv1D too (vLLM likewise lets its LinearBase match it)
        return True
    return target == name or any(cls.__name__ == target for cls in type(linear).__mro__)


class CompressedTensorsReader(GPTQReader):
    """A compressed-tensors ``pack-quantized`` folder opened for reading (see ``GPTQReader``): each quantized layer
    becomes a ``QuantLinear`` holding the same codes, scales and zero points, so its dense weight is the file's
    ``(code − zero) · scale`` exactly."""

    QUANTIZED = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape", "bias")
    MARKER = "weight_packed"

    def __init__(self, folder: str | os.PathLike, **kwargs):
        super().__init__(folder, **kwargs)
        # The folder's settings as the GPTQ layout states them: a base grid and rules under which every layer reads
        # back with its own grid (what save_quantized writes again, what vLLM's rules are checked against).
        # The ignore list's linears (the head aside) become one `-:` rule, so they read back dense.
        grids = {self.file_name(n): (s.bits, s.group_size, s.sym) for n, s in self.layer_settings.items()}
        head = self.model.get_output_embeddings()
        dense = [self.file_name(n) for n, m in self.model.named_modules()
                 if n not in self.layers and m is not head and linear_shape(m) is not None]
        rules = {"-:" + names_pattern(dense): {}} if dense else None
        (bits, group_size, sym), dynamic = layer_grids_rules(grids, rules, dense)
        self.settings = GPTQSettings(bits=bits, group_size=group_size, sym=sym, checkpoint_format=V2, dynamic=dynamic,
                                     desc_act=any(s.desc_act for s in self.layer_settings.values()),
                                     meta=self.settings.meta)

    def _read_settings(self) -> GPTQSettings:
        source = self.folder / "config.json"
        try:
            block = json.loads(source.read_text()).get("quantization_config") or {}
        except (OSError, ValueError, AttributeError) as error:
            raise CheckpointError(f"{source}: not readable as JSON ({error})") from None
        if block.get("quant_method") != FORMAT:
            raise CheckpointError(f"{source}: quant_method is {block.get('quant_method')!r}, not {FORMAT!r}")
        status = block.get("quantization_status", "compressed")
        if status != "compressed":
            raise CheckpointError(f"{source}: quantization_status is {status!r}: the weights are stored unpacked; load "
                                  "it as a dense model with transformers")
        groups = block.get("config_groups") or {}
        if not isinstance(groups, dict) or not groups:
            raise CheckpointError(f"{source}: config_groups is missing or empty")
        default_format = block.get("format") or PACKED
        self.schemes = {name: _scheme(name, group, default_format, str(source)) for name, group in groups.items()}
        self.ignore = list(block.get("ignore") or [])
        usable = [s for _, s in self.schemes.values() if isinstance(s, GPTQSettings)]
        if not usable:
            raise CheckpointError(f"{source}: no config group this tool reads: "
                                  + "; ".join(f"{n}: {s}" for n, (_, s) in self.schemes.items()))
        meta = block.get("lightning_gptq")
        return replace(usable[0], meta={"lightning_gptq": meta} if isinstance(meta, dict) else {})

    def _settings_of(self, name: str, linear: nn.Module, where: str) -> GPTQSettings:
        spellings = {name, self.file_name(name)}  # targets name the layer as the files do, or (ours before) the model
        if any(_matches(n, linear, t) for t in self.ignore for n in spellings):
            raise CheckpointError(f"{where}: {name} has packed tensors, but the config's ignore list leaves it dense")
        # compressed-tensors' precedence: exact names, then patterns (sorted), then class names
        hits = [(0 if t in spellings else 1 if t.startswith("re:") else 2, t, group)
                for group, (targets, _) in self.schemes.items() for t in targets
                if any(_matches(n, linear, t) for n in spellings)]
        if not hits:
            raise CheckpointError(f"{where}: {name} has packed tensors, but no config group targets it")
        group = min(hits, key=lambda hit: hit[:2])[2]
        settings = self.schemes[group][1]
        if isinstance(settings, str):
            raise CheckpointError(f"{where}: {name} is quantized by config group {group!r}, which has {settings}")
        if f"{name}.weight_g_idx" in self.files.shapes and not settings.desc_act:  # a column order, whatever the config says
            settings = replace(settings, desc_act=True)
        return settings

    def layout_name(self) -> str:
        return FORMAT

    def _check_header(self, name: str, in_features: int, out_features: int, where: str) -> None:
        settings, shapes, dtypes = self.layer_settings[name], self.files.shapes, self.files.dtypes
        per_word, groups = 32 // settings.bits, 1 if settings.group_size == -1 else -(-in_features // settings.group_size)
        want = {"weight_packed": ((out_features, -(-in_features // per_word)), ("I32",)),
                "weight_scale": ((out_features, groups), ("F16", "BF16", "F32")),
                "weight_shape": ((2,), ("I64", "I32"))}
        if not settings.sym:
            want["weight_zero_point"] = ((-(-out_features // per_word), groups), ("I32",))
        if settings.desc_act:
            want["weight_g_idx"] = ((in_features,), ("I32", "I64"))
        grid = f"{settings.bits}-bit, group size {settings.group_size}, {'sym' if settings.sym else 'asym'}"
        for key, (shape, kinds) in want.items():
            full = f"{name}.{key}"
            if full not in shapes:
                raise CheckpointError(f"{where}: tensor {full} is missing ({grid})")
            if tuple(shapes[full]) != shape:
                raise CheckpointError(f"{where}: {full} has shape {list(shapes[full])}, expected {list(shape)} for a "
                                      f"{out_features}x{in_features} layer ({grid})")
            if dtypes[full] not in kinds:
                raise CheckpointError(f"{where}: {full} is {dtypes[full]}, expected {' or '.join(kinds)}")

    def _layer(self, name: str, in_features: int, out_features: int, has_bias: bool) -> QuantLinear:
        settings, at = self.layer_settings[name], self._where(name + ".weight_packed")
        stored = self._read(f"{name}.weight_shape").tolist()
        if stored != [out_features, in_features]:
            raise CheckpointError(f"{at}: {name}.weight_shape is {stored}, the model's layer is "
                                  f"[{out_features}, {in_features}]")
        bits = settings.bits
        scales = self._read(f"{name}.weight_scale").to(self.dtype)                          # [out, groups]
        g_idx = (self._read(f"{name}.weight_g_idx").to(torch.int32) if settings.desc_act
                 else natural_g_idx(in_features, settings.group_size))
        check_layer_values(name, scales.T, g_idx, settings.group_size, at)
        codes = unpack_along_rows(self._read(f"{name}.weight_packed"), bits, in_features)
        if settings.sym:
            zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.uint8)
        else:  # packed along the output dimension
            zeros = unpack_along_rows(self._read(f"{name}.weight_zero_point").T.contiguous(), bits, out_features).T
        layer = QuantLinear(in_features, out_features, bits=bits, group_size=settings.group_size, sym=settings.sym,
                            bias=has_bias, dtype=self.dtype)
        layer.set_weight(codes, scales, zeros, g_idx)
        self._read_bias(name, layer)
        return layer


def load_compressed_tensors(folder: str | os.PathLike, *, backend: str = AUTO, dtype: torch.dtype | str = torch.float32,
                            verify: bool = True, trust_remote_code: bool = False):
    """``(model, tokenizer)`` from a compressed-tensors ``pack-quantized`` folder (ours, llm-compressor's integer
    weight-only ones), eval mode, on CPU, quantized layers on ``backend``. As ``load_gptq``; raises ``CheckpointError``."""
    return load_with(CompressedTensorsReader, folder, backend=backend, dtype=dtype, verify=verify,
                     trust_remote_code=trust_remote_code)
