"""Tensor names that checkpoint files spell differently from the modules transformers 5 builds.

GPT-NeoX (Pythia): the files name the head ``embed_out``, transformers 5 ``lm_head``.

Mixtral: transformers' own files (``save_pretrained``, in 4 and 5), vLLM and Mixtral GPTQ checkpoints of the
transformers 4 era name the MoE block ``block_sparse_moe`` and its experts' projections ``w1`` (gate), ``w3`` (up),
``w2`` (down); transformers 5 calls the block ``mlp`` (and keeps the experts fused, which ``models.unfuse_experts`` splits into
``experts.<e>.gate_proj`` / ``up_proj`` / ``down_proj``).

Files are read in either spelling and written in one of two (``SPELLINGS``): ``"files"`` (default), the names
transformers' own ``save_pretrained`` writes, which vLLM reads; or ``"modules"``, the model's module names in
transformers 5, which GPTQModel 7 writes and reads (it refuses a Mixtral GPTQ folder in the files' spelling, and vLLM
one in the modules' spelling: docs/architectures.md, "Other tools and MoE folders").
"""

from __future__ import annotations

import re
from typing import Callable

__all__ = ["SPELLINGS", "file_names", "file_names_of", "model_names"]

#: how a writer spells tensor names: as transformers' own files do (vLLM reads these), or as its modules are named
SPELLINGS = ("files", "modules")

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


def check_spelling(names: str) -> str:
    if names not in SPELLINGS:
        raise ValueError(f"names must be one of {', '.join(map(repr, SPELLINGS))}, got {names!r}")
    return names


def file_names_of(model, names: str = "files") -> Callable[[str], str]:
    """``file_names`` of ``model``'s type, or the names unchanged where its files use the model's names or ``names``
    is ``"modules"``."""
    rename = file_names(getattr(getattr(model, "config", None), "model_type", None))
    return rename if check_spelling(names) == "files" and rename is not None else (lambda name: name)
