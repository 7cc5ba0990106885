"""The Hugging Face GPTQ checkpoint format: its settings block and the checks every loaded layer passes.

Per quantized linear ``<name>``: ``qweight`` int32 [in·bits/32, out], ``qzeros`` int32
[n_groups, out·bits/32], ``scales`` [n_groups, out], ``g_idx`` int32 [in], optional ``bias``.
Zero points: ``checkpoint_format`` ``gptq`` (v1) stores ``zero − 1`` (so a true zero of 0 cannot
be written and a stored ``2**bits − 1`` means ``2**bits``), ``gptq_v2`` the true zero. In memory
``QuantLinear`` always holds true zeros.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from lightning_gptq.kernels.packing import pack_cols, packed_length, unpack_cols
from lightning_gptq.quant.config import QuantConfigError
from lightning_gptq.quant.rules import LayerRules

V1 = "gptq"
V2 = "gptq_v2"
FORMATS = (V1, V2)
QUANTIZE_CONFIG = "quantize_config.json"
TOOL = "lightning-gptq"
#: ``meta.lightning_gptq.format_revision`` of what this version writes. 2 (2026-12-06): GPT-OSS experts hold the
#: fused projection's two halves (``ClampedSwiGLUExpert``); folders without it split them into true gate and up.
FORMAT_REVISION = 2


class CheckpointError(RuntimeError):
    """A quantized checkpoint is missing, incomplete, corrupt or inconsistent."""


class ZeroPointError(CheckpointError):
    """``checkpoint_format='gptq'`` (v1, stored ``zero − 1``) asked for a model with a zero point of 0."""

    def __init__(self) -> None:
        super().__init__("checkpoint_format 'gptq' (v1) stores zero − 1 and cannot hold a zero point of 0, which this "
                         "model has; write 'gptq_v2' (or 'auto')")


@dataclass
class GPTQSettings:
    """``config.json["quantization_config"]`` / ``quantize_config.json`` of a GPTQ checkpoint."""

    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    checkpoint_format: str = V1
    damp_percent: float = 0.01
    static_groups: bool = False
    true_sequential: bool = True
    meta: dict = field(default_factory=dict)
    #: per-layer overrides (GPTQModel's ``dynamic``: ``lightning_gptq.quant.rules``); written only when non-empty
    dynamic: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"quant_method": "gptq", **asdict(self), "lm_head": False, "pack_dtype": "int32"}
        if not self.dynamic:
            del d["dynamic"]
        return d

    def for_layer(self, name: str, source: str = "quantization_config", *aliases: str) -> GPTQSettings | None:
        """The settings layer ``name`` (also spelt ``aliases``) was written with (the first ``dynamic`` rule matching
        it applied), or None where a ``-:`` rule says it was left unquantized."""
        if not self.dynamic:
            return self
        rules = LayerRules.from_checkpoint(self.dynamic)
        hit = rules.match(name, *aliases)
        if hit is None:
            return self
        key, skip, _ = hit
        if skip:
            return None
        overrides = rules.layout_rules()[key]  # in the format's names (desc_act)
        return GPTQSettings.from_dict({**self.to_dict(), **overrides, "dynamic": {}}, f"{source} (dynamic {key!r})")

    @classmethod
    def from_dict(cls, d: dict, source: str) -> GPTQSettings:
        """Parse and check a settings block read from ``source`` (a file name, for messages)."""
        method = d.get("quant_method", "gptq")
        if method != "gptq":
            raise CheckpointError(f"{source}: quant_method is {method!r}; only GPTQ checkpoints ('gptq') are supported")
        fmt = d.get("checkpoint_format", V1)
        if fmt not in FORMATS:
            raise CheckpointError(f"{source}: unknown checkpoint_format {fmt!r} (known: {', '.join(FORMATS)})")
        try:
            bits, group_size = int(d["bits"]), int(d.get("group_size", -1))
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{source}: 'bits'/'group_size' missing or not integers ({error})") from None
        if not 2 <= bits <= 8:
            raise CheckpointError(f"{source}: bits={bits}; GPTQ checkpoints hold 2..8-bit codes")
        if group_size != -1 and group_size < 1:
            raise CheckpointError(f"{source}: group_size={group_size}; expected a positive size or -1 (one group per row)")
        if d.get("lm_head"):
            raise CheckpointError(f"{source}: a quantized LM head (lm_head: true) is not supported")
        dynamic = d.get("dynamic") or {}
        try:
            rules = LayerRules.from_checkpoint(dynamic)
        except QuantConfigError as error:
            raise CheckpointError(f"{source}: {error}") from None
        for key, overrides in rules.layout_rules().items():  # each override must itself be a valid layout
            if overrides:
                cls.from_dict({**d, **overrides, "dynamic": {}}, f"{source} (dynamic {key!r})")
        return cls(bits=bits, group_size=group_size, desc_act=bool(d.get("desc_act", False)), sym=bool(d.get("sym", True)),
                   checkpoint_format=fmt, damp_percent=float(d.get("damp_percent", 0.01)),
                   static_groups=bool(d.get("static_groups", False)), true_sequential=bool(d.get("true_sequential", True)),
                   meta=dict(d.get("meta") or {}), dynamic=dict(dynamic))

    @property
    def written_by_us(self) -> bool:
        return any(str(q).startswith(TOOL + ":") for q in self.meta.get("quantizer", []))


Grid = tuple[int, int, bool]  # (bits, group_size, sym): what shapes a layer's tensors


def layer_grids_rules(grids: dict[str, Grid], rules: dict | None = None, dense: Iterable[str] = ()) -> tuple[Grid, dict]:
    """The base grid and the ``dynamic`` block under which every quantized layer's ``(bits, group_size, sym)``
    (``grids``, by full layer name) reads back, and every linear of ``dense`` (names of full-precision linears)
    that holds the place of a quantized one in another block (``model.layers.3.self_attn.o_proj`` beside a
    quantized ``model.layers.4.self_attn.o_proj``: a loader would build it quantized) reads back unquantized:
    ``rules`` (checkpoint spelling, e.g. the user's own, which other tools and vLLM match against their own layer
    names) when they explain every such layer over one of the grids present; else the most common grid, one
    exact-name rule per other grid, ``rules``' ``-:`` rules, and one exact-name ``-:`` rule for the dense rest."""
    places = {_place(n) for n in grids}
    unquantized = sorted(n for n in dense if _place(n) in places)
    order = [grid for grid, _ in Counter(grids.values()).most_common()]

    def explains(base: Grid, dynamic: dict) -> bool:
        settings = GPTQSettings(bits=base[0], group_size=base[1], sym=base[2], desc_act=False, dynamic=dynamic)
        return (all(_grid(settings.for_layer(n)) == g for n, g in grids.items())
                and all(settings.for_layer(n) is None for n in unquantized))

    for base in order if rules else ():
        if explains(base, rules):
            return base, dict(rules)
    base, dynamic = order[0], {}
    for grid in order[1:]:
        names = sorted(n for n, g in grids.items() if g == grid)
        dynamic["+:" + names_pattern(names)] = {"bits": grid[0], "group_size": grid[1], "sym": grid[2]}
    dynamic.update({key: {} for key in (rules or {}) if key.startswith("-:")})
    settings = GPTQSettings(bits=base[0], group_size=base[1], sym=base[2], desc_act=False, dynamic=dynamic)
    rest = [n for n in unquantized if settings.for_layer(n) is not None]
    if rest:
        dynamic["-:" + names_pattern(rest)] = {}
    if not explains(base, dynamic):
        raise ValueError("no dynamic rules describe these layers' grids: a quantized layer matches one of the "
                         f"'-:' rules {[k for k in rules or {} if k.startswith('-:')]}")
    return base, dynamic


