"""Where the parts of a Hugging Face causal LM live: decoder blocks, embeddings, head, linear layers.

The default adapter finds them by structure: the decoder blocks are the `nn.ModuleList` of
identical modules holding the most parameters; the module that owns that list (e.g. `LlamaModel`,
`OPTDecoder`, `GPT2Model`) owns the embeddings and the final norm; the LM head is
`model.get_output_embeddings()`. A small registry (`register_adapter`) overrides this per
`config.model_type` where structure is not enough.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections import OrderedDict

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = [
    "ArchitectureAdapter",
    "UnsupportedArchitectureError",
    "get_adapter",
    "register_adapter",
    "registered_adapters",
    "scale_logits",
    "VERIFIED_MODEL_TYPES",
    "is_conv1d",
    "is_linear",
    "is_output_projection",
    "linear_weight",
    "weight_out_in",
    "set_weight_out_in",
    "linear_in_features",
    "linear_out_features",
]

# Model types whose capture/replay tests/test_models_capture.py proves exact and tests/test_architectures.py and
# tests/test_experts.py quantize, save and load.
VERIFIED_MODEL_TYPES = frozenset(
    {"opt", "bloom", "llama", "mistral", "qwen2", "gpt2", "gpt_neox", "gemma", "gemma3_text", "qwen3", "olmo2",
     "phi3", "granite", "cohere", "phi", "falcon", "stablelm",
     # mixture of experts, with their banks split (lightning_gptq.models.unfuse_experts)
     "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"}
)

_EMBEDDING_HINTS = ("embed", "wte", "wpe", "rotary", "rope", "project_in")
_FINAL_HINTS = ("norm", "ln_f", "project_out", "final")
_MIN_LINEAR_SHARE = 0.5
# Leaf names of the projections that write a submodule's result back to the residual stream.
_OUTPUT_PROJECTION_NAMES = frozenset(
    {"o_proj", "out_proj", "c_proj", "down_proj", "fc2", "dense", "dense_4h_to_h", "w2", "wo", "proj_out"}
)


class UnsupportedArchitectureError(ValueError):
    """No adapter knows how to split this model into embeddings, blocks and head."""


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' `Conv1D` (GPT-2 family), a linear layer storing its weight as [in, out]."""
    return isinstance(module, Conv1D)


def is_linear(module: nn.Module) -> bool:
    """True for the layers GPTQ quantizes: `nn.Linear` and transformers' `Conv1D`."""
    return isinstance(module, (nn.Linear, Conv1D))


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as `[out_features, in_features]`; a transposed view for `Conv1D` (no copy)."""
    if is_conv1d(module):
        return module.weight.t()
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"{type(module).__name__} is not a linear layer (nn.Linear or Conv1D).")


linear_weight = weight_out_in


def set_weight_out_in(module: nn.Module, weight: torch.Tensor) -> None:
    """Copy `weight` `[out_features, in_features]` into the layer in place (keeps its dtype/device)."""
    target = weight_out_in(module)
    if tuple(weight.shape) != tuple(target.shape):
        raise ValueError(
            f"Weight of shape {tuple(weight.shape)} does not fit {type(module).__name__} "
            f"[out, in] = {tuple(target.shape)}."
        )
    with torch.no_grad():
        target.copy_(weight)  # the transposed view writes through to Conv1D's [in, out] storage


def linear_in_features(module: nn.Module) -> int:
    return weight_out_in(module).shape[1]


def linear_out_features(module: nn.Module) -> int:
    return weight_out_in(module).shape[0]


def _resolve(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at dotted `path`, or None when an attribute on the way is missing or None."""
    module = root
    for part in path.split(".") if path else ():
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _holds_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


