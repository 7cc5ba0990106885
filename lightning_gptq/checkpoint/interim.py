"""The interim folder layouts written before the HF GPTQ format (``hf``): still loaded, no longer written by ``fit``.

A folder holds the HF ``config.json`` and tokenizer files, ``model.safetensors`` with every tensor
(quantized layers in the ecosystem's packed layout: ``<name>.qweight``/``.qzeros``/``.scales``/
``.g_idx``, zeros stored as true zeros), and ``lightning_gptq.json`` naming each quantized layer
with its shape and grid settings. Folders of the earlier unpacked format (``<name>.codes`` uint8
[out, in], ``FORMAT_V0``) still load: their codes are packed on the way in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_model
from torch import nn

from lightning_gptq.nn import (
    AUTO,
    QuantLinear,
    check_backend,
    replace_submodule,
    to_backend,
)

from .folders import publish, staging_for
from .gptq_format import CheckpointError
from .shards import make_readable

MANIFEST = "lightning_gptq.json"
WEIGHTS = "model.safetensors"
FORMAT = "lightning-gptq-packed/1"
FORMAT_V0 = "lightning-gptq-codes/0"


def is_interim_checkpoint(path: str | os.PathLike) -> bool:
    return Path(path, MANIFEST).is_file()


def save_interim(model: nn.Module, tokenizer, folder: str | os.PathLike, *, extra: dict | None = None) -> Path:
    """Write ``model`` (with ``QuantLinear`` layers) and ``tokenizer`` to ``folder``; returns the folder.

    Written to a temporary sibling first and renamed, so an interrupted save never leaves a
    half-written checkpoint under the final name.
    """
    folder = Path(folder)
    staging = staging_for(folder)
    layers = {
        name: {"in_features": m.in_features, "out_features": m.out_features, "n_groups": m.scales.shape[0],
               "bits": m.bits, "group_size": m.group_size, "sym": m.sym, "bias": m.bias is not None,
               "backend": m.backend}
        for name, m in model.named_modules() if isinstance(m, QuantLinear)
    }
    model.config.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    save_model(model, str(staging / WEIGHTS))
    make_readable(staging / WEIGHTS)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    manifest = {"format": FORMAT, "dtype": dtype, "layers": layers, **(extra or {})}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return publish(staging, folder)


def load_interim(folder: str | os.PathLike, *, backend: str = AUTO, trust_remote_code: bool = False):
    """``(model, tokenizer)`` from a folder written by ``save_interim``; eval mode, on CPU.

    ``backend``: ``"auto"`` (default) picks the fastest backend per layer shape on this machine;
    a registered name forces one.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lightning_gptq.models.experts import unfuse_experts

    check_backend(backend)
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
    if manifest.get("format") not in (FORMAT, FORMAT_V0):
        raise CheckpointError(f"{manifest_path}: unsupported format {manifest.get('format')!r} (expected {FORMAT!r})")
    if not (folder / WEIGHTS).is_file():
        raise CheckpointError(f"{folder / WEIGHTS} is missing")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    unfuse_experts(model, check=False)
    for name, spec in layers.items():
        layer = QuantLinear(spec["in_features"], spec["out_features"], bits=spec["bits"], group_size=spec["group_size"],
                            sym=spec["sym"], bias=spec["bias"], dtype=dtype)
        try:
            replace_submodule(model, name, layer)
        except AttributeError as error:
            raise CheckpointError(f"{manifest_path}: layer {name!r} does not exist in a {config.model_type} model") from error
    try:
        if manifest["format"] == FORMAT_V0:
            missing, unexpected = _load_unpacked_v0(model, folder / WEIGHTS, layers)
        else:
            missing, unexpected = load_model(model, str(folder / WEIGHTS), strict=False)
    except (SafetensorError, RuntimeError, OSError) as error:
        raise CheckpointError(f"{folder / WEIGHTS} could not be read: {error}") from error
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"{folder / WEIGHTS} does not match the model: missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    to_backend(model, backend)
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else None
    return model.eval(), tokenizer


def _load_unpacked_v0(model: nn.Module, path: Path, layers: dict) -> tuple[list[str], list[str]]:
    """Load a ``FORMAT_V0`` file: quantized layers stored their codes unpacked, [out, in] uint8."""
    tensors = load_file(str(path))
    for name in layers:
        layer = model.get_submodule(name)
        try:
            parts = [tensors.pop(f"{name}.{k}") for k in ("codes", "scales", "zeros", "g_idx")]
        except KeyError as error:
            raise CheckpointError(f"{path}: tensor {error} of quantized layer {name!r} is missing") from None
        layer.set_weight(*parts, bias=tensors.pop(f"{name}.bias", None))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    quantized = {f"{n}.{k}" for n in layers for k in ("qweight", "qzeros", "scales", "g_idx", "bias")}
    return [k for k in missing if k not in quantized], list(unexpected)
