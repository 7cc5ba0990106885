"""Tensor names that checkpoint files spell differently from the modules transformers 5 builds.

GPT-NeoX (Pythia): the files name the head ``embed_out``, transformers 5 ``lm_head``.

Mixtral: transformers 4, vLLM, GPTQModel and every Mixtral GPTQ checkpoint name the MoE block
``block_sparse_moe`` and its experts' projections ``w1`` (gate), ``w3`` (up), ``w2`` (down); transformers 5
calls the block ``mlp`` (and keeps the experts fused, which ``models.unfuse_experts`` splits into
``experts.<e>.gate_proj`` / ``up_proj`` / ``down_proj``). Files are written in the checkpoint spelling and
read in either.
"""

from __future__ import annotations

import re
from typing import Callable

__all__ = ["file_names", "file_names_of", "model_names"]

_MIXTRAL_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_TO_FILE = {
    "mixtral": [(re.compile(rf"\.mlp\.experts\.(\d+)\.{ours}(?=\.|$)"), rf".block_sparse_moe.experts.\1.{theirs}")
                for theirs, ours in _MIXTRAL_EXPERT.items()] + [(re.compile(r"\.mlp\.(?=experts\.|gate(\.|$))"),
                                                                 ".block_sparse_moe.")],
    "gpt_neox": [(re.compile(r"^lm_head(?=\.|$)"), "embed_out")],
}
_TO_MODEL = {
    "mixtral": [(re.compile(rf"\.block_sparse_moe\.experts\.(\d+)\.{theirs}(?=\.|$)"), rf".mlp.experts.\1.{ours}")
                for theirs, ours in _MIXTRAL_EXPERT.items()] + [(re.compile(r"\.block_sparse_moe\."), ".mlp.")],
    "gpt_neox": [(re.compile(r"^embed_out(?=\.|$)"), "lm_head")],
}


def _renamer(rules) -> Callable[[str], str] | None:
    if not rules:
        return None

    def rename(name: str) -> str:
        for pattern, replacement in rules:
            name = pattern.sub(replacement, name)
        return name
    return rename


def file_names(model_type: str | None) -> Callable[[str], str] | None:
    """Model tensor (or layer) name -> the name written to files for ``model_type`` (None: the same names)."""
    return _renamer(_TO_FILE.get(model_type))


def model_names(model_type: str | None) -> Callable[[str], str] | None:
    """File tensor (or layer) name (either spelling) -> the model's tensor name for ``model_type`` (None: the same names)."""
    return _renamer(_TO_MODEL.get(model_type))


def file_names_of(model) -> Callable[[str], str]:
    """``file_names`` of ``model``'s type, or the names unchanged where its files use the model's names."""
    return file_names(getattr(getattr(model, "config", None), "model_type", None)) or (lambda name: name)