@dataclasses.dataclass
class ArchitectureAdapter:
    """How to split one architecture into embedding stage, decoder blocks and final stage.

    Every `*_path` is a dotted attribute path from the causal-LM object (e.g. `"model.layers"`);
    left as None, the part is found by structure. A path whose attribute is missing or None (OPT's
    optional `project_in`) is skipped.

    `groups` are true-sequential groups as names relative to a block; None derives them: per
    submodule (`self_attn`, `mlp`, ...; OPT's fc1/fc2 sit on the block itself) the output
    projection (`o_proj`, `out_proj`, `c_proj`, `dense`, `down_proj`, `fc2`, ...; else the last
    registered linear) forms one group, run after a group of the others.

    `block_returns_tuple`: the parent model indexes the block's output (`outputs[0]`), as BLOOM's
    does; capture's stand-in block then returns a 1-tuple.
    """

    name: str
    blocks_path: str | None = None
    embedding_paths: tuple[str, ...] | None = None
    final_paths: tuple[str, ...] | None = None
    groups: tuple[tuple[str, ...], ...] | None = None
    block_returns_tuple: bool = False

    # -- blocks ---------------------------------------------------------------------------------
    def blocks_location(self, model: nn.Module) -> tuple[nn.Module, str]:
        """`(owner, attribute)` such that `getattr(owner, attribute)` is the block ModuleList."""
        path = self.blocks_path or _find_blocks_path(model)
        owner_path, _, attribute = path.rpartition(".")
        owner = _resolve(model, owner_path)
        if owner is None or not isinstance(getattr(owner, attribute, None), nn.ModuleList):
            raise UnsupportedArchitectureError(
                _unsupported_message(model, f"no nn.ModuleList of decoder blocks at {path!r}")
            )
        return owner, attribute

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks, in execution order."""
        owner, attribute = self.blocks_location(model)
        return getattr(owner, attribute)

    # -- embedding and final stages -------------------------------------------------------------
    def _owner_children(self, model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
        """The stateful children of the blocks' owner, split into (before blocks, after blocks)."""
        owner, attribute = self.blocks_location(model)
        before, after, seen_blocks = [], [], False
        for child_name, child in owner.named_children():
            if child_name == attribute:
                seen_blocks = True
            elif _holds_state(child):
                (after if seen_blocks else before).append((child_name, child))
        return before, after

    def embedding_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules run before block 0 that hold weights or buffers (embeddings, positions, rotary)."""
        if self.embedding_paths is not None:
            return [m for m in (_resolve(model, p) for p in self.embedding_paths) if m is not None]
        before, after = self._owner_children(model)
        found = []
        for registered_before, (child_name, child) in [(True, c) for c in before] + [(False, c) for c in after]:
            lowered = child_name.lower()
            if any(h in lowered for h in _EMBEDDING_HINTS):
                found.append(child)
            elif registered_before and not any(h in lowered for h in _FINAL_HINTS):
                found.append(child)
        return found

    def final_modules(self, model: nn.Module) -> list[nn.Module]:
        """Final norm, output projection and LM head, in the order they run."""
        if self.final_paths is not None:
            return [m for m in (_resolve(model, p) for p in self.final_paths) if m is not None]
        before, after = self._owner_children(model)
        embedding_ids = {id(m) for m in self.embedding_modules(model)}
        found = [(n, m) for n, m in before + after if id(m) not in embedding_ids]
        # Registration order is not execution order here (OPT registers project_out before
        # final_layer_norm); norms run before the projection in every supported family.
        found.sort(key=lambda item: 0 if ("norm" in item[0].lower() or item[0].lower().startswith("ln")) else 1)
        modules = [m for _, m in found]
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise UnsupportedArchitectureError(_unsupported_message(model, "no LM head (get_output_embeddings() is None)"))
        modules.append(head)
        return modules

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Final stage: `hidden` [b, seq, hidden] (output of the last block) -> logits [b, seq, vocab].

        Applies `final_modules` in order, then what configs ask of the logits: Granite's division by
        `logits_scaling`, Cohere's multiplication by `logit_scale`, Gemma-2/3's soft-capping.
        """
        for module in self.final_modules(model):
            hidden = module(hidden)
        return scale_logits(model, hidden)

    # -- linear layers --------------------------------------------------------------------------
    def linear_layers(self, block: nn.Module) -> dict[str, nn.Module]:
        """`{name relative to block: nn.Linear | Conv1D}` in execution order (that of `sequential_groups`).

        Inside a group the order is registration order (OPT registers k, v, q); members of a
        group read the same input, so their relative order does not matter.
        """
        linears = _registered_linears(block)
        return OrderedDict((name, linears[name]) for group in self._groups(linears) for name in group)

    def sequential_groups(self, block: nn.Module) -> list[list[str]]:
        """True-sequential groups: attention inputs, attention output, MLP inputs, MLP output.

        Every name of `linear_layers(block)` appears exactly once, groups in execution order.
        """
        return self._groups(_registered_linears(block))

    def _groups(self, linears: dict[str, nn.Module]) -> list[list[str]]:
        if self.groups is not None:
            groups = [[name for name in g if name in linears] for g in self.groups]
            groups = [g for g in groups if g]
        else:
            groups = _structural_groups(linears)
        listed = [name for g in groups for name in g]
        if sorted(listed) != sorted(linears) or len(set(listed)) != len(listed):
            raise ValueError(
                f"Adapter {self.name!r}: sequential groups {groups} do not cover the block's linear layers "
                f"{list(linears)} exactly once."
            )
        return groups


