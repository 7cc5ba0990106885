"""Whether GPU servers will load a checkpoint: group sizes their kernels take.

vLLM's GPTQ, GPTQ-Marlin and ExLlama paths and GPTQModel's default kernels refuse a layer whose
``in_features`` is not a whole number of groups (they index scales by ``k // group_size`` over
whole groups); our own backends and transformers' torch path take a ragged last group. SmolLM2's
576-wide inputs at g128 are such a case: g64 serves.
"""

from __future__ import annotations

from typing import Mapping

#: group sizes the GPU kernels above ship for (besides per-row, -1)
SERVED_GROUP_SIZES = (128, 64, 32)


def ragged_layers(in_features: Mapping[str, int], group_size: int) -> list[str]:
    """Names of the layers whose ``in_features`` is not a multiple of ``group_size`` (none at -1)."""
    if group_size <= 0:
        return []
    return [name for name, k in in_features.items() if k % group_size]


def serving_group_size(in_features: Mapping[str, int], group_size: int) -> int:
    """The largest served group size not above ``group_size`` that divides every ``in_features``
    (-1, one grid per row, when none does)."""
    widths = set(in_features.values())
    for g in SERVED_GROUP_SIZES:
        if g <= group_size and all(k % g == 0 for k in widths):
            return g
    return -1


def serving_warning(in_features: Mapping[str, int], group_size: int, shown: int = 4) -> str | None:
    """One warning naming the layers GPU servers will refuse at ``group_size`` and a group size that
    would serve, or None when every layer is a whole number of groups."""
    ragged = ragged_layers(in_features, group_size)
    if not ragged:
        return None
    widths = sorted({in_features[n] for n in ragged})
    names = ", ".join(ragged[:shown]) + (f" and {len(ragged) - shown} more" if len(ragged) > shown else "")
    better = serving_group_size(in_features, group_size)
    fix = f"group_size={better}" if better > 0 else "group_size=-1 (one grid per row)"
    return (f"{len(ragged)} layers have in_features ({', '.join(map(str, widths))}) that are not a multiple of "
            f"group_size={group_size}: {names}. This tool, transformers and CPU serving load them, but vLLM's "
            f"GPTQ/Marlin/ExLlama kernels and GPTQModel's default kernels refuse such layers; {fix} would serve there.")
