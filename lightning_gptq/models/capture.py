"""Capture what the decoder blocks receive, and replay blocks one at a time.

How capture works: the block ModuleList is swapped for a list of stand-in modules, one per block,
and the module owning the blocks (`LlamaModel`, `OPTDecoder`, ...) is called on the token ids. The
model's own code therefore computes everything blocks get (embeddings, attention masks, position
ids, rotary cos/sin, ALiBi) exactly as in a normal forward. Each stand-in records the arguments it
is called with, bound to the real block's signature, and returns its input unchanged, so no block
runs; the LM head does not run either. The original list is put back in a `finally`.

All blocks are recorded, not only block 0: architectures that alternate sliding-window and global
attention (Gemma-3, Qwen2 and Mistral with `layer_types`) hand different masks and rotary tables
to different blocks. `BlockInputs.kwargs[j]` is what block 0 got for batch `j`;
`BlockInputs.kwargs_for(i, j)` is what block `i` got.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import torch
from torch import nn

from lightning_gptq.models.adapters import ArchitectureAdapter, UnsupportedArchitectureError
from lightning_gptq.models.loading import resolve_dtype

__all__ = [
    "BlockInputs",
    "capture_block_inputs",
    "check_replay",
    "estimate_activation_bytes",
    "forward_blocks",
    "module_device_dtype",
    "run_block",
    "tensors_to_device",
]

_MISSING = object()


@dataclasses.dataclass
class BlockInputs:
    """Inputs of the decoder blocks for a set of calibration batches.

    `hidden[j]`: `[b, seq, hidden]` input of block 0 for batch `j` (CPU, `storage_dtype`).
    `kwargs[j]`: every other argument block 0 received for batch `j` (attention mask, position
    ids, position_embeddings (cos, sin), alibi, `use_cache=False`, ...), tensors on CPU. Equal
    tensors are stored once across batches.
    `block_overrides[j]`: `{block index: {name: value}}` for blocks that received something
    different from block 0 (empty for most architectures); use `kwargs_for`.
    `reference[j]`: where kept (asymmetric calibration), the *full-precision* model's input of the
    current block for batch `j` (`hidden` is the partly quantized model's); `None` otherwise.
    """

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    block_overrides: list[dict[int, dict[str, Any]]] = dataclasses.field(default_factory=list)
    reference: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.hidden)

    def kwargs_for(self, block_index: int, batch_index: int) -> dict[str, Any]:
        """The keyword arguments block `block_index` receives for batch `batch_index`."""
        base = self.kwargs[batch_index]
        overrides = self.block_overrides[batch_index].get(block_index) if self.block_overrides else None
        return {**base, **overrides} if overrides else base

    def extend(self, other: "BlockInputs") -> None:
        """Append `other`'s batches (e.g. from a later `capture_block_inputs` call).

        Argument tensors equal to ones already stored are shared instead of kept twice (a
        `[b, 1, seq, seq]` eager attention mask per batch adds up over 128 batches).
        """
        store = _TensorStore()
        for tensor in _iter_tensors([self.kwargs, self.block_overrides]):
            store.put(tensor, {})
        self.hidden.extend(other.hidden)
        self.kwargs.extend(store.put(k, {}) for k in other.kwargs)
        overrides = other.block_overrides or [{} for _ in other.hidden]
        if not self.block_overrides:
            self.block_overrides = [{} for _ in range(len(self.hidden) - len(other.hidden))]
        self.block_overrides.extend(store.put(o, {}) for o in overrides)

    def nbytes(self) -> int:
        """Bytes held by all stored tensors, shared ones counted once."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for tensor in _iter_tensors([self.hidden, self.kwargs, self.block_overrides]):
            key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += key[1]
        return total


def estimate_activation_bytes(model_config_or_hidden_size, nsamples: int, seqlen: int, dtype="float32") -> int:
    """Bytes of the block-input cache for `nsamples` windows of `seqlen` tokens stored as `dtype`.

    `model_config_or_hidden_size`: an int, or a config with `hidden_size` (text config for
    multimodal configs). Counts the hidden states; masks and rotary tables are shared across
    batches and small in comparison.
    """
    if isinstance(model_config_or_hidden_size, int):
        hidden_size = model_config_or_hidden_size
    else:
        config = model_config_or_hidden_size
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        hidden_size = int(config.hidden_size)
    torch_dtype = resolve_dtype(dtype)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError("estimate_activation_bytes needs a concrete dtype, not 'auto'.")
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    return int(nsamples) * int(seqlen) * int(hidden_size) * itemsize


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device of the module's first parameter/buffer and dtype of its first floating-point one."""
    device, dtype = None, None
    for tensor in list(module.parameters()) + list(module.buffers()):
        device = device or tensor.device
        if dtype is None and tensor.is_floating_point():
            dtype = tensor.dtype
        if device is not None and dtype is not None:
            break
    return device or torch.device("cpu"), dtype or torch.get_default_dtype()


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`value` with `fn` applied to every tensor inside (dicts, lists, tuples, named tuples)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        mapped = [map_tensors(v, fn) for v in value]
        return type(value)(mapped) if not hasattr(value, "_fields") else type(value)(*mapped)
    return value


def tensors_to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor inside (dicts, lists, tuples) moved to `device`."""
    return map_tensors(value, lambda t: t.to(device))


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Run one decoder block: `hidden` `[b, seq, hidden]` -> output hidden states `[b, seq, hidden]`.

    `hidden` is cast to the block's device and floating dtype, tensors in `kwargs` are moved to its
    device. Tuple outputs (BLOOM, older models) are reduced to their first element. No autograd.
    """
    device, dtype = module_device_dtype(block)
    hidden = hidden.to(device=device, dtype=dtype)
    with torch.no_grad():
        output = block(hidden, **tensors_to_device(kwargs, device))
    return output[0] if isinstance(output, (tuple, list)) else output


class _BlockStandIn(nn.Module):
    """Takes a block's place during capture: records its arguments and returns its input.

    The real block is kept unregistered, and attribute reads fall through to it, so model code
    that inspects its layers (`layer.attention_type`, ...) still works.
    """

    def __init__(self, block: nn.Module, index: int, record: Callable, returns_tuple: bool):
        super().__init__()
        object.__setattr__(self, "_real_block", block)
        self.index = index
        self._record = record
        self._returns_tuple = returns_tuple
        self._signature = inspect.signature(block.forward)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_real_block"), name)

    def forward(self, *args, **kwargs):
        bound = self._signature.bind(*args, **kwargs)
        arguments: dict[str, Any] = {}
        hidden = _MISSING
        for name, value in bound.arguments.items():
            kind = self._signature.parameters[name].kind
            if hidden is _MISSING:
                hidden = value
            elif kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError(
                        f"{type(self._real_block).__name__} was called with extra positional arguments; "
                        "capture can only replay named arguments."
                    )
            else:
                arguments[name] = value
        self._record(self.index, hidden, arguments)
        return (hidden,) if self._returns_tuple else hidden


def _iter_tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _iter_tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _iter_tensors(v)


def _contains_tensor(value: Any) -> bool:
    return next(_iter_tensors(value), None) is not None


def _same_argument(a: Any, b: Any) -> bool:
    """Whether two recorded arguments are the same: tensors by identity, other values by equality."""
    if a is b:
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_argument(x, y) for x, y in zip(a, b))
    if _contains_tensor(a) or _contains_tensor(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - exotic values without a usable __eq__ count as different
        return False


def _sanitize(arguments: dict[str, Any]) -> dict[str, Any]:
    """Drop KV caches (replayed blocks must not append to one) and force `use_cache=False`."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        Cache = ()  # noqa: N806
    cleaned = {}
    for name, value in arguments.items():
        if isinstance(value, Cache):
            value = None
        if name == "use_cache":
            value = False
        cleaned[name] = value
    return cleaned


class _TensorStore:
    """Moves recorded tensors to CPU, storing each distinct (equal-valued) tensor once."""

    def __init__(self):
        self._pool: dict[tuple, list[torch.Tensor]] = {}

    def put(self, value: Any, memo: dict[int, Any]) -> Any:
        if isinstance(value, torch.Tensor):
            if id(value) in memo:
                return memo[id(value)]
            on_cpu = value.device.type == "cpu" and not value.requires_grad
            stored = value if on_cpu else value.detach().to("cpu")
            key = (tuple(stored.shape), stored.dtype, stored.stride())
            for candidate in self._pool.setdefault(key, []):
                if torch.equal(candidate, stored):
                    stored = candidate
                    break
            else:
                self._pool[key].append(stored)
            memo[id(value)] = stored
            return stored
        if isinstance(value, dict):
            return {k: self.put(v, memo) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            moved = [self.put(v, memo) for v in value]
            return type(value)(*moved) if hasattr(value, "_fields") else type(value)(moved)
        return value


def _call_owner(model: nn.Module, owner: nn.Module, input_ids: torch.Tensor) -> None:
    """Run the module that owns the blocks (so the LM head is skipped), else the whole model."""
    target = owner if "input_ids" in inspect.signature(owner.forward).parameters else model
    parameters = inspect.signature(target.forward).parameters.values()
    call_kwargs: dict[str, Any] = {"input_ids": input_ids}
    if any(p.name == "use_cache" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        call_kwargs["use_cache"] = False
    target(**call_kwargs)


def capture_block_inputs(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 1,
    storage_dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> BlockInputs:
    """Record the inputs of every decoder block for `input_ids` `[n, seqlen]`, in batches.

    Only the embedding stage runs (on `device`, default: where the embeddings are; the non-block
    modules of the blocks' owner are moved there and back). Hidden states are stored on CPU as
    `storage_dtype` (default: as computed). The model is restored exactly afterwards, also on error.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [n, seqlen], got shape {tuple(input_ids.shape)}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    storage = resolve_dtype(storage_dtype) if storage_dtype is not None else None
    owner, attribute = adapter.blocks_location(model)
    real_blocks = getattr(owner, attribute)

    embedding_modules = adapter.embedding_modules(model)
    if device is None:
        device = module_device_dtype(embedding_modules[0] if embedding_modules else model)[0]
    device = torch.device(device)

    records: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}

    def record(index: int, hidden: torch.Tensor, arguments: dict[str, Any]) -> None:
        records[index] = (hidden, arguments)

    stand_ins = nn.ModuleList(
        _BlockStandIn(block, i, record, adapter.block_returns_tuple) for i, block in enumerate(real_blocks)
    )
    # Everything the owner runs besides the blocks (embeddings, rotary, final norm) goes to `device`.
    movable = [child for name, child in owner.named_children() if name != attribute]
    original_devices = [module_device_dtype(child)[0] for child in movable]

    store = _TensorStore()
    result = BlockInputs(hidden=[], kwargs=[], block_overrides=[])
    batches = range(0, input_ids.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="capture block inputs", unit="batch", leave=False)
    try:
        setattr(owner, attribute, stand_ins)
        for child in movable:
            child.to(device)
        with torch.no_grad():
            for start in batches:
                records.clear()
                _call_owner(model, owner, input_ids[start : start + batch_size].to(device))
                if 0 not in records:
                    raise RuntimeError(
                        f"Capture for {adapter.name!r}: the model's forward never called its first block."
                    )
                memo: dict[int, Any] = {}
                hidden0, arguments0 = records[0]
                arguments0 = _sanitize(arguments0)
                result.hidden.append(hidden0.detach().to("cpu", dtype=storage or hidden0.dtype))
                result.kwargs.append(store.put(arguments0, memo))
                overrides: dict[int, dict[str, Any]] = {}
                for index in sorted(records)[1:]:
                    arguments = _sanitize(records[index][1])
                    changed = {
                        k: v for k, v in arguments.items() if not _same_argument(v, arguments0.get(k, _MISSING))
                    }
                    changed.update({k: _MISSING for k in arguments0 if k not in arguments})
                    if changed:
                        overrides[index] = store.put(changed, memo)
                if any(v is _MISSING for o in overrides.values() for v in o.values()):
                    raise RuntimeError(f"Capture for {adapter.name!r}: blocks received different argument names.")
                result.block_overrides.append(overrides)
    finally:
        records.clear()
        setattr(owner, attribute, real_blocks)
        for child, original in zip(movable, original_devices):
            child.to(original)
    return result


def forward_blocks(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 1,
) -> torch.Tensor:
    """Logits `[n, seqlen, vocab]` computed as capture -> `run_block` over every block -> final stage.

    A reference path for tests: it must equal `model(input_ids).logits`.
    """
    inputs = capture_block_inputs(model, adapter, input_ids, batch_size=batch_size)
    hidden = list(inputs.hidden)
    for block_index, block in enumerate(adapter.blocks(model)):
        hidden = [run_block(block, h, inputs.kwargs_for(block_index, j)) for j, h in enumerate(hidden)]
    device = module_device_dtype(adapter.final_modules(model)[-1])[0]
    with torch.no_grad():
        return torch.cat([adapter.logits(model, h.to(device)) for h in hidden], dim=0)


def check_replay(model: nn.Module, adapter: ArchitectureAdapter, *, tokens: int = 16) -> float:
    """Relative max difference between ``model``'s logits on one short window and what calibration computes
    (``forward_blocks``). Raises ``UnsupportedArchitectureError`` above fp rounding (1e-3 in fp32, 3e-2 in 16
    bits): the adapter misses part of the model's forward (a scaling outside the blocks, say), so Hessians,
    propagation or blockwise scores would be silently wrong."""
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    limit = getattr(config, "max_position_embeddings", None) or tokens
    if vocab < 4:
        return 0.0  # nothing to draw tokens from: structural checks only
    ids = torch.randint(3, vocab, (1, min(tokens, int(limit))), generator=torch.Generator().manual_seed(0))
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    ids = ids.to(module_device_dtype(embeddings or adapter.embedding_modules(model)[0])[0])
    with torch.no_grad():
        output = model(ids)
    full = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if full is None:
        return 0.0  # a module without logits: the caller's forward_fn decides what runs
    replayed = forward_blocks(model, adapter, ids).to(full.device)
    difference = float((replayed.double() - full.double()).abs().max() / full.double().abs().max().clamp_min(1e-30))
    tolerance = 1e-3 if full.dtype.itemsize >= 4 else 3e-2
    if not difference <= tolerance:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: running its blocks one at a time does not reproduce its forward (logits differ "
            f"by {difference:.2e} of their largest, above {tolerance:g}): something outside the blocks (an embedding "
            "or logit scale, a step between blocks) is not known to the adapter. Register one with "
            "lightning_gptq.models.register_adapter (a subclass whose logits()/blocks() follow the model).")
    return difference