# A MoE block's routing linears (Qwen2-MoE's `shared_expert_gate`, routers some models keep as nn.Linear): kept in
# full precision, as other GPTQ tools do and vLLM expects (it builds them as plain linears); they are tiny.
_ROUTER_NAMES = frozenset({"gate", "router", "shared_expert_gate"})


def scale_logits(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """What ``model``'s config asks of its LM head's output, as transformers applies it: Granite's division by
    ``logits_scaling``, Cohere's multiplication by ``logit_scale``, Gemma-2/3's soft-capping."""
    config = _text_config(model)
    divisor, factor = getattr(config, "logits_scaling", None), getattr(config, "logit_scale", None)
    if isinstance(divisor, (int, float)) and divisor != 1:
        logits = logits / divisor
    if isinstance(factor, (int, float)) and factor != 1:
        logits = logits * factor
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _registered_linears(block: nn.Module) -> OrderedDict[str, nn.Module]:
    moe = any(name.rpartition(".")[2] == "experts" for name, _ in block.named_modules())
    return OrderedDict((name, module) for name, module in block.named_modules()
                       if name and is_linear(module) and not (moe and name.rpartition(".")[2] in _ROUTER_NAMES))


def is_output_projection(name: str) -> bool:
    leaf = name.rpartition(".")[2].lower()
    return leaf in _OUTPUT_PROJECTION_NAMES


def _structural_groups(linears: dict[str, nn.Module]) -> list[list[str]]:
    """Per submodule: the output projection (by name, else the last registered) after the rest."""
    by_parent: OrderedDict[str, list[str]] = OrderedDict()
    for name in linears:
        by_parent.setdefault(name.rpartition(".")[0], []).append(name)
    groups: list[list[str]] = []
    bank_groups: dict[str, tuple[list[str], list[str]]] = {}  # a MoE bank: (all experts' inputs, their outputs)
    for parent, members in by_parent.items():
        bank = re.match(r"(.*(?:^|\.)experts)\.\d+$", parent)
        if bank is not None and len(members) > 1:
            # One expert's layers never read another's output: the bank is two steps, not two per expert.
            if bank.group(1) not in bank_groups:
                bank_groups[bank.group(1)] = ([], [])
                groups.extend(bank_groups[bank.group(1)])
            inputs, outputs = bank_groups[bank.group(1)]
            output = next((n for n in members if is_output_projection(n)), members[-1])
            inputs.extend(n for n in members if n != output)
            outputs.append(output)
            continue
        if len(members) == 1:
            groups.append(members)
            continue
        named_outputs = [n for n in members if is_output_projection(n)]
        output = named_outputs[0] if len(named_outputs) == 1 else members[-1]
        inputs = [n for n in members if n != output]
        # The output projection writes back to the residual stream, whose width the inputs read.
        residual_width = linear_in_features(linears[inputs[0]])
        if linear_out_features(linears[output]) == residual_width and all(
            linear_in_features(linears[n]) == residual_width for n in inputs
        ):
            groups.extend([inputs, [output]])
        else:  # unknown layout: one layer at a time, in registration order
            warnings.warn(f"Could not tell input from output projections among {members}; quantizing them one by one.")
            groups.extend([[n] for n in members])
    return groups


def _find_blocks_path(model: nn.Module) -> str:
    """Dotted path of the ModuleList of identical modules, containing linears, with most parameters."""
    best_path, best_size = None, -1
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if not any(is_linear(m) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best_path, best_size = path, size
    if best_path is None:
        raise UnsupportedArchitectureError(
            _unsupported_message(model, "found no nn.ModuleList of identical blocks containing linear layers")
        )
    return best_path


def _unsupported_message(model: nn.Module, reason: str) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    return (
        f"Unsupported architecture {type(model).__name__} (model_type={model_type!r}): {reason}. "
        "GPTQ needs an adapter that provides: blocks(model) -> the nn.ModuleList of decoder blocks; "
        "embedding_modules(model) -> modules run before block 0; final_modules(model) -> final norm, "
        "output projection and LM head in order; linear_layers(block) -> {name: nn.Linear | Conv1D}; "
        "sequential_groups(block) -> [[names], ...]. Register one with "
        f"lightning_gptq.models.adapters.register_adapter({model_type!r}, ArchitectureAdapter("
        f"name={model_type!r}, blocks_path='model.layers', embedding_paths=('model.embed_tokens', "
        "'model.rotary_emb'), final_paths=('model.norm', 'lm_head'))) or with a subclass of "
        "ArchitectureAdapter overriding those methods."
    )


_REGISTRY: dict[str, ArchitectureAdapter] = {}


def register_adapter(model_type: str, adapter: ArchitectureAdapter) -> None:
    """Use `adapter` for every model whose `config.model_type` is `model_type` (replaces any earlier)."""
    if not isinstance(adapter, ArchitectureAdapter):
        raise TypeError("register_adapter expects an ArchitectureAdapter (or subclass) instance.")
    _REGISTRY[model_type] = adapter


def registered_adapters() -> dict[str, ArchitectureAdapter]:
    return dict(_REGISTRY)


def get_adapter(model: nn.Module) -> ArchitectureAdapter:
    """The registered adapter for `model.config.model_type`, else one that detects the structure.

    Raises `UnsupportedArchitectureError` when no decoder-only block structure, LM head, or linear
    layers carrying most of the block's weights are found (encoder-decoders, fused-expert MoEs).
    Warns once for a detected structure whose model type the tests do not cover.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(_unsupported_message(model, "encoder-decoder models are not supported"))
    if hasattr(model, "can_generate") and not model.can_generate():
        raise UnsupportedArchitectureError(
            _unsupported_message(model, "not a causal LM (can_generate() is False; load it with AutoModelForCausalLM)")
        )

    adapter = ArchitectureAdapter(name=model_type)
    blocks = adapter.blocks(model)
    adapter.final_modules(model)  # raises without an LM head
    block_params = sum(p.numel() for p in blocks[0].parameters())
    linear_params = sum(weight_out_in(m).numel() for m in adapter.linear_layers(blocks[0]).values())
    if block_params == 0 or linear_params < _MIN_LINEAR_SHARE * block_params:
        raise UnsupportedArchitectureError(
            _unsupported_message(
                model,
                f"linear layers hold only {linear_params:,} of the block's {block_params:,} parameters "
                "(fused or non-linear projections, e.g. packed MoE experts: lightning_gptq.models.unfuse_experts(model) "
                "splits the expert banks it knows, and loading through lightning_gptq does so)",
            )
        )
    if model_type not in VERIFIED_MODEL_TYPES:
        warnings.warn(
            f"model_type {model_type!r} is not among the verified architectures {sorted(VERIFIED_MODEL_TYPES)}; "
            "using structural detection (calibration first checks on a short window that running the blocks one "
            "at a time reproduces the model's logits).",
            stacklevel=2,
        )
    return adapter


# BLOOM's model indexes each block's output (`outputs[0]`).
register_adapter("bloom", ArchitectureAdapter(name="bloom", block_returns_tuple=True))
