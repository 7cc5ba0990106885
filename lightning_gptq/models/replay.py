"""Replaying a block's finished parts in later true-sequential passes instead of running them again.

A true-sequential pass runs the block from its input until the pass's group of linears has read its inputs.
What the pass computes before any linear still to be quantized runs cannot depend on those linears; it stays the
same in every later pass and in propagation as long as nothing it read changes. Two kinds of part are recorded
once (a copy per batch) and replayed:

- a *child* of the block holding only quantized layers (the attention once o_proj is quantized): recorded in the
  gate/up pass, replayed in the down_proj pass and in propagation;
- an *attention call* (transformers' attention interface: the softmax(q·kᵀ)·v of a layer whose q/k/v are
  quantized): recorded in the o_proj pass, replayed in the gate/up pass, whose attention would otherwise
  recompute it.

So a LLaMA block computes its attention once per window (in the o_proj pass; the q/k/v pass also does on the
windows the sink rule probes) instead of four times. The numbers are the same bit for bit: same inputs, same
weights, same kernels.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from lightning_gptq.models.attention_probe import attention_layers, route_attention
from lightning_gptq.models.capture import map_tensors

__all__ = ["PartReplay", "fingerprint"]


def fingerprint(module: nn.Module, skip: Iterable[str] = ()) -> tuple:
    """What a recorded output may depend on besides the input: which modules ``module`` holds, and each parameter's
    and buffer's storage, in-place version, dtype, shape and sum (a swapped layer, a cast or a rewritten weight
    changes it; the sum catches writes through ``.data``, which keep the version). Submodules named in ``skip``
    (and what they hold) are left out."""
    skip = tuple(skip)

    def kept(name: str) -> bool:
        return not any(_holds(s, [name]) for s in skip)

    modules = tuple((name, id(m)) for name, m in module.named_modules() if kept(name))
    tensors = tuple((name, id(t), t.data_ptr(), t._version, t.dtype, tuple(t.shape), _sum(t))
                    for name, t in [*module.named_parameters(), *module.named_buffers()] if kept(name.rpartition(".")[0]))
    return modules, tensors


@torch.no_grad()
def _sum(t: torch.Tensor) -> float | int:
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.sum(dtype=torch.float64 if t.is_floating_point() else torch.int64).item()


def _holds(part: str, layers: Iterable[str]) -> bool:
    """Whether any of ``layers`` is ``part`` or inside it (dotted names)."""
    return any(name == part or name.startswith(part + ".") for name in layers)


def _nbytes(value: Any) -> int | None:
    """Bytes of the tensors in ``value`` (tensors, ``None``, tuples and lists of them); ``None`` for anything else."""
    if value is None:
        return 0
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        sizes = [_nbytes(v) for v in value]
        return None if any(s is None for s in sizes) else sum(sizes)
    return None


def _copy_to(value: Any, device: torch.device | str) -> Any:
    return map_tensors(value, lambda t: t.detach().to(device, copy=True))


@dataclass
class _Record:
    fingerprint: tuple  # of the block, without the layers that were still to come when it was recorded
    skip: tuple[str, ...]
    dtype: torch.dtype | None
    once: bool  # an attention call: replayed in the next pass only (then its child is recorded whole)
    outputs: list[Any] = field(default_factory=list)  # per batch; None once consumed


class PartReplay:
    """Records and replays parts of ``block`` (named ``"<child>"`` or ``"<attention module>#call"``) over the
    passes of one block.

    A part is recorded in a pass when it returns before any layer still to be quantized (``pending``) has run,
    runs once per batch, and returns tensors (or tuples of them) no larger than that batch's block input; a child
    must also hold a quantized layer (``done``) and no pending one. At most one child and one attention call per
    attention layer are held; an attention call lives one pass, consumed as it is replayed, and propagation frees
    each batch it replays, so the records add at most one activation cache to what a pass holds, and none at the
    propagation peak. ``store(tensor)`` keeps a recorded copy where the activation cache lives. A record is
    replayed while the block, except the layers still to come when it was recorded, has the modules and tensors it
    had then (``fingerprint``) and the pass runs in the same dtype; each replay hands out a copy, as blocks may add
    to their children's outputs in place.
    """

    def __init__(self, block: nn.Module, store: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        self.block = block
        self.store = store
        self.records: dict[str, _Record] = {}
        self.replayed = 0  # part calls answered from a record
        found = {id(m) for m in attention_layers(block)}
        self._attention = {name: m for name, m in block.named_modules() if id(m) in found}
        self._replaying: list[str] = []
        self._candidates: list[str] = []
        self._recorded: dict[str, dict[int, Any]] = {}
        self._refused: set[str] = set()
        self._pending: list[str] = []
        self._pending_entered = False
        self._dtype: torch.dtype | None = None
        self._consume = False
        self._fingerprint: tuple = ()

    def begin_pass(self, dtype: torch.dtype | None, done: Iterable[str] = (), pending: Iterable[str] = (),
                   consume: bool = False) -> None:
        """Before a pass, with the block's weights at rest (outside ``running_in``): checks the records, lists what
        may be recorded. ``done``/``pending``: names (relative to ``block``) of the linears quantized before this
        pass / of this pass's group and later ones. ``consume``: the last pass (propagation) frees each replayed batch."""
        done, self._pending = list(done), list(pending)
        self._dtype, self._consume = dtype, consume
        for name, record in list(self.records.items()):
            if record.dtype != dtype or record.fingerprint != fingerprint(self.block, record.skip):
                del self.records[name]
        self._replaying = list(self.records)
        self._candidates, self._recorded, self._refused = [], {}, set()
        if consume or not done:
            return
        self._fingerprint = fingerprint(self.block, self._pending)
        children = [name for name in self.records if "#" not in name]
        if not children:
            self._candidates += [name for name, _ in self.block.named_children()
                                 if _holds(name, done) and not _holds(name, self._pending)]
        self._candidates += [f"{name}#call" for name in self._attention
                             if f"{name}#call" not in self.records and not any(_holds(c, [name]) for c in children)]

    def after_hooks(self, before: tuple, keep_running: Iterable[nn.Module]) -> None:
        """After the pass's start hooks: if they changed the block (``before``: its ``fingerprint`` just before),
        nothing is replayed or recorded in this pass and the records are dropped; and never replay or record a part
        that is, holds or calls into one of ``keep_running`` (modules a hook must see run, such as the attention the
        sink rule probes: its route would clash with the attention-call records)."""
        if fingerprint(self.block) != before:
            self.records, self._replaying, self._candidates = {}, [], []
        watched = {id(m) for m in keep_running}
        if not watched:
            return
        self._replaying = [n for n in self._replaying if "#" not in n]
        self._candidates = [n for n in self._candidates if "#" not in n]
        for name, child in self.block.named_children():
            if any(id(m) in watched for m in child.modules()):
                self._replaying = [n for n in self._replaying if n != name]
                self._candidates = [n for n in self._candidates if n != name]

    @contextlib.contextmanager
    def batch(self, j: int, limit_bytes: int) -> Iterator[None]:
        """Batch ``j`` of the pass runs inside: records replayed, candidates recorded (up to ``limit_bytes`` each)."""
        self._pending_entered = False
        overridden, handles = [], []
        try:
            for name in self._pending:
                handles.append(self.block.get_submodule(name).register_forward_pre_hook(self._entered))
            for name in self._replaying:
                if "#" not in name:
                    child = self.block.get_submodule(name)
                    overridden.append((child, child.__dict__.get("forward")))  # an instance's own forward is put back
                    child.forward = functools.partial(self._replay, name, j)
            for name in self._candidates:
                if "#" not in name and name not in self._refused:
                    hook = functools.partial(self._child_returned, name, j, limit_bytes)
                    handles.append(self.block.get_submodule(name).register_forward_hook(hook))
            calls = {n.partition("#")[0] for n in [*self._replaying, *self._candidates] if "#" in n}
            modules = [self._attention[n] for n in calls]
            with route_attention(modules, functools.partial(self._call, j, limit_bytes)) if modules \
                    else contextlib.nullcontext():
                yield
        finally:
            for child, own in overridden:
                del child.forward
                if own is not None:
                    child.forward = own
            for handle in handles:
                handle.remove()

    def _entered(self, *_) -> None:
        self._pending_entered = True

    def _replay(self, name: str, j: int, *args, **kwargs) -> Any:
        record = self.records[name]
        output = record.outputs[j]
        if output is None:
            raise RuntimeError(f"replay: batch {j} of the recorded {name!r} was already used")
        given = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        self.replayed += 1
        if self._consume or record.once:
            record.outputs[j] = None
        return _copy_to(output, given[0].device if given else "cpu")

    def _keep(self, name: str, j: int, limit_bytes: int, output: Any) -> None:
        size = _nbytes(output)
        if self._pending_entered or size is None or size > limit_bytes or j in self._recorded.get(name, {}):
            self._refused.add(name)  # after a pending layer ran, run twice, or an output it cannot (should not) hold
            self._recorded.pop(name, None)
        elif name not in self._refused:
            self._recorded.setdefault(name, {})[j] = map_tensors(output, lambda t: self.store(_copy_to(t, "cpu")))

    def _child_returned(self, name: str, j: int, limit_bytes: int, module, args, output) -> None:
        self._keep(name, j, limit_bytes, output)

    def _call(self, j: int, limit_bytes: int, own, module, *args, **kwargs) -> Any:
        name = next(n for n, m in self._attention.items() if m is module) + "#call"
        if name in self._replaying:
            return self._replay(name, j, *args, **kwargs)
        output = own(module, *args, **kwargs)
        if name in self._candidates:
            self._keep(name, j, limit_bytes, output)
        return output

    def end_pass(self, num_batches: int) -> None:
        """After a pass: keeps what was recorded on every batch (the first child only); drops spent attention calls."""
        self.records = {n: r for n, r in self.records.items() if not (r.once and n in self._replaying)}
        complete = [n for n in self._candidates
                    if n not in self._refused and sorted(self._recorded.get(n, {})) == list(range(num_batches))]
        child = next((n for n in complete if "#" not in n), None)
        for name in complete:
            if "#" in name and (child is None or not _holds(child, [name.partition("#")[0]])):
                self._add(name, once=True, num_batches=num_batches)
        if child is not None:
            self._add(child, once=False, num_batches=num_batches)
        self._candidates, self._recorded, self._refused = [], {}, set()

    def _add(self, name: str, once: bool, num_batches: int) -> None:
        outputs = self._recorded[name]
        self.records[name] = _Record(self._fingerprint, tuple(self._pending), self._dtype, once,
                                     [outputs[j] for j in range(num_batches)])
