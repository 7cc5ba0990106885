"""Write and read quantized models in the Hugging Face GPTQ layout (AutoGPTQ / GPTQModel / transformers).

A folder holds ``config.json`` (with ``quantization_config``), ``quantize_config.json``,
``model.safetensors`` (or shards + ``model.safetensors.index.json``), the tokenizer and the generation
config. Quantized tensors are the quantized layers' own packed buffers; every other tensor is
stored as it is in memory. Our checkpoints record each weight file's sha256 in
``quantization_config.meta.lightning_gptq.sha256``, checked on load.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from lightning_gptq.nn import (
    AUTO,
    QuantLinear,
    check_backend,
    replace_submodule,
    to_backend,
)

from . import shards as shard_io
from .gptq_format import (
    FORMAT_REVISION,
    FORMATS,
    QUANTIZE_CONFIG,
    TOOL,
    V1,
    V2,
    CheckpointError,
    GPTQSettings,
    check_layer_header,
    check_layer_values,
    layer_grids_rules,
    natural_g_idx,
    v1_is_lossless,
    words_from_file,
    words_to_file,
    zeros_from_file,
    zeros_to_file,
)
from .folders import publish, staging_for
from .names import file_names_of, model_names

log = logging.getLogger("lightning_gptq")
AUTO_FORMAT = "auto"


def _version() -> str:
    from lightning_gptq import __version__

    return __version__


def is_gptq_folder(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return (folder / QUANTIZE_CONFIG).is_file()
    return (config.get("quantization_config") or {}).get("quant_method") == "gptq" or (folder / QUANTIZE_CONFIG).is_file()


# -- writing -------------------------------------------------------------------------------------
def save_gptq(model: nn.Module, tokenizer, folder: str | os.PathLike, *, checkpoint_format: str = AUTO_FORMAT,
              max_shard_size: int | str = "4GB", desc_act: bool | None = None, damp_percent: float | None = None,
              static_groups: bool | None = None, true_sequential: bool | None = None, settings: dict | None = None,
              dtype: torch.dtype | str | None = None, dynamic: dict | None = None, names: str = "files") -> Path:
    """Write ``model`` (its linears replaced by ``QuantLinear``) to ``folder`` in the HF GPTQ layout.

    ``checkpoint_format``: ``"auto"`` (v1 ``gptq`` when lossless for this model, else ``gptq_v2``),
    ``"gptq"`` (refused when a zero point is 0) or ``"gptq_v2"``. ``settings``: our own settings,
    recorded under ``meta.lightning_gptq``; by default those ``quantize()`` left on the model (``model.gptq_settings``),
    which also give ``damp_percent``, ``static_groups`` and ``true_sequential`` when not passed (else 0.01, False,
    True). ``dtype``: store every floating tensor (unquantized
    weights, scales, biases) in this dtype (e.g. ``"float16"``, what serving stacks expect, about
    half the size of fp32 embeddings); default: as in memory (lossless). Layers of other bits, group sizes or grids
    than most are recorded as ``dynamic`` rules: ``dynamic`` (the rules they were quantized by, checkpoint spelling)
    where those describe every layer, else one exact-name rule per grid (and a ``-:`` rule for full-precision
    linears where other blocks have quantized ones); by default the rules of the folder ``load_quantized`` read
    (``model.gptq_dynamic``). ``names``: ``"files"`` (tensor names as transformers' own files spell them; vLLM reads
    these) or ``"modules"`` (the model's module names; GPTQModel 7 reads these): they differ for Mixtral's experts and
    GPT-NeoX's head only (``checkpoint.names``). Written to ``<folder>.partial`` and renamed,
    so an interrupted save never leaves a half-written checkpoint under the final name.
    """
    if checkpoint_format not in (AUTO_FORMAT, *FORMATS):
        raise ValueError(f"checkpoint_format must be 'auto', 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
    settings = settings if settings is not None else getattr(model, "gptq_settings", None)
    quant = (settings or {}).get("quant") or {}
    damp_percent = quant.get("damp", 0.01) if damp_percent is None else damp_percent
    static_groups = quant.get("static_groups", False) if static_groups is None else static_groups
    true_sequential = (settings or {}).get("true_sequential", True) if true_sequential is None else true_sequential
    check_hf_model(model)
    cast = check_save_args(max_shard_size, dtype)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("the model has no quantized layers to save")
    dense = [n for n, m in model.named_modules() if linear_shape(m) is not None]
    if dynamic is None:
        dynamic = getattr(model, "gptq_dynamic", None)  # a loaded model: its folder's rules
    rename = file_names_of(model, names)
    # the rules are checked against (and written in) the names the files use, which other tools match them against
    (bits, group_size, sym), dynamic = layer_grids_rules({rename(n): (m.bits, m.group_size, m.sym) for n, m in layers.items()},
                                                         dynamic, map(rename, dense))
    fmt = checkpoint_format
    if fmt == AUTO_FORMAT:
        lossless = v1_is_lossless([m.zero_points() for m in layers.values()])
        fmt = V1 if lossless else V2
        log.info("checkpoint_format %s: %s", fmt, "every zero point is >= 1, so v1 (zero - 1, read by most loaders) "
                 "is lossless" if lossless else "some zero points are 0, which v1 (zero - 1) cannot store")
    if desc_act is None:
        desc_act = any(m.act_order for m in layers.values())
    _warn_other_readers(fmt, sym, dynamic)
    _warn_moe_readers(model, names)

    state = state_to_save(model, cast)
    for name, m in layers.items():
        zeros = zeros_to_file(state[f"{name}.qzeros"], m.bits, m.out_features, fmt)
        state[f"{name}.qzeros"] = words_to_file(zeros, m.out_features, m.bits, dim=1)
        state[f"{name}.qweight"] = words_to_file(state[f"{name}.qweight"], m.in_features, m.bits, dim=0)
    state = {rename(name): tensor for name, tensor in state.items()}  # Mixtral's block_sparse_moe.experts.<e>.w1, ...

    folder = Path(os.path.abspath(os.path.expanduser(folder)))  # ("." and "~/x": a name to stage beside)
    staging = staging_for(folder)
    digests = shard_io.write(state, staging, max_shard_size)
    dtype = next((t.dtype for n, t in state.items() if t.is_floating_point() and not n.endswith(".scales")), torch.float32)
    gptq = GPTQSettings(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, checkpoint_format=fmt,
                        damp_percent=damp_percent, static_groups=static_groups, true_sequential=true_sequential,
                        meta=_meta(settings, digests), dynamic=dynamic)
    _write_configs(staging, model, tokenizer, gptq, dtype)
    return publish(staging, folder)


def check_hf_model(model: nn.Module) -> None:
    """ValueError unless ``model`` is a Hugging Face model (a config to write beside the tensors), naming one inside
    it when there is (a LightningModule's ``.lm``)."""
    if getattr(model, "config", None) is not None and hasattr(model.config, "to_dict"):
        return
    inner = [name for name, m in model.named_modules() if name and hasattr(getattr(m, "config", None), "to_dict")]
    raise ValueError(f"a checkpoint folder holds a Hugging Face model, and this {type(model).__name__} has no config"
                     + (f": pass the model inside it, `.{inner[0]}`" if inner else ""))


def check_save_args(max_shard_size: int | str, dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The dtype to store floating tensors in (None: as in memory); bad sizes and dtypes fail before any writing."""
    shard_io.parse_size(max_shard_size)
    cast = getattr(torch, dtype, dtype) if isinstance(dtype, str) else dtype  # an unknown name stays a str: refused
    if cast is not None and not (isinstance(cast, torch.dtype) and cast.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype or its name (e.g. 'float16'), got {dtype!r}")
    return cast


def state_to_save(model: nn.Module, cast: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``model``'s state on CPU, a tied tensor (``lm_head`` = ``embed_tokens``) once, floating tensors in ``cast``."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.numel())
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().cpu()
        if cast is not None and state[name].is_floating_point():
            state[name] = state[name].to(cast)
    return state


def _warn_other_readers(fmt: str, sym: bool, dynamic: dict) -> None:
    """What other tools do with per-layer rules (GPTQModel 7.7, transformers 5.25: scripts/check_interop.py)."""
    if not dynamic:
        return
    note = ("per-layer rules (quantization_config.dynamic) are read by GPTQModel.load and vLLM (which matches them "
            "against its fused layer names); transformers' from_pretrained ignores them and refuses the folder")
    if fmt == V1 and not sym:
        note += ("; GPTQModel.load refuses an asymmetric 'gptq' (v1) folder that GPTQModel did not write: save with "
                 "checkpoint_format='gptq_v2' for it")
    log.warning("%s", note)


def _warn_moe_readers(model: nn.Module, names: str) -> None:
    """Which tools read a mixture-of-experts folder (GPTQModel 7.7, transformers 5.25, vLLM 0.32:
    experiments/moe_interop.py)."""
    from lightning_gptq.models.experts import ExpertBank

    if not any(isinstance(m, ExpertBank) for m in model.modules()):
        return
    note = ("mixture-of-experts folder: lightning_gptq.load_quantized and GPTQModel.load read it; transformers' "
            "from_pretrained leaves every expert bank newly initialized (its load report lists them MISSING), so do not "
            "load it that way")
    if getattr(model.config, "model_type", None) == "mixtral":
        note += ("; Mixtral's experts are spelt " + ("as transformers' files spell them (block_sparse_moe.experts.<e>.w1), "
                 "which vLLM reads and GPTQModel.load refuses: checkpoint_names='modules' for GPTQModel" if names == "files"
                 else "as transformers 5 names its modules (mlp.experts.<e>.gate_proj), which GPTQModel.load reads and vLLM "
                 "refuses: checkpoint_names='files' for vLLM"))
    log.warning("%s", note)


def _meta(settings: dict | None, digests: dict[str, str]) -> dict:
    return {"quantizer": [f"{TOOL}:{_version()}"], "uri": "https://github.com/lightning-gptq/lightning-gptq",
            "lightning_gptq": {**(settings or {}), "format_revision": FORMAT_REVISION, "sha256": digests}}


def _write_configs(staging: Path, model: nn.Module, tokenizer, gptq: GPTQSettings, dtype: torch.dtype) -> None:
    (staging / QUANTIZE_CONFIG).write_text(json.dumps(gptq.to_dict(), indent=2) + "\n")
    write_model_files(staging, model, tokenizer, gptq.to_dict(), dtype)


def write_model_files(staging: Path, model: nn.Module, tokenizer, quantization_config: dict, dtype: torch.dtype) -> None:
    """``config.json`` (with ``quantization_config``), ``generation_config.json`` and the tokenizer's files."""
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    # Top-level keys sorted (as transformers writes them), nested ones not: `dynamic`'s order is its first-match order.
    (staging / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2, default=str) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)


# -- reading -------------------------------------------------------------------------------------
def read_settings(folder: Path) -> GPTQSettings:
    """The GPTQ settings of ``folder`` (``config.json``'s ``quantization_config``, else ``quantize_config.json``)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} is missing")
    try:
        block = json.loads(config_path.read_text()).get("quantization_config")
        source = config_path
        if not block and (folder / QUANTIZE_CONFIG).is_file():
            block, source = json.loads((folder / QUANTIZE_CONFIG).read_text()), folder / QUANTIZE_CONFIG
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path} (or {QUANTIZE_CONFIG}) is not valid JSON: {error}") from None
    if not block:
        raise CheckpointError(f"{folder} is not a GPTQ checkpoint: no quantization_config in config.json and no {QUANTIZE_CONFIG}")
    if block.get("dynamic") and source == config_path and (folder / QUANTIZE_CONFIG).is_file():
        # transformers' save_pretrained sorts config.json's keys, nested ones too; quantize_config.json (GPTQModel's
        # own, and ours) keeps the rules' first-match order: the same rules are read in that order.
        try:
            own = json.loads((folder / QUANTIZE_CONFIG).read_text()).get("dynamic")
        except json.JSONDecodeError:
            own = None
        if isinstance(own, dict) and own == block["dynamic"]:
            block = {**block, "dynamic": own}
    return GPTQSettings.from_dict(block, str(source))


def linear_shape(module: nn.Module) -> tuple[int, int, bool] | None:
    """``(in_features, out_features, has_bias)`` of an ``nn.Linear`` or a GPT-2 style ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # weight [in, out]
        return module.weight.shape[0], module.nf, getattr(module, "bias", None) is not None
    return None


def _check_revision(folder: Path, model_type: str, meta: dict) -> None:
    """Refuse a folder this tool wrote in a layout it no longer reads the same way (``FORMAT_REVISION``)."""
    ours = meta.get("lightning_gptq")
    if model_type == "gpt_oss" and isinstance(ours, dict) and ours.get("format_revision", 1) < 2:
        raise CheckpointError(
            f"{folder}: written by lightning-gptq before 2026-12-06 (no format_revision), which split GPT-OSS experts "
            "into their true gate and up outputs; this version reads the fused projection's two halves, as GPTQModel "
            "and vLLM do, and would misread it: quantize the model again")


class GPTQReader:
    """A HF GPTQ folder opened for reading, no tensor data read yet.

    Settings, the recorded sha256 of each weight file, and every tensor's header (name, dtype, shape)
    are checked against ``model``: the architecture built from ``config.json`` with its parameters on
    the meta device. ``fill(module)`` then reads one module's tensors (the whole model, or one block
    at a time for a model bigger than memory). ``plain_io``: read with file reads instead of memory
    maps, so the pages read are not counted as this process's memory. Raises ``CheckpointError``.

    Another layout subclasses it: ``MARKER`` (the tensor that makes ``<layer>.MARKER`` a quantized layer),
    ``QUANTIZED`` (every tensor name a quantized layer may hold), ``_read_settings``, ``_settings_of``,
    ``_check_header``, ``_layer`` and ``layout_name``.
    """

    QUANTIZED = ("qweight", "qzeros", "scales", "g_idx", "bias")
    MARKER = "qweight"

    def __init__(self, folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32, verify: bool = True,
                 trust_remote_code: bool = False, plain_io: bool = False):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from lightning_gptq.models.experts import unfuse_experts  # (models imports transformers' model code)

        self.folder, self.dtype = Path(folder), dtype
        self.settings = self._read_settings()
        config = AutoConfig.from_pretrained(self.folder, trust_remote_code=trust_remote_code)
        self.files = files = shard_io.Shards(self.folder, rename=model_names(config.model_type))
        _check_revision(self.folder, config.model_type, self.settings.meta)
        recorded = self.settings.meta.get("lightning_gptq", {}).get("sha256") or files.index_sha256
        if verify and recorded:
            files.verify(recorded)
        suffix = "." + self.MARKER
        names = sorted(n[: -len(suffix)] for n in files.shapes if n.endswith(suffix))
        if not names:
            raise CheckpointError(f"{self.folder}: the config says {self.layout_name()} but no tensor is named "
                                  f"'<layer>{suffix}'")

        if hasattr(config, "quantization_config"):
            del config.quantization_config  # transformers would look for a quantization integration; we are it
        with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) real
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code).eval()
        unfuse_experts(self.model)  # MoE checkpoints hold one layer per expert projection
        self.file_name = file_names_of(self.model)  # a layer's name in the files
        self.layers: dict[str, tuple[int, int, bool]] = {}  # quantized layer -> (in, out, has bias)
        self.layer_settings: dict[str, GPTQSettings] = {}  # per layer: `dynamic` rules applied
        for name in names:
            where = self._where(name + suffix)
            try:
                linear = self.model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(f"{where}: layer {name!r} does not exist in a {config.model_type} model") from None
            if linear_shape(linear) is None:
                raise CheckpointError(f"{where}: {name!r} is a {type(linear).__name__}, not a linear layer")
            in_features, out_features, has_bias = self.layers[name] = linear_shape(linear)
            self.layer_settings[name] = self._settings_of(name, linear, where)
            self._check_header(name, in_features, out_features, where)
        self._quantized_keys = {f"{n}.{k}" for n in names for k in self.QUANTIZED}
        self._check_other_tensors(config)
        self._read = files.read if plain_io else files.get

    def _read_settings(self) -> GPTQSettings:
        return read_settings(self.folder)

    def layout_name(self) -> str:
        """For messages: ``gptq`` (v1), ``gptq_v2``, ``compressed-tensors``."""
        return self.settings.checkpoint_format

    def _settings_of(self, name: str, linear: nn.Module, where: str) -> GPTQSettings:
        """The settings layer ``name`` (``linear`` in the model built from the config) was written with."""
        # rules spelt either way: other tools use the files' names, folders we wrote before this rule the model's
        settings = self.settings.for_layer(name, str(self.folder / "config.json"), self.file_name(name))
        if settings is None:
            raise CheckpointError(f"{where}: {name} has packed tensors, but the config's dynamic rules leave it "
                                  f"unquantized ({self.settings.dynamic})")
        return settings

    def _check_header(self, name: str, in_features: int, out_features: int, where: str) -> None:
        files, settings = self.files, self.layer_settings[name]
        part = {k: files.shapes[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")
                if f"{name}.{k}" in files.shapes}
        kinds = {k: files.dtypes[f"{name}.{k}"] for k in part}
        check_layer_header(name, part, kinds, settings, in_features, out_features, where)
        if settings.desc_act and f"{name}.g_idx" not in files.shapes:
            raise CheckpointError(f"{where}: desc_act is set but {name}.g_idx is missing")

    def _where(self, key: str) -> str:
        return f"{self.folder / self.files.file_of.get(key, '?')}"

    def _check_other_tensors(self, config) -> None:
        """Every unquantized tensor names a parameter or buffer of the model with its shape, and every
        parameter comes from the files (a quantized layer, a tensor, or a tie to one)."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        buffers = dict(self.model.named_buffers())
        unexpected, provided = [], set()
        for key, shape in self.files.shapes.items():
            if key in self._quantized_keys:
                continue
            target = params.get(key, buffers.get(key))
            if target is None:
                unexpected.append(key)
            elif tuple(shape) != tuple(target.shape):
                raise CheckpointError(f"{self._where(key)}: {key} has shape {list(shape)}, the model expects "
                                      f"{list(target.shape)} (config.json does not match the tensors)")
            elif key in params:
                provided.add(id(params[key]))
        quantized_params = {f"{n}.{k}" for n in self.layers for k in ("weight", "bias")}
        tied = getattr(config, "tie_word_embeddings", False) and self.model.get_output_embeddings() is not None
        head = self.model.get_output_embeddings().weight if tied else None
        missing = [n for n, p in params.items() if n not in quantized_params and id(p) not in provided
                   and not (p is head and id(self.model.get_input_embeddings().weight) in provided)]
        if missing or unexpected:
            raise CheckpointError(f"{self.folder}: the weights do not match a {config.model_type} model: missing "
                                  f"{missing[:5]}{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
        self._tied = tied

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.folder) if (self.folder / "tokenizer_config.json").is_file() else None

    def fill(self, module: nn.Module | None = None) -> None:
        """Read ``module``'s tensors (default: the whole model) into ``self.model``: each quantized
        layer is rebuilt from its packed tensors (values checked), every other parameter and buffer
        read from its file; a tied head takes the input embedding's weight."""
        model = self.model
        module = model if module is None else module
        prefix = next((n for n, m in model.named_modules() if m is module), None)
        if prefix is None:
            raise CheckpointError(f"{type(module).__name__} is not part of the model read from {self.folder}")
        inside = lambda key: not prefix or key.startswith(prefix + ".")
        try:
            for name, shape in self.layers.items():
                if inside(name):
                    replace_submodule(model, name, self._layer(name, *shape))
            for key in self.files.shapes:
                if key in self._quantized_keys or not inside(key):
                    continue
                owner_name, leaf = key.rsplit(".", 1) if "." in key else ("", key)
                owner = model.get_submodule(owner_name)
                tensor = self._read(key)
                if leaf in owner._parameters:
                    value = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
                    owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
                else:
                    owner._buffers[leaf] = tensor
            head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
            if self._tied and any(m is head for m in module.modules()):
                if embeddings.weight.is_meta:
                    self.fill(embeddings)
                head.weight = embeddings.weight
        finally:
            self.files.close()  # unmap: nothing read stays mapped into this process

    def _layer(self, name: str, in_features: int, out_features: int, has_bias: bool) -> QuantLinear:
        settings, dtype, at = self.layer_settings[name], self.dtype, self._where(name + ".qweight")
        layer = QuantLinear(in_features, out_features, bits=settings.bits, group_size=settings.group_size,
                            sym=settings.sym, bias=has_bias, dtype=dtype)
        g_idx = self._read(f"{name}.g_idx") if f"{name}.g_idx" in self.files.shapes else natural_g_idx(
            in_features, settings.group_size)
        scales = self._read(f"{name}.scales").to(dtype)
        check_layer_values(name, scales, g_idx, settings.group_size, at)
        layer.qweight = words_from_file(self._read(f"{name}.qweight"), in_features, settings.bits, dim=0)
        layer.qzeros = zeros_from_file(words_from_file(self._read(f"{name}.qzeros"), out_features, settings.bits, dim=1),
                                       settings.bits, out_features, settings.checkpoint_format, f"{at}: {name}.qzeros")
        layer.scales, layer.g_idx = scales.contiguous(), g_idx.to(torch.int32)
        self._read_bias(name, layer)
        layer.post_init()
        return layer

    def _read_bias(self, name: str, layer: QuantLinear) -> None:
        bias_key = f"{name}.bias"
        if bias_key in self.files.shapes:
            bias = self._read(bias_key)
            if layer.bias is not None:
                layer.bias = bias.to(self.dtype)
            elif bool(bias.any()):
                raise CheckpointError(f"{self._where(bias_key)}: {bias_key} is non-zero but the model's {name} has no bias")


def load_gptq(folder: str | os.PathLike, *, backend: str = AUTO, dtype: torch.dtype | str = torch.float32,
              verify: bool = True, trust_remote_code: bool = False):
    """``(model, tokenizer)`` from a HF GPTQ folder (ours, AutoGPTQ's, GPTQModel's; v1 or v2; sharded
    or not), eval mode, on CPU, quantized layers on ``backend``.

    ``dtype``: of every unquantized tensor and the scales (default fp32: this project's CPUs run fp16
    matmuls 10-100x slower). ``verify``: check our checkpoints' recorded sha256 per weight file.
    Every header and shape is checked against the config before the model is built; values (finite
    scales, ``g_idx`` range, v1 zeros) as each layer is read. Raises ``CheckpointError``.
    """
    return load_with(GPTQReader, folder, backend=backend, dtype=dtype, verify=verify, trust_remote_code=trust_remote_code)


def read_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A loader's ``dtype``: a torch dtype or a name ``--model.dtype`` takes (``"fp16"``, ``"bfloat16"``, ...;
    ``"auto"``: fp32, as for any checkpoint); ``ValueError`` for another."""
    from lightning_gptq.models.loading import resolve_dtype  # (models imports transformers' model code)

    resolved = resolve_dtype(dtype)
    return torch.float32 if resolved == "auto" else resolved


def load_with(reader_class: type[GPTQReader], folder: str | os.PathLike, *, backend: str, dtype: torch.dtype | str,
              verify: bool, trust_remote_code: bool):
    """``(model, tokenizer)`` read whole by a ``reader_class`` (a layout's ``GPTQReader``), quantized layers on ``backend``."""
    check_backend(backend)
    dtype = read_dtype(dtype)
    start = time.perf_counter()
    reader = reader_class(folder, dtype=dtype, verify=verify, trust_remote_code=trust_remote_code)
    reader.fill()
    model, settings = reader.model, reader.settings
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:  # _check_other_tensors accounts for every parameter: a bug if this fires
        raise CheckpointError(f"{reader.folder}: parameters left unread: {missing[:5]}")
    to_backend(model, backend)
    model.gptq_dynamic = dict(settings.dynamic or {})  # what save_quantized writes again by default
    log.info("loaded %s: %d quantized layers, %s %s, %.1f MB on disk, %.1f s", reader.folder, len(reader.layers),
             reader.layout_name(), f"{settings.bits}-bit g{settings.group_size}"
             + (f" (per-layer rules: {settings.dynamic})" if settings.dynamic else ""), reader.files.total_bytes / 1e6,
             time.perf_counter() - start)
    return model.eval(), reader.tokenizer()