def _place(name: str) -> str:
    """A layer's place in any block: ``model.layers.3.mlp.up_proj`` → ``model.layers.#.mlp.up_proj``."""
    return re.sub(r"\.\d+(?=\.|$)", ".#", name)


def names_pattern(names: list[str]) -> str:
    """A regular expression that ``re.match``-es exactly the layer names ``names`` (a ``dynamic`` rule's key)."""
    return "(?:" + "|".join(re.escape(n) for n in names) + ")$"


def _grid(settings: GPTQSettings | None) -> Grid | None:
    return None if settings is None else (settings.bits, settings.group_size, settings.sym)


# -- zero-point conventions -------------------------------------------------------------------------
def zeros_to_file(qzeros: Tensor, bits: int, out_features: int, fmt: str) -> Tensor:
    """In-memory true zeros → the file's convention. v1 of a zero 0 is refused (it cannot be stored)."""
    if fmt == V2:
        return qzeros
    zeros = unpack_cols(qzeros, bits, out_features).to(torch.int32)
    if (zeros == 0).any():
        raise ZeroPointError()
    return pack_cols(zeros - 1, bits)


def zeros_from_file(qzeros: Tensor, bits: int, out_features: int, fmt: str, where: str) -> Tensor:
    """The file's zero convention → true zeros (packed). A v1 stored ``2**bits − 1`` would mean a
    zero of ``2**bits``, which a ``bits``-bit zero cannot hold: refused rather than altered."""
    if fmt == V2:
        return qzeros
    stored = unpack_cols(qzeros, bits, out_features).to(torch.int32)
    overflow = int((stored == (1 << bits) - 1).sum())
    if overflow:
        raise CheckpointError(
            f"{where}: {overflow} zero points are stored as {(1 << bits) - 1}, meaning {1 << bits} in the v1 ('gptq') "
            f"convention (usually a zero of 0 damaged by v1 export); a {bits}-bit zero cannot hold it")
    return pack_cols(stored + 1, bits)


