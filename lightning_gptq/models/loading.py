"""Load a Hugging Face causal LM and its tokenizer from the hub, a local folder or a GGUF file.

A GGUF file is dequantized by transformers on every load (15-30 s for a 135M model on a CPU), so the
first load converts it once into a plain HF folder under the project cache, keyed on the file's
path, size and modification time; later loads read that folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lightning_gptq._hub import cache_root, hub_access, hub_reachable, short_hash
from lightning_gptq.models.experts import unfuse_experts

__all__ = ["ModelLoadError", "load_causal_lm", "resolve_dtype", "gguf_cache_folder"]

log = logging.getLogger(__name__)

_DTYPE_NAMES = {
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_CONVERSION_MARKER = "lightning_gptq_gguf_source.json"


class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be loaded; the message says what was tried."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """`"float32"`/`"fp32"`/`"bf16"`/... or a `torch.dtype` -> `torch.dtype`; `"auto"` is passed through."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name == "auto":
        return "auto"
    if name not in _DTYPE_NAMES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPE_NAMES)} or 'auto'.")
    return _DTYPE_NAMES[name]


def _looks_like_path(model: str) -> bool:
    return (
        model.startswith(("/", "./", "../", "~", "."))
        or model.count("/") > 1
        or os.sep != "/" and os.sep in model
        or model.lower().endswith(".gguf")
    )


def _how_to_point_locally() -> str:
    return (
        "To use a local copy, pass a folder holding config.json, the weights and the tokenizer "
        "(model='/path/to/folder'), or a GGUF file (model='/path/to/model.gguf', or "
        "model='/path/to/folder', gguf_file='model.gguf')."
    )


def gguf_cache_folder(gguf_path: str | os.PathLike) -> Path:
    """Where the plain-HF conversion of a local GGUF file lives (keyed on path, size, mtime)."""
    path = Path(gguf_path).resolve()
    stat = path.stat()
    key = short_hash(str(path), stat.st_size, stat.st_mtime_ns)
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def _convert_gguf(folder: str, gguf_file: str, target: Path, *, trust_remote_code: bool, revision: str | None) -> None:
    """Dequantize a GGUF file with transformers and save model + tokenizer as a plain HF folder."""
    log.info("Converting %s/%s to a plain HF folder at %s (one time)", folder, gguf_file, target)
    common = dict(gguf_file=gguf_file, trust_remote_code=trust_remote_code, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **common)
    tokenizer = AutoTokenizer.from_pretrained(folder, **common)
    # transformers marks GGUF loads as quantized, and save_pretrained refuses those although the
    # weights are ordinary dequantized tensors by now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attribute in ("hf_quantizer", "quantization_method"):
        if getattr(model, attribute, None) is not None:
            setattr(model, attribute, None)
    model.is_quantized = False

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _CONVERSION_MARKER).write_text(
            json.dumps({"folder": str(folder), "gguf_file": gguf_file, "revision": revision}, indent=2)
        )
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / _CONVERSION_MARKER).exists():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_gguf_whole(model: str, path: Path) -> None:
    """``ModelLoadError`` when the GGUF file ``path`` ends before its header or its last tensor does (a
    truncated download or copy), before transformers reads it."""
    try:
        from transformers.integrations.gguf.reader import GgufHeader
    except ImportError:  # (another transformers: its own reader says what is wrong)
        return
    size = path.stat().st_size
    try:
        header = GgufHeader.from_file(str(path))
    except (struct.error, UnicodeDecodeError):
        reason = "it ends inside its header (the metadata or the tensor table)"
    except ValueError:  # not GGUF at all, or a type it cannot read: transformers' own message follows
        return
    else:
        end = header.data_start + max((t.offset + t.nbytes for t in header.tensors), default=0)
        if end <= size:
            return
        reason = f"its tensors end at byte {end:,}"
    raise ModelLoadError(f"Could not load model {model!r}: GGUF file {str(path)!r} is truncated or unreadable: "
                         f"{size:,} bytes, and {reason}. Download or copy it again.")


def _load_from(source: str, *, dtype, trust_remote_code: bool, revision: str | None, local: bool):
    common = dict(trust_remote_code=trust_remote_code, revision=revision)
    if local:
        common["local_files_only"] = True
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **common)
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    return model, tokenizer


