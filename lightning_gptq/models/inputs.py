"""What a model can take as input, from its config and embedding: how many positions, which token ids."""

from __future__ import annotations

import torch
from torch import nn


def max_positions(config) -> int | None:
    """The longest sequence the model's config allows, where it says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_token_ids(ids: torch.Tensor | int | None, model: nn.Module, said: str) -> None:
    """``ValueError`` (``said`` then the bad id) when ``ids`` hold one the model's input embedding has no row for:
    torch would raise a bare ``IndexError`` mid-run. Nothing is checked without ids or an ``nn.Embedding``-like one."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    ids = torch.as_tensor(ids) if ids is not None else None
    if rows is None or ids is None or ids.numel() == 0 or ids.is_floating_point():
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= rows:
        raise ValueError(f"{said} {low if low < 0 else high}, but the model's embedding has {rows} rows "
                         f"(ids 0..{rows - 1}): made with another model's tokenizer?")