def v1_is_lossless(zero_points: list[Tensor]) -> bool:
    """Whether every true zero (uint8 tensors) can be written as ``zero − 1``."""
    return all(bool((z > 0).all()) for z in zero_points)


# -- word counts: the file's exact ⌈n·bits/32⌉ against memory's whole 32-value runs ------------------
def file_words(n: int, bits: int) -> int:
    """int32 words the published layout uses for ``n`` codes (``n·bits/32`` when that is whole)."""
    return -(-n * bits // 32)


def words_to_file(packed: Tensor, n: int, bits: int, dim: int) -> Tensor:
    """Drop the all-padding words past ``file_words`` along ``dim`` (lossless: they hold no code bits)."""
    keep = file_words(n, bits)
    assert not packed.narrow(dim, keep, packed.shape[dim] - keep).any(), "padding words must be empty"
    return packed.narrow(dim, 0, keep).contiguous()


def words_from_file(packed: Tensor, n: int, bits: int, dim: int) -> Tensor:
    """Pad a file's words along ``dim`` to the in-memory length (whole 32-value runs)."""
    missing = packed_length(n, bits) - packed.shape[dim]
    if missing <= 0:
        return packed
    shape = list(packed.shape)
    shape[dim] = missing
    return torch.cat([packed, packed.new_zeros(shape)], dim=dim)


# -- per-layer checks ----------------------------------------------------------------------------
def expected_shapes(in_features: int, out_features: int, bits: int, group_size: int) -> dict[str, tuple[int, ...]]:
    n_groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
    return {"qweight": (file_words(in_features, bits), out_features),
            "qzeros": (n_groups, file_words(out_features, bits)),
            "scales": (n_groups, out_features), "g_idx": (in_features,)}


def _padded(shape: tuple[int, ...], key: str, in_features: int, out_features: int, bits: int) -> tuple[int, ...]:
    """The same tensor padded to whole 32-value runs (what earlier lightning-gptq versions wrote)."""
    if key == "qweight":
        return packed_length(in_features, bits), shape[1]
    if key == "qzeros":
        return shape[0], packed_length(out_features, bits)
    return shape


def check_layer_header(name: str, shapes: dict[str, tuple], dtypes: dict[str, str], settings: GPTQSettings,
                       in_features: int, out_features: int, where: str) -> None:
    """Shapes and dtypes of one layer's tensors (from the file headers, before any data is read)."""
    want = expected_shapes(in_features, out_features, settings.bits, settings.group_size)
    for key in ("qweight", "qzeros", "scales"):
        if key not in shapes:
            raise CheckpointError(f"{where}: tensor {name}.{key} is missing")
    for key, shape in want.items():
        if key in shapes and tuple(shapes[key]) not in (shape, _padded(shape, key, in_features, out_features, settings.bits)):
            hint = ""
            if key == "qweight" and shapes[key][1] == out_features:
                held = shapes[key][0] * 32 / max(in_features, 1)
                hint = f" (its rows hold {held:g} bits per input, the config says bits={settings.bits})"
            raise CheckpointError(f"{where}: {name}.{key} has shape {list(shapes[key])}, expected {list(shape)} for a "
                                  f"{out_features}x{in_features} layer at {settings.bits} bits, group size "
                                  f"{settings.group_size}{hint}")
    for key in ("qweight", "qzeros", "g_idx"):
        if key in dtypes and dtypes[key] not in ("I32", "int32"):
            raise CheckpointError(f"{where}: {name}.{key} is {dtypes[key]}, expected int32")
    if dtypes.get("scales") not in ("F16", "BF16", "F32", "float16", "bfloat16", "float32"):
        raise CheckpointError(f"{where}: {name}.scales is {dtypes.get('scales')}, expected a float type")


def check_layer_values(name: str, scales: Tensor, g_idx: Tensor, group_size: int, where: str) -> None:
    """Values every loaded layer must satisfy: finite scales, ``g_idx`` inside ``[0, n_groups)`` and
    no group wider than ``group_size``. (Codes and zeros are in range by construction: ``bits``-bit fields.)"""
    if not torch.isfinite(scales).all():
        bad = int((~torch.isfinite(scales)).sum())
        raise CheckpointError(f"{where}: {name}.scales has {bad} non-finite values")
    n_groups = scales.shape[0]
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise CheckpointError(f"{where}: {name}.g_idx has values outside [0, {n_groups}) "
                              f"(min {int(g_idx.min())}, max {int(g_idx.max())})")
    if group_size > 0 and g_idx.numel():
        widest = int(torch.bincount(g_idx.long(), minlength=n_groups).max())
        if widest > group_size:
            raise CheckpointError(f"{where}: {name}.g_idx puts {widest} columns in one group; group_size is {group_size}")


def natural_g_idx(in_features: int, group_size: int) -> Tensor:
    width = group_size if group_size > 0 else in_features
    return (torch.arange(in_features) // width).to(torch.int32)
