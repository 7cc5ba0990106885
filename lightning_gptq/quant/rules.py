"""Per-layer settings chosen by layer name, in the ``dynamic`` form GPTQModel writes into a GPTQ checkpoint's
``quantization_config`` (and vLLM reads): ``{pattern: overrides}``.

- ``"-:<regex>"``: matching layers are not quantized (they stay full-precision linears);
- ``"+:<regex>"`` or a bare ``<regex>``: matching layers take the base ``QuantConfig`` with ``overrides`` applied.

Patterns are tried in the order given and the first that matches wins; a pattern matches when
``re.match`` finds it at the start of the full layer name (``model.layers.3.mlp.down_proj``), so anchor the end
with ``$`` where it matters. Override keys are ``QuantConfig`` fields, or the checkpoint spellings ``desc_act``
(``act_order``) and ``damp_percent`` (``damp``). A layer no pattern matches takes the base config.
"""

from __future__ import annotations

import re
from dataclasses import fields, replace

from .config import QuantConfig, QuantConfigError

ALIASES = {"desc_act": "act_order", "damp_percent": "damp"}
#: what a checkpoint records per layer (the format's names): every other setting shapes only the solve
LAYOUT = {"bits": "bits", "group_size": "group_size", "sym": "sym", "act_order": "desc_act"}
_FIELDS = {f.name for f in fields(QuantConfig)}


class LayerRules:
    """Parsed ``dynamic`` rules. Raises ``QuantConfigError`` for a pattern that is not a regular expression, an
    override that is not a mapping, an unknown setting, or overrides on a ``-:`` rule."""

    def __init__(self, rules: dict[str, dict] | None = None):
        self.rules: list[tuple[str, bool, re.Pattern, dict]] = []  # (as written, skip, compiled, overrides)
        for key, overrides in (rules or {}).items():
            if not isinstance(key, str):
                raise QuantConfigError(f"dynamic: pattern {key!r} is not a string")
            skip, pattern = key.startswith("-:"), key[2:] if key[:2] in ("-:", "+:") else key
            try:
                compiled = re.compile(pattern)
            except re.error as error:
                raise QuantConfigError(f"dynamic: {key!r} is not a regular expression ({error})") from None
            if overrides is None:
                overrides = {}
            if not isinstance(overrides, dict):
                raise QuantConfigError(f"dynamic: the value of {key!r} must be a mapping of settings, got {overrides!r}")
            renamed = {ALIASES.get(k, k): v for k, v in overrides.items()}
            unknown = sorted(set(renamed) - _FIELDS)
            if unknown:
                raise QuantConfigError(f"dynamic: {key!r} sets {unknown}, which are not QuantConfig settings "
                                       f"(known: {sorted(_FIELDS)}, or desc_act / damp_percent)")
            if skip and renamed:
                raise QuantConfigError(f"dynamic: {key!r} leaves its layers unquantized; it takes no settings")
            self.rules.append((key, skip, compiled, renamed))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def match(self, name: str, *aliases: str) -> tuple[str, bool, dict] | None:
        """``(pattern as written, skip, overrides)`` of the first rule matching layer ``name`` or one of its other
        spellings ``aliases`` (a checkpoint's names for it), or None."""
        for key, skip, compiled, overrides in self.rules:
            if any(compiled.match(n) for n in (name, *aliases)):
                return key, skip, overrides
        return None

    def config_for(self, name: str, base: QuantConfig) -> QuantConfig | None:
        """The settings for layer ``name``: ``base`` with the first matching rule's overrides, or None where a ``-:``
        rule leaves it unquantized."""
        hit = self.match(name)
        if hit is None:
            return base
        key, skip, overrides = hit
        if skip:
            return None
        try:
            return replace(base, **overrides)
        except QuantConfigError as error:
            raise QuantConfigError(f"dynamic {key!r}: {error}") from None

    def check(self, base: QuantConfig) -> None:
        """Every rule's overrides make a valid config over ``base`` (bad values fail before any work)."""
        for key, skip, _, overrides in self.rules:
            if not skip:
                try:
                    replace(base, **overrides)
                except QuantConfigError as error:
                    raise QuantConfigError(f"dynamic {key!r}: {error}") from None

    @classmethod
    def from_checkpoint(cls, dynamic: dict | None) -> LayerRules:
        """The rules of a checkpoint's ``dynamic`` block, keeping only what shapes a layer's tensors (``bits``,
        ``group_size``, ``sym``, ``desc_act``): other tools record solve settings there too, in their own types."""
        if dynamic is not None and not isinstance(dynamic, dict):
            raise QuantConfigError(f"dynamic must be a mapping of pattern to settings, got {dynamic!r}")
        keep = set(LAYOUT.values())
        return cls({key: {k: v for k, v in (overrides or {}).items() if k in keep} if isinstance(overrides, dict)
                    else overrides for key, overrides in (dynamic or {}).items()})

    def layout_rules(self) -> dict[str, dict]:
        """The rules as a checkpoint writes them: the layout settings under the format's names (``desc_act``),
        solve-only settings (damping, MSE search, ...) dropped."""
        return {key: {LAYOUT[k]: v for k, v in overrides.items() if k in LAYOUT} for key, _, _, overrides in self.rules}
