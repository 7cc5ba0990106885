"""GPTQ's sequential calibration of a causal LM, block by block, with no framework inside.

The model-level loop of the paper (and of the reference ``opt.py``)::

    capture      run the embeddings on every calibration window -> the inputs of block 0
    for each block b:
        for each group of its linears (all at once, or one after another when true-sequential):
            on_block_start(ctx)      hooks start accumulating each layer's Hessian
            run block b on every batch of cached inputs
            on_block_end(ctx)        hooks solve each layer and swap in its quantized version
        propagate    run the quantized block again: its outputs are block b+1's inputs
        on_block_propagated(ctx)     e.g. write a resume point

``CalibrationDriver.run(windows)`` is that loop. A framework that wants every step as one of its own
(``GPTQModule`` maps stages to fit epochs and batches to training steps) calls ``start(stage)``,
``step(stage, j, batch)`` and ``end(stage)`` for each ``Stage`` of ``stages`` instead; ``run`` does the
same calls. What is quantized and how is up to the hooks (``fire(name, ctx)``); the driver only
moves data, runs blocks and tells the hooks where it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from lightning_gptq.models import capture_block_inputs, check_replay, get_adapter, run_block
from lightning_gptq.models.adapters import VERIFIED_MODEL_TYPES
from lightning_gptq.models.experts import unfuse_experts
from lightning_gptq.models.replay import PartReplay, fingerprint
from lightning_gptq.models.capture import BlockInputs, module_device_dtype
from lightning_gptq.models.compute_dtype import floating_to, running_in
from lightning_gptq.nn import exact_kernels
from lightning_gptq.nn.quant_linear import dense_weights_held

__all__ = ["BlockContext", "CalibrationDriver", "Stage", "pinned_adapter"]


@dataclass(frozen=True)
class Stage:
    """One pass over the calibration batches: ``capture``, ``calibrate`` (block, group), ``propagate``
    (block), or ``quantize`` (every block at once, for methods that need no calibration)."""

    kind: str
    block: int = -1
    group: int = 0
    num_groups: int = 1

    def describe(self, num_blocks: int) -> str:
        if self.kind == "capture":
            return "capture block inputs"
        if self.kind == "quantize":
            return "quantize (round to nearest)"
        group = f" group {self.group + 1}/{self.num_groups}" if self.kind == "calibrate" and self.num_groups > 1 else ""
        return f"{self.kind} block {self.block + 1}/{num_blocks}{group}"


@dataclass
class BlockContext:
    """What the block hooks get: one calibration step of one block (or of one true-sequential group).

    ``block`` is the module the calibration passes run through (a decoder block, or a whole user
    model); ``layers`` maps names relative to ``block`` to the linears to quantize in this step.
    ``stage`` is ``"calibrate"``, ``"quantize"`` (no calibration passes) or ``"propagated"`` (after
    ``on_block_propagated``: the block's outputs are cached as the next block's inputs).
    ``inputs`` is the activation cache: this block's inputs while calibrating, the next block's
    once propagated (``None`` outside a driver). Hooks share results through ``hessians``
    (name -> ``HessianAccumulator``), ``mismatches`` (name -> ``MismatchAccumulator``, asymmetric
    calibration) and ``results`` (name -> ``QuantizedWeight``).
    """

    block_index: int
    num_blocks: int
    block: nn.Module
    layers: dict[str, nn.Module]
    group_index: int = 0
    num_groups: int = 1
    prefix: str = ""  # dotted path of ``block`` in the model, for names in logs and checkpoints
    hessians: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    stage: str = "calibrate"
    inputs: BlockInputs | None = None
    # Asymmetric calibration: before each calibration batch the still full-precision block runs on
    # the full-precision model's inputs (``reference_pass`` is True meanwhile: hooks that accumulate
    # must skip it), and ``reference_inputs`` holds what each layer read in that run.
    reference_inputs: dict[str, torch.Tensor] | None = None
    reference_pass: bool = False
    mismatches: dict[str, Any] = field(default_factory=dict)
    # Submodules of ``block`` a hook must see run to the end in each calibration pass (the attention a
    # sink weight is measured on): the pass ends once these have and this step's layers have read their input.
    runs_through: list[nn.Module] = field(default_factory=list)
    # Layers known to read the very tensor an earlier layer of this step reads (name -> that layer), as a hook
    # learned it on the step's first batch (HessianCapture, which then feeds one accumulator): a pass that has
    # read the earlier layer's input has read theirs, and ends without running the earlier layer to reach them.
    same_input: dict[str, str] = field(default_factory=dict)
    # The batch's padding as ``[batch, seq]`` (1: a real token, 0: padding), where its positions are not all real (a
    # user's own module calibrating on padded batches): Hessian hooks leave padded positions out.
    token_mask: torch.Tensor | None = None

    def full_name(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def describe(self) -> str:
        group = f" group {self.group_index + 1}/{self.num_groups}" if self.num_groups > 1 else ""
        return f"block {self.block_index + 1}/{self.num_blocks}{group}"


def pinned_adapter(lm: nn.Module):
    """``lm``'s architecture adapter with its block path fixed now: structure detection looks for
    linear layers, which a quantized block no longer has."""
    adapter = get_adapter(lm)
    owner, attribute = adapter.blocks_location(lm)
    owner_name = next(name for name, m in lm.named_modules() if m is owner)
    return dataclasses.replace(adapter, blocks_path=".".join(p for p in (owner_name, attribute) if p))


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class _PassDone(Exception):
    """Raised inside a calibration pass once it has given every layer its input."""


class CalibrationDriver:
    """Calibrates ``source.model`` (a weight source: ``model``, ``streams``, ``fetch``, ``free``).

    Args:
        source: where the weights are (``lightning_gptq.sources``); streamed sources have each
            block read before its first pass and freed once it is written out.
        fire: ``fire(hook_name, ctx)`` calls the hooks (``on_block_start``, ``on_block_end``,
            ``on_block_propagated``) with a ``BlockContext``.
        device: where the block being worked on runs (the rest of the model stays where it is).
        true_sequential: one calibration pass per group of a block's linears.
        activation_dtype: dtype of the cached block inputs (default: as computed).
        compute_dtype: run the blocks' calibration passes (the ones that feed the Hessians) in this
            dtype (e.g. bf16 where this machine's bf16 matmuls are fast; ``models.compute_dtype``).
            The Hessians stay fp32, the solve reads the model's own weights, and propagation runs in
            the model's dtype, so the next block's inputs carry no bf16 rounding and errors do not
            build up from block to block. ``None``: the model's dtype. A *wider* dtype (fp64 for an
            fp32 model) runs the whole stream in it instead: propagation too, the cached inputs kept
            in it (unless ``activation_dtype`` says otherwise), Hessians and solve in fp64, so that
            which kernels a machine's matmuls take no longer flips codes (``calibration_dtype``).
        store: puts a cached activation where it lives (in memory, or a file: ``SpillFolder.put``).
        write_block: ``write_block(prefix, block)`` for a streamed source, before the block is freed.
        quantizes: ``quantizes(full_layer_name)``: whether that linear is quantized in this run (``None``:
            every one). The others (a ``-:`` per-layer rule) get no Hessian and no pass waits for them; a
            block with none left only propagates.
        reference_stream: also carry the full-precision model's block inputs (twice the activation
            cache) and, before each calibration batch, run the block unquantized on them, recording
            each linear's input in ``ctx.reference_inputs`` (asymmetric calibration, GPTAQ). One more
            block forward per batch; needs ``true_sequential=False`` (the block is then unquantized
            for its whole calibration pass).
        replay_parts: true-sequential, what a pass computed that later passes would compute again (the attention
            call once q/k/v are quantized, the whole attention once o_proj is) is recorded and replayed instead of
            run: the same numbers (``models.replay``). ``False`` runs every pass from the block's input.
    """

    def __init__(self, source, *, fire: Callable[[str, BlockContext], None], device: torch.device | str = "cpu",
                 true_sequential: bool = False, activation_dtype: str | torch.dtype | None = None,
                 compute_dtype: torch.dtype | None = None,
                 store: Callable[[torch.Tensor], torch.Tensor] = _keep,
                 write_block: Callable[[str, nn.Module], None] | None = None, reference_stream: bool = False,
                 quantizes: Callable[[str], bool] | None = None, replay_parts: bool = True) -> None:
        if reference_stream and true_sequential:
            raise ValueError("asymmetric calibration (the full-precision reference stream) needs true_sequential=False: "
                             "a true-sequential pass runs a block whose earlier layers are already quantized")
        self.source = source
        self.model = source.model
        if not source.streams:
            unfuse_experts(self.model)  # (a model not loaded by load_causal_lm: quantize(nn.Module))
        self.adapter = pinned_adapter(self.model)
        if not source.streams and self.adapter.name not in VERIFIED_MODEL_TYPES:
            check_replay(self.model, self.adapter)  # an unverified architecture: prove the blockwise path on it
        self.fire = fire
        self.device = torch.device(device)
        self.true_sequential = true_sequential
        self.compute_dtype = compute_dtype
        self._pass_dtype: torch.dtype | None = None  # the current stage's: compute_dtype while calibrating
        model_dtype = module_device_dtype(self.model)[1]
        self.widens = compute_dtype is not None and compute_dtype.itemsize > model_dtype.itemsize
        self.activation_dtype = compute_dtype if activation_dtype is None and self.widens else activation_dtype
        self.store = store
        self.write_block = write_block
        self.reference_stream = reference_stream
        self.quantizes = quantizes
        self._reference_outputs: list[torch.Tensor] = []
        self.replay_parts = replay_parts
        self._replay: PartReplay | None = None  # this block's, true-sequential
        self.replayed_calls = 0  # block parts answered from a record, over the run
        self.inputs: BlockInputs | None = None  # the cached inputs of the next block to calibrate
        self.timings: dict[str, float] = defaultdict(float)
        self._outputs: list[torch.Tensor] = []
        self._groups: list[list[str]] = []
        self._fetched: set[int] = set()  # blocks read in by this process
        self._ctx: BlockContext | None = None
        self._started = 0.0
        self._held = contextlib.ExitStack()  # what a stage sets up on its block (dense weights, stop hooks)
        self._entered: set[str | int] = set()  # this batch: linears entered, runs_through modules returned

    @property
    def streams(self) -> bool:
        return self.source.streams

    @property
    def blocks(self) -> list[nn.Module]:
        return self.adapter.blocks(self.model)

    def block_prefix(self, index: int) -> str:
        return f"{self.adapter.blocks_path}.{index}"

    def outside_blocks(self) -> list[nn.Module]:
        """The blocks' owner's other children (embeddings, rotary, final norm): what capture runs."""
        owner, attribute = self.adapter.blocks_location(self.model)
        return [child for name, child in owner.named_children() if name != attribute]

    def groups(self, index: int) -> list[list[str]]:
        """The linears of block ``index`` quantized together, in order (one group unless true-sequential;
        none when every linear stays dense)."""
        block = self.blocks[index]
        if self.true_sequential:
            groups = self.adapter.sequential_groups(block)
        else:
            groups = [list(self.adapter.linear_layers(block))]
        if self.quantizes is not None:
            prefix = self.block_prefix(index)
            groups = [[name for name in group if self.quantizes(f"{prefix}.{name}")] for group in groups]
        return [group for group in groups if group]

    def linear_layers(self, index: int) -> dict[str, nn.Module]:
        """``{name relative to block: linear}`` of block ``index`` that this run quantizes, in execution order."""
        block = self.blocks[index]
        return {name: block.get_submodule(name) for group in self.groups(index) for name in group}

    def stages(self, calibrates: bool = True) -> list[Stage]:
        """Every pass of a run: capture, then per block its calibration pass(es) and propagation; or
        one ``quantize`` stage where the method reads no Hessian (round to nearest)."""
        if not calibrates:
            return [Stage("quantize")]
        stages = [Stage("capture")]
        for b in range(len(self.blocks)):
            groups = self.groups(b)
            stages += [Stage("calibrate", b, g, len(groups)) for g in range(len(groups))]
            stages.append(Stage("propagate", b))
        return stages

    # -- the whole loop ----------------------------------------------------------------------------
    def run(self, windows: torch.Tensor, batch_size: int = 1, calibrates: bool = True) -> None:
        """Calibrate on ``windows`` ``[n, seqlen]`` (token ids), ``batch_size`` windows per batch."""
        batches = [windows[i: i + batch_size] for i in range(0, windows.shape[0], batch_size)]
        for stage in self.stages(calibrates):
            self.start(stage)
            if stage.kind != "quantize":
                for j, batch in enumerate(batches):
                    self.step(stage, j, batch)
            self.end(stage)

    # -- one stage at a time -----------------------------------------------------------------------
    def start(self, stage: Stage) -> None:
        self._started = time.perf_counter()
        if stage.kind == "capture":
            self.inputs = BlockInputs(hidden=[], kwargs=[], block_overrides=[])
            for module in self.outside_blocks():
                self.source.fetch(module)
            return
        if stage.kind == "quantize":
            return
        block = self.blocks[stage.block]
        first_pass = stage.kind == "calibrate" and stage.group == 0
        if first_pass or stage.kind == "propagate" and stage.block not in self._fetched:
            self.source.fetch(block)  # (a block whose linears all stay dense has no calibration pass)
            self._fetched.add(stage.block)
        block.to(self.device)
        self._pass_dtype = self.compute_dtype if stage.kind == "calibrate" or self.widens else None
        if stage.kind == "calibrate" and stage.group == 0:  # fixed before any swap: quantized layers no longer count as linears
            self._groups = self.groups(stage.block)
        self._begin_replay(stage, block)  # reads the weights at rest, before the pass's dtype copies
        self._held.enter_context(running_in(block, self._pass_dtype))
        # Layers swapped in so far dequantize once for the whole pass, not once per batch (same numbers).
        self._held.enter_context(dense_weights_held(block, module_device_dtype(block)[1]))
        if stage.kind == "calibrate":
            layers = {name: block.get_submodule(name) for name in self._groups[stage.group]}
            self._ctx = BlockContext(stage.block, len(self.blocks), block, layers, stage.group, stage.num_groups,
                                     prefix=self.block_prefix(stage.block), inputs=self.inputs)
            before = fingerprint(block) if self._replay is not None else None
            self.fire("on_block_start", self._ctx)
            if self._replay is not None:
                self._replay.after_hooks(before, self._ctx.runs_through)
            self._stop_after_last_linear(block)
        else:
            self._outputs = []

    def step(self, stage: Stage, j: int, input_ids: torch.Tensor) -> None:
        """Batch ``j`` of ``stage`` (``input_ids`` ``[b, seqlen]`` is read by the capture stage only)."""
        if stage.kind == "quantize":
            return
        if stage.kind == "capture":
            start = time.perf_counter()
            got = capture_block_inputs(self.model, self.adapter, input_ids, batch_size=input_ids.shape[0],
                                       storage_dtype=self.activation_dtype, device=self.device)
            got.hidden = [self.store(h) for h in got.hidden]
            self.inputs.extend(got)  # shares equal masks / rotary tables across batches
            if self.reference_stream:  # block 0's inputs are the same in both models
                self.inputs.reference = [*(self.inputs.reference or []), *got.hidden]
            self.timings["capture"] += time.perf_counter() - start
            return
        block, cached = self.blocks[stage.block], self.inputs.hidden[j]
        if stage.kind == "calibrate" and self.reference_stream:
            self._reference_step(block, stage, j)
        self._entered.clear()
        try:
            # swapped layers are the oracle: what later blocks see is machine-independent
            with exact_kernels(), self._replaying(j, cached):
                hidden = run_block(block, cached, floating_to(self.inputs.kwargs_for(stage.block, j), self._pass_dtype))
        except _PassDone:  # a calibration pass: every linear of the block has read its input
            return
        if stage.kind == "propagate":
            self._outputs.append(self.store(hidden.to("cpu", dtype=cached.dtype)))

    def _reference_step(self, block: nn.Module, stage: Stage, j: int) -> None:
        """The unquantized block on the full-precision model's inputs of batch ``j``: records what each
        linear of this step reads (``ctx.reference_inputs``) and keeps the output for the next block."""
        if self.inputs.reference is None or len(self.inputs.reference) != len(self.inputs.hidden):
            raise RuntimeError("asymmetric calibration: the full-precision block inputs are missing (a resume point "
                               "written without them?)")
        ctx, recorded = self._ctx, {}

        def record(name: str):
            def hook(module, args):
                recorded[name] = args[0].detach()
            return hook

        handles = [ctx.block.get_submodule(name).register_forward_pre_hook(record(name)) for name in ctx.layers]
        ctx.reference_pass = True
        try:
            with exact_kernels():
                cached = self.inputs.reference[j]
                hidden = run_block(block, cached, floating_to(self.inputs.kwargs_for(stage.block, j), self._pass_dtype))
        finally:
            ctx.reference_pass = False
            for handle in handles:
                handle.remove()
        ctx.reference_inputs = recorded
        self._reference_outputs.append(self.store(hidden.to("cpu", dtype=cached.dtype)))

    def end(self, stage: Stage) -> None:
        if stage.kind == "capture":
            if self.streams:  # not needed again: the writer copies them from the files
                for module in self.outside_blocks():
                    self.source.free(module)
            return
        if stage.kind == "quantize":
            self._quantize_every_block()
            return
        self._held.close()  # also removes the calibration pass's stop hooks
        if self._replay is not None:
            if stage.kind == "calibrate":
                self._replay.end_pass(len(self.inputs.hidden))
            else:
                self.replayed_calls += self._replay.replayed
                self._replay = None
        self.timings["hessian" if stage.kind == "calibrate" else "propagate"] += time.perf_counter() - self._started
        if stage.kind == "calibrate":
            start = time.perf_counter()
            self.fire("on_block_end", self._ctx)
            self._ctx = None
            self.timings["solve"] += time.perf_counter() - start
            return
        if len(self._outputs) != len(self.inputs.hidden):
            raise RuntimeError("propagate stage saw fewer batches than were captured (limit_train_batches < 1?)")
        self.inputs.hidden, self._outputs = self._outputs, []
        if self.reference_stream:
            self.inputs.reference, self._reference_outputs = self._reference_outputs, []
        self._finish_block(stage.block)
        ctx = BlockContext(stage.block, len(self.blocks), self.blocks[stage.block], {},
                           prefix=self.block_prefix(stage.block), stage="propagated", inputs=self.inputs)
        start = time.perf_counter()
        self.fire("on_block_propagated", ctx)  # e.g. BlockCheckpoint's resume point
        self.timings["on_block_propagated"] += time.perf_counter() - start

    def _begin_replay(self, stage: Stage, block: nn.Module) -> None:
        """True-sequential: what this pass may replay and record of the block's finished parts."""
        if not (self.true_sequential and self.replay_parts):
            return
        if stage.kind == "calibrate" and stage.group == 0:
            self._replay = PartReplay(block, self.store)
        if self._replay is None:  # a block with no calibration pass (every linear left dense)
            return
        finished = stage.group if stage.kind == "calibrate" else len(self._groups)
        self._replay.begin_pass(self._pass_dtype, done=[n for g in self._groups[:finished] for n in g],
                                pending=[n for g in self._groups[finished:] for n in g],
                                consume=stage.kind == "propagate")

    def _replaying(self, j: int, cached: torch.Tensor):
        """Batch ``j``'s replays and recordings (a recording holds at most as many bytes as the batch's input)."""
        if self._replay is None:
            return contextlib.nullcontext()
        return self._replay.batch(j, cached.numel() * cached.element_size())

    def _stop_after_last_linear(self, block: nn.Module) -> None:
        """End each calibration pass once every linear of this step has been entered (the hooks, which run
        first, have read the inputs) and every module in ``ctx.runs_through`` has returned: what follows is
        never used (a true-sequential attention-input pass skips the MLP, its MLP-input pass the MLP's output).
        A layer in ``ctx.same_input`` counts as entered with the layer whose input it shares (a true-sequential
        q/k/v pass then runs neither q nor k, its gate/up pass not gate). ``runs_through`` and ``same_input`` are
        read at each check: a hook may change them mid-stage."""
        names, ctx = list(self._ctx.layers), self._ctx

        def done() -> bool:
            return all(name in self._entered or ctx.same_input.get(name) in self._entered for name in names) and \
                all(id(m) in self._entered for m in ctx.runs_through)

        def mark(key):
            def hook(module, *_):
                if self._ctx.reference_pass:
                    return  # the reference stream's output is kept: that run goes to the end
                self._entered.add(key)
                if done():
                    raise _PassDone
            return hook

        for name in names:
            self._held.callback(block.get_submodule(name).register_forward_pre_hook(mark(name)).remove)
        for module in self._ctx.runs_through:
            self._held.callback(module.register_forward_hook(mark(id(module))).remove)

    def _finish_block(self, index: int) -> None:
        """Block ``index`` is final: back to the CPU, or written out and freed when streamed."""
        block = self.blocks[index]
        if self.device.type != "cpu":
            block.to("cpu")
        if self.streams:
            start = time.perf_counter()
            if self.write_block is not None:
                self.write_block(self.block_prefix(index), block)
            self.source.free(block)
            self.timings["save"] += time.perf_counter() - start

    def _quantize_every_block(self) -> None:
        start = time.perf_counter()
        for b, block in enumerate(self.blocks):
            self.source.fetch(block)
            block.to(self.device)
            ctx = BlockContext(b, len(self.blocks), block, self.linear_layers(b),
                               prefix=self.block_prefix(b), stage="quantize")
            self.fire("on_block_start", ctx)
            self.fire("on_block_end", ctx)
            self._finish_block(b)
        self.timings["solve"] += time.perf_counter() - start