def _refuse_compressed_tensors(folder: Path) -> None:
    """A compressed-tensors folder is read by ``lightning_gptq.load_quantized`` (as ``validate`` does), not here."""
    from lightning_gptq.checkpoint.compressed_tensors import is_compressed_tensors_folder

    if is_compressed_tensors_folder(folder):
        raise ModelLoadError(f"{folder} is a compressed-tensors checkpoint: read it with lightning_gptq.load_quantized "
                             "(validate and predict do), not as a full-precision model")


def load_causal_lm(
    model: str,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `(model, tokenizer)` in eval mode.

    `model` is a hub id, a local folder, or a path to a `.gguf` file (then `gguf_file` is derived).
    With `gguf_file`, `model` is the folder (or hub repo) holding it. Local GGUF files are converted
    once to a plain HF folder in the cache (`$LIGHTNING_GPTQ_CACHE`, default
    `~/.cache/lightning_gptq`) and loaded from there afterwards; the result carries no
    `quantization_config`, so `save_pretrained` accepts it.

    Raises `ModelLoadError` (one message: what was tried, how to point at a local copy) when the
    path does not exist or the hub cannot be reached; it does not retry.
    """
    torch_dtype = resolve_dtype(dtype)
    model = os.fspath(model)
    expanded = os.path.expanduser(model)
    if gguf_file is None and expanded.lower().endswith(".gguf"):
        expanded, gguf_file = os.path.dirname(expanded) or ".", os.path.basename(expanded)

    is_local = os.path.isdir(expanded)
    if os.path.isfile(expanded):
        raise ModelLoadError(
            f"Could not load model {model!r}: {expanded!r} is a file that is neither a folder nor a .gguf file. "
            + _how_to_point_locally()
        )
    if not is_local and (_looks_like_path(model) or gguf_file is not None and os.path.isabs(expanded)):
        missing = os.path.join(expanded, gguf_file) if gguf_file else expanded
        raise ModelLoadError(
            f"Could not load model {model!r}: the local path {missing!r} does not exist. " + _how_to_point_locally()
        )

    try:
        if gguf_file is not None and is_local:
            gguf_path = Path(expanded, gguf_file)
            if not gguf_path.is_file():
                raise ModelLoadError(
                    f"Could not load model {model!r}: GGUF file {str(gguf_path)!r} does not exist. "
                    + _how_to_point_locally()
                )
            target = gguf_cache_folder(gguf_path)
            if not (target / _CONVERSION_MARKER).exists():
                _check_gguf_whole(model, gguf_path)
                _convert_gguf(expanded, gguf_file, target, trust_remote_code=trust_remote_code, revision=revision)
            loaded = _load_from(str(target), dtype=torch_dtype, trust_remote_code=trust_remote_code, revision=None,
                                local=True)
        elif is_local:
            _refuse_compressed_tensors(Path(expanded))
            loaded = _load_from(expanded, dtype=torch_dtype, trust_remote_code=trust_remote_code, revision=revision,
                                local=True)
        else:
            reachable = hub_reachable()
            with hub_access():
                if gguf_file is not None:
                    common = dict(gguf_file=gguf_file, trust_remote_code=trust_remote_code, revision=revision)
                    hub_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, **common)
                    if hasattr(hub_model.config, "quantization_config"):
                        del hub_model.config.quantization_config
                    loaded = hub_model, AutoTokenizer.from_pretrained(model, **common)
                else:
                    loaded = _load_from(model, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                        revision=revision, local=False)
    except ModelLoadError:
        raise
    except (OSError, ValueError, ImportError, KeyError) as error:
        if is_local:
            where = f"the local folder {expanded!r}" + (f" (GGUF file {gguf_file!r})" if gguf_file else "")
        else:
            hub_state = "reachable" if reachable else "unreachable: offline mode or no connection; only the HF cache was searched"
            where = f"a local folder {expanded!r} (none exists) and the Hugging Face hub ({hub_state})"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"Could not load model {model!r}. Tried: {where}. Cause: {type(error).__name__}: {first_line[:300]} "
            + _how_to_point_locally()
        ) from error

    lm, tokenizer = loaded
    lm.eval()
    unfuse_experts(lm)  # a MoE's expert banks as one linear per projection: what GPTQ quantizes
    return lm, tokenizer
