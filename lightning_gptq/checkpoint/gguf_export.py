"""Write a quantized model as GGUF (llama.cpp, ollama, LM Studio read it), code for code.

GGUF's block types hold a GPTQ layer exactly when its groups are whole 32-column blocks (group size a multiple
of 32, or one group per row) in column order (no act-order ``g_idx``). With code ``q``, zero ``z`` and scale ``s``
(the weight is ``s·(q − z)``), each 32-column block of a row is written as

- ``Q4_0``: ``d·(c − 8)``, ``c = q − z + 8`` (codes of up to 4 bits whose ``q − z`` lies in −8..7: symmetric grids),
- ``Q4_1``: ``d·q + m``, ``m = −s·z`` (any code of up to 4 bits: 2 and 3 bits cost 4 here),
- ``Q8_0``: ``d·c``, ``c = q − z`` as int8 (codes whose ``q − z`` lies in −128..127: 5–7 bits, symmetric 8 bits),

with ``d = s`` and ``m`` rounded to fp16, as GGUF stores them (the rounding a fp16 GPTQ checkpoint's scales have).
Metadata (architecture, tokenizer, chat template) and the tensors GPTQ left alone come byte for byte from a
template: the original model as GGUF (llama.cpp's ``convert_hf_to_gguf.py`` writes one; a model fit from a
``.gguf`` file has it already). Rows are permuted back where transformers' GGUF reader permutes them (LLaMA's q/k).
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lightning_gptq.nn import QuantLinear

from .gptq_format import CheckpointError

BLOCK = 32
_HEADER = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture")


class GGUFExportError(CheckpointError):
    """The model, or one of its layers, cannot be written as GGUF exactly (or the template does not fit it)."""


@dataclass
class GGUFExportReport:
    """What :func:`save_gguf` wrote: ``types`` counts layers per GGUF type; ``copied`` template tensors kept byte for
    byte, ``rewritten`` dense tensors written as F32 (changed by input scaling); ``fp16_error``: the largest
    ``|written − ours| / s`` (the fp16 rounding of ``d`` and ``m``, in units of the layer's grid step)."""
    path: str
    types: dict[str, int] = field(default_factory=dict)
    copied: int = 0
    rewritten: list[str] = field(default_factory=list)
    fp16_error: float = 0.0
    bytes: int = 0


# -- one layer ------------------------------------------------------------------------------------------------------
def _per_column(layer: QuantLinear, grid: torch.Tensor) -> torch.Tensor:
    """A per-group tensor ``[n_groups, out]`` (scales, zero points) as ``[out, in]``: each column's group's value."""
    return grid.T[:, layer.g_idx.long()]


def gguf_type_for(layer: QuantLinear) -> tuple[str | None, str]:
    """``("Q4_0" | "Q4_1" | "Q8_0", "")`` for a layer GGUF holds exactly, else ``(None, why not)``."""
    width = layer.contiguous_group_size()
    if width is None:
        return None, "act-order columns (g_idx is not i // group_size): quantize with quant.static_groups=true or " \
                     "act_order=false"
    if width % BLOCK or layer.in_features % BLOCK:
        return None, f"groups of {width} over {layer.in_features} inputs are not whole {BLOCK}-column GGUF blocks"
    offsets = layer.codes().to(torch.int16) - _per_column(layer, layer.zero_points().to(torch.int16))
    lo, hi = int(offsets.min()), int(offsets.max())
    if layer.bits <= 4 and lo >= -8 and hi <= 7:
        return "Q4_0", ""
    if layer.bits <= 4:
        return "Q4_1", ""
    if lo >= -128 and hi <= 127:
        return "Q8_0", ""
    return None, f"{layer.bits}-bit codes minus zeros span {lo}..{hi}, beyond Q8_0's int8"


def config_refusal(quant) -> str | None:
    """Why layers quantized with ``quant`` (a ``QuantConfig``) could not be written as GGUF blocks, or None: what can
    be told before any layer exists (shapes and codes are checked per layer when writing)."""
    if quant.group_size != -1 and quant.group_size % BLOCK:
        return f"group size {quant.group_size} is not a multiple of GGUF's {BLOCK}-column blocks"
    if quant.act_order and not quant.static_groups:
        return "act-order groups are not in column order: set quant.static_groups=true (or act_order=false)"
    if quant.bits == 8 and not quant.sym:
        return "8-bit asymmetric codes minus zeros leave Q8_0's int8: set quant.sym=true"
    return None


def _fp16(x: torch.Tensor, what: str) -> torch.Tensor:
    h = x.to(torch.float16)
    if not torch.isfinite(h).all():
        raise GGUFExportError(f"{what} overflow fp16 (|value| > 65504), which GGUF blocks store")
    return h


def encode_layer(layer: QuantLinear, kind: str, rows: np.ndarray | None = None) -> np.ndarray:
    """The layer's weight as GGUF ``kind`` blocks: uint8 ``[out, in / 32 · bytes per block]``, rows in ``rows``
    order (GGUF row ``i`` holds our row ``rows[i]``; default: ours)."""
    width = layer.contiguous_group_size()
    out, n = layer.out_features, layer.in_features
    nb = n // BLOCK
    q = layer.codes().to(torch.int32).reshape(out, nb, BLOCK)
    group = torch.arange(nb) * BLOCK // width                       # each block's group
    s = layer.scales.detach().float().cpu().T[:, group]              # [out, nb]
    z = layer.zero_points().to(torch.int32).T[:, group]              # [out, nb]
    if rows is not None:
        index = torch.as_tensor(rows, dtype=torch.long)
        q, s, z = q[index], s[index], z[index]
    d = _fp16(s, f"{kind} scales").view(torch.uint8).reshape(out, nb, 2)
    if kind == "Q8_0":
        c = (q - z[..., None]).to(torch.int8).view(torch.uint8)
        blocks = torch.cat([d, c], dim=-1)
    else:
        c = (q - z[..., None] + 8) if kind == "Q4_0" else q
        c = c.to(torch.uint8)
        nibbles = c[..., : BLOCK // 2] | (c[..., BLOCK // 2:] << 4)  # byte j: value j low, value j + 16 high
        parts = [d] if kind == "Q4_0" else [d, _fp16(-s * z, "Q4_1 minimums").view(torch.uint8).reshape(out, nb, 2)]
        blocks = torch.cat([*parts, nibbles], dim=-1)
    return blocks.reshape(out, -1).numpy()


# -- names and row orders -------------------------------------------------------------------------------------------
class _NamesOf:
    """What transformers' GGUF name map reads of a model: its config and its tensor names, with each quantized
    linear named ``<layer>.weight`` (as in the model it was quantized from)."""

    def __init__(self, model: nn.Module, quantized: dict[str, QuantLinear]):
        self.config = model.config
        self._names = [n for n, _ in model.named_parameters(remove_duplicate=False)] + [n for n, _ in model.named_buffers()
                                                                    if n.rsplit(".", 1)[0] not in quantized]
        self._names += [f"{name}.weight" for name in quantized]
        self._names += [f"{name}.bias" for name, layer in quantized.items() if layer.bias is not None]

    def state_dict(self):
        return dict.fromkeys(self._names)

    def named_children(self):
        return []


def _row_order(processor, gguf_name: str, rows: int) -> np.ndarray | None:
    """``order`` with ``hf[i] = gguf[order[i]]`` for a tensor transformers' reader only permutes by rows (None: it
    leaves the rows alone); GGUFExportError when it does more than permute."""
    index = np.arange(rows, dtype=np.float64)[:, None]
    result = processor.process(weights=index.copy(), name=gguf_name, tensor_key_mapping={}, parsed_parameters={})
    out = np.asarray(result.weights)
    if result.name != gguf_name or out.shape != index.shape:
        raise GGUFExportError(f"transformers' GGUF reader renames or reshapes {gguf_name}: not supported for export")
    order = out[:, 0].astype(np.int64)
    if not np.array_equal(np.sort(order), np.arange(rows)):
        raise GGUFExportError(f"transformers' GGUF reader transforms {gguf_name} beyond a row permutation")
    return None if np.array_equal(order, np.arange(rows)) else order


@functools.lru_cache(maxsize=1)
def _reader(template: Path, stamp: tuple[int, int]):
    """The template's GGUF reader (memory-mapped), kept for the next call on the same unchanged file: a fit checks
    the template at set-up and writes from it at the end, and parsing the header takes seconds."""
    import gguf

    try:
        return gguf.GGUFReader(template)
    except (ValueError, KeyError, OSError) as err:
        raise GGUFExportError(f"GGUF template {template} cannot be read as GGUF ({err})") from None


@dataclass
class _Template:
    """A template matched to a model: its reader and architecture, transformers' tensor processor for it, and the
    model's name for each of its tensor names (``to_hf``)."""
    reader: object
    arch: str
    processor: object
    to_hf: dict[str, str]


def _match_template(model: nn.Module, template: Path, quantized: dict[str, QuantLinear]) -> _Template:
    """``template`` read and checked against ``model`` from its header: every tensor it names has the model's shape
    and every ``blk.*`` tensor a counterpart (GGUFExportError naming the first that does not)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    try:
        stat = template.stat()
        reader = _reader(template.resolve(), (stat.st_mtime_ns, stat.st_size))
        arch = reader.fields["general.architecture"].contents()
    except (KeyError, OSError) as err:
        raise GGUFExportError(f"GGUF template {template} cannot be read as GGUF ({err})") from None
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())  # head counts: the model's
    try:
        to_hf = get_gguf_hf_weights_map(_NamesOf(model, quantized), processor)
    except NotImplementedError as err:
        raise GGUFExportError(f"model type {model.config.model_type!r}: {err}") from None
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    shapes |= {f"{n}.weight": (m.out_features, m.in_features) for n, m in quantized.items()}
    for t in reader.tensors:
        hf_name = to_hf.get(t.name)
        if hf_name is None and t.name.startswith("blk."):
            raise GGUFExportError(f"template tensor {t.name} has no counterpart in the model: is {template.name} this "
                                  "model's source?")
        theirs = tuple(int(x) for x in t.shape[::-1])
        if hf_name in shapes and theirs != shapes[hf_name]:
            raise GGUFExportError(f"template tensor {t.name} is {list(theirs)}, the model's {hf_name} is "
                                  f"{list(shapes[hf_name])}: is {template.name} this model's source?")
    return _Template(reader, arch, processor, to_hf)


def copy_metadata(reader, writer, *, drop: tuple[str, ...] = (), values: dict | None = None) -> None:
    """Every key of ``reader``'s GGUF file into ``writer`` (the alignment too), but the header's, those in ``drop``,
    and with ``values`` replacing the stored value of a key."""
    import gguf

    for name, entry in reader.fields.items():
        if name in _HEADER or name in drop:
            continue
        if name == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = int(entry.contents())
        sub = entry.types[1] if entry.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, (values or {}).get(name, entry.contents()), entry.types[0], sub)


# -- the whole model ------------------------------------------------------------------------------------------------
def default_template(folder: str | os.PathLike) -> Path | None:
    """The source ``.gguf`` recorded in a folder we wrote (``meta.lightning_gptq.source_model``/``source_gguf_file``),
    when it still exists."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    meta = (config.get("quantization_config") or {}).get("meta") or {}
    ours = meta.get("lightning_gptq") or {}
    path = source_gguf(ours.get("source_model"), ours.get("source_gguf_file"))
    return path if path is not None and path.is_file() else None


def source_gguf(model: str | None, gguf_file: str | None) -> Path | None:
    """The ``.gguf`` file a model was read from (``model``, or ``gguf_file`` inside it), or None when it was not."""
    if not model:
        return None
    path = Path(model) / gguf_file if gguf_file else Path(model)
    return path if path.suffix.lower() == ".gguf" else None


def template_mismatch(model: nn.Module, template: str | os.PathLike) -> str | None:
    """Why ``template`` is not ``model``'s source as GGUF (a tensor of another shape, a block the model lacks), read
    from its header before any work; None when every tensor it names fits. ``model``: before or after quantizing."""
    try:
        _match_template(model, Path(template), {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)})
    except GGUFExportError as err:
        return str(err)
    return None


@torch.no_grad()
def save_gguf(model: nn.Module, path: str | os.PathLike, template: str | os.PathLike, *,
              verify: bool = True) -> GGUFExportReport:
    """Write ``model`` (a causal LM with quantized linears) to the GGUF file ``path``, taking metadata and the
    tensors GPTQ did not change from ``template`` (the model's source as GGUF). Refuses, before writing anything,
    a layer GGUF cannot hold exactly (naming it and why). ``verify`` reads the file back and checks every
    quantized tensor against the layer's own dequantized weight."""
    import gguf

    template, path = Path(template), Path(path)
    if not template.is_file():
        raise GGUFExportError(f"GGUF template {template} not found: give the original model as a .gguf file "
                              "(llama.cpp's convert_hf_to_gguf.py writes one)")
    if path.resolve() == template.resolve():
        raise GGUFExportError(f"{path} is the template: writing there would replace the source model")
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quantized:
        raise GGUFExportError("the model has no quantized linear layers")
    experts = [name for name in quantized if re.search(r"\.experts\.\d+\.", name)]
    if experts:
        raise GGUFExportError(f"{len(experts)} quantized MoE expert layers (e.g. {experts[0]}): GGUF holds a block's "
                              "experts as one 3-D tensor, which this export does not write (dense models only)")
    kinds, refused = {}, []
    for name, layer in quantized.items():
        kind, why = gguf_type_for(layer)
        kinds[name] = kind
        if kind is None:
            refused.append(f"{name}: {why}")
    if refused:
        raise GGUFExportError(f"{len(refused)} layer(s) cannot be written as GGUF blocks exactly: "
                              + "; ".join(refused[:4]) + (" …" if len(refused) > 4 else ""))

    matched = _match_template(model, template, quantized)
    reader, processor, to_hf = matched.reader, matched.processor, matched.to_hf
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    report = GGUFExportReport(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, matched.arch)
    copy_metadata(reader, writer, drop=(gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZED_BY))

    written, plans = set(), []
    for t in reader.tensors:
        hf_name = to_hf.get(t.name)
        layer = quantized.get(hf_name.removesuffix(".weight")) if hf_name and hf_name.endswith(".weight") else None
        if layer is not None:
            order = _row_order(processor, t.name, layer.out_features)
            rows = None if order is None else np.argsort(order)
            kind = kinds[hf_name.removesuffix(".weight")]
            writer.add_tensor(t.name, encode_layer(layer, kind, rows), raw_dtype=gguf.GGMLQuantizationType[kind])
            report.types[kind] = report.types.get(kind, 0) + 1
            plans.append((t.name, layer, kind, order))
            written.add(hf_name)
            continue
        if hf_name is not None and hf_name in params:
            ours = params[hf_name].detach().float().cpu().numpy()
            theirs = np.asarray(processor.process(weights=gguf.quants.dequantize(t.data, t.tensor_type), name=t.name,
                                                  tensor_key_mapping={}, parsed_parameters={}).weights)
            written.add(hf_name)
            if theirs.shape != ours.shape:
                raise GGUFExportError(f"template tensor {t.name} is {list(theirs.shape)}, the model's {hf_name} is "
                                      f"{list(ours.shape)}: is {template.name} this model's source?")
            if not np.array_equal(theirs.astype(np.float32), ours):
                scale = float(np.abs(theirs).max()) or 1.0
                if "embd" in t.name and float(np.abs(theirs - ours).max()) > 0.05 * scale:
                    raise GGUFExportError(f"the token embedding differs from {template.name}'s: is it this model's "
                                          "source?")
                order = _row_order(processor, t.name, ours.shape[0]) if ours.ndim == 2 else None
                dense = ours if order is None else ours[np.argsort(order)]
                writer.add_tensor(t.name, np.ascontiguousarray(dense, dtype=np.float32))
                report.rewritten.append(t.name)
                continue
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        report.copied += 1
    missing = [n for n in quantized if f"{n}.weight" not in written]
    if missing:
        raise GGUFExportError(f"{len(missing)} quantized layer(s) have no tensor in {template.name} "
                              f"(e.g. {missing[0]}): is it this model's source?")
    main = max(report.types, key=report.types.get)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, f"MOSTLY_{main}")))
    writer.add_key_value(gguf.Keys.General.QUANTIZED_BY, "lightning-gptq", gguf.GGUFValueType.STRING)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if verify:
            report.fp16_error = _verify(partial, plans)
        os.replace(partial, path)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    report.bytes = path.stat().st_size
    return report


def _verify(path: Path, plans) -> float:
    """Every quantized tensor in ``path`` against its layer's dequantized weight: the difference must be the fp16
    rounding of ``d`` and ``m`` (at most ``(2⁻¹⁰·s + 2⁻²⁴)·(q + z + 1)`` per weight). Returns the largest difference in
    grid steps."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    worst = 0.0
    for name, layer, kind, order in plans:
        t = tensors[name]
        if t.tensor_type.name != kind:
            raise GGUFExportError(f"{name}: written as {t.tensor_type.name}, planned {kind}")
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
        if order is not None:
            got = got[torch.as_tensor(order)]
        s = _per_column(layer, layer.scales.float().cpu()).abs()
        z = _per_column(layer, layer.zero_points().float())
        bound = (2.0 ** -10 * s + 2.0 ** -24) * (layer.codes().float() + z + 1)  # fp16: relative, then subnormal
        diff = (got - layer.dequantize().float().cpu()).abs()
        steps = float((diff / s.clamp_min(1e-30)).max())
        if not bool((diff <= bound).all()):
            raise GGUFExportError(f"{name}: the written blocks do not decode to the layer's weight (largest "
                                  f"difference {steps:.3g} grid steps)")
        worst = max(worst, steps)
    return worst
