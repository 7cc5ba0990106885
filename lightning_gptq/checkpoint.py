"""Saving and loading a quantized model (interim format until the HF GPTQ format lands).

A folder holds the HF ``config.json`` and tokenizer files, ``model.safetensors`` with every tensor
(quantized layers as ``<name>.codes``/``.scales``/``.zeros``/``.g_idx``), and ``lightning_gptq.json``
naming each quantized layer with its shape and grid settings.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from lightning_gptq.nn import QuantLinear, quant_linear_class, replace_submodule

MANIFEST = "lightning_gptq.json"
WEIGHTS = "model.safetensors"
FORMAT = "lightning-gptq-codes/0"


class CheckpointError(RuntimeError):
    """A quantized checkpoint is missing, incomplete or corrupt."""


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    return Path(path, MANIFEST).is_file()


def save_quantized(model: nn.Module, tokenizer, folder: str | os.PathLike, *, extra: dict | None = None) -> Path:
    """Write ``model`` (with ``QuantLinear`` layers) and ``tokenizer`` to ``folder``; returns the folder.

    Written to a temporary sibling first and renamed, so an interrupted save never leaves a
    half-written checkpoint under the final name.
    """
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted save must not leak in
    staging.mkdir(parents=True)
    layers = {
        name: {"in_features": m.in_features, "out_features": m.out_features, "n_groups": m.scales.shape[1],
               "bits": m.bits, "group_size": m.group_size, "sym": m.sym, "bias": m.bias is not None,
               "backend": m.backend}
        for name, m in model.named_modules() if isinstance(m, QuantLinear)
    }
    model.config.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    save_model(model, str(staging / WEIGHTS))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    manifest = {"format": FORMAT, "dtype": dtype, "layers": layers, **(extra or {})}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
    return folder


def load_quantized(folder: str | os.PathLike, *, backend: str | None = None, trust_remote_code: bool = False):
    """``(model, tokenizer)`` from a folder written by ``save_quantized``; eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder} is not a lightning-gptq checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
        layers = manifest["layers"]
        dtype = getattr(torch, manifest.get("dtype", "float32"))
    except (json.JSONDecodeError, KeyError, AttributeError) as error:
        raise CheckpointError(f"{manifest_path} is corrupt: {error}") from error
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: unsupported format {manifest.get('format')!r} (expected {FORMAT!r})")
    if not (folder / WEIGHTS).is_file():
        raise CheckpointError(f"{folder / WEIGHTS} is missing")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    for name, spec in layers.items():
        cls = quant_linear_class(backend or spec.get("backend", "torch"))
        layer = cls(spec["in_features"], spec["out_features"], spec["n_groups"], bits=spec["bits"],
                    group_size=spec["group_size"], sym=spec["sym"], bias=spec["bias"], dtype=dtype)
        try:
            replace_submodule(model, name, layer)
        except AttributeError as error:
            raise CheckpointError(f"{manifest_path}: layer {name!r} does not exist in a {config.model_type} model") from error
    try:
        missing, unexpected = load_model(model, str(folder / WEIGHTS), strict=False)
    except (SafetensorError, RuntimeError, OSError) as error:
        raise CheckpointError(f"{folder / WEIGHTS} could not be read: {error}") from error
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"{folder / WEIGHTS} does not match the model: missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else None
    return model.eval(), tokenizer
