"""Quantization callbacks, usable in any Lightning project.

- ``HessianCapture``: while a block's calibration passes run, accumulates each layer's Hessian.
- ``GPTQCallback``: at ``on_block_end`` solves each layer (GPTQ or round-to-nearest) and swaps in a
  quantized linear. On a module that does not drive blocks itself (any user LightningModule), it
  quantizes the whole model once training ends, calibrating on the first training batches.
"""

from __future__ import annotations

import re
import time
import warnings
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.apply_func import move_data_to_device

from lightning_gptq.models.adapters import is_output_projection, is_linear, linear_in_features, weight_out_in
from lightning_gptq.models.attention_probe import attention_layers, probe_attention
from lightning_gptq.nn import AUTO, check_backend, make_quant_linear, replace_submodule, to_backend
from lightning_gptq.quant import DampingIncreasedWarning, HessianAccumulator, QuantConfig, gptq_quantize, rtn_quantize

from .distributed import all_reduce_sum, world_size
from .hooks import BlockContext, fire_block_hook

CALIBRATION_BACKEND = "torch"  # the oracle layer, while calibration passes still run through the model


class HessianCapture(Callback):
    """Accumulates ``H = 2/n Σ xxᵀ`` for every layer of the current block from its forward inputs.

    ``on_block_start`` attaches a forward hook to each layer in ``ctx.layers`` and puts a
    ``HessianAccumulator`` in ``ctx.hessians[name]``; ``on_block_end`` detaches the hooks. Layers that
    read the very same input tensor (q/k/v, gate/up) share one accumulator: the Hessian is computed
    once per input, not once per layer.

    Args:
        sink_tokens: how many leading positions of each sequence ``sink_weight`` applies to.
        sink_weight: how much each of those positions counts in ``H`` relative to any other token
            (1 = the reference's plain mean). A causal LM may turn the first position into an
            attention sink that every later query reads, so an error in its keys/values reaches the
            whole sequence, while the plain Hessian weighs it as one token in ``seqlen``.
            ``"attention"`` measures it per block instead: during the block's calibration passes the
            attention probabilities are recomputed beside the model's own attention (which runs
            unchanged), and the weight is the attention mass each leading position receives divided
            by the mass an average other key receives (about 1 where there is no sink; hundreds to
            thousands in SmolLM2's later blocks). Applies to ``[batch, seq, in]`` inputs; 2-D inputs
            have no positions and are weighed plainly.
        sink_layers: ``"all"`` linears of the block, or only the ``"attention"`` in-projections (the
            linears inside an attention layer other than its output projection).
        sink_probe_windows: with ``"attention"``, measure the mass on only the first this many
            calibration windows of each pass (every window still feeds ``H``): the probe's
            recomputed softmax roughly doubles a pass on 2048-token windows. ``None``: every window.
    """

    block_hook_order = 0

    def __init__(
        self,
        sink_tokens: int = 1,
        sink_weight: float | Literal["attention"] = 1.0,
        sink_layers: Literal["all", "attention"] = "all",
        sink_probe_windows: int | None = None,
    ) -> None:
        if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
            raise MisconfigurationException(f"HessianCapture.sink_tokens must be an integer >= 0, got {sink_tokens!r}")
        measured = sink_weight == "attention"
        if not measured and (isinstance(sink_weight, bool) or not isinstance(sink_weight, (int, float))
                             or not 0 <= sink_weight < float("inf")):
            raise MisconfigurationException(
                f"HessianCapture.sink_weight must be a finite number >= 0 or 'attention', got {sink_weight!r}"
            )
        if sink_layers not in ("all", "attention"):
            raise MisconfigurationException(f"HessianCapture.sink_layers must be 'all' or 'attention', got {sink_layers!r}")
        if sink_probe_windows is not None and (isinstance(sink_probe_windows, bool)
                                               or not isinstance(sink_probe_windows, int) or sink_probe_windows < 1):
            raise MisconfigurationException(
                f"HessianCapture.sink_probe_windows must be an integer >= 1 or null, got {sink_probe_windows!r}")
        self.sink_probe_windows = sink_probe_windows
        self.sink_tokens = sink_tokens
        self.sink_weight = sink_weight if measured else float(sink_weight)
        self.sink_layers = sink_layers
        self.block_weights: dict[int, float] = {}  # block index -> the weight used (measured or fixed)
        self._handles: dict[str, object] = {}
        self._first: dict[str, HessianAccumulator] = {}  # "attention": leading positions, weighed at block end
        self._mass = [0.0, 0.0]  # "attention": attention received by the leading positions, by all others
        self._probe = ExitStack()
        self._probing = False
        self._probed: dict[int, int] = {}  # id(attention layer) -> windows it measured in this pass
        self._warned = False

    @property
    def measured(self) -> bool:
        return self.sink_weight == "attention"

    def _reweighs(self) -> bool:
        return self.sink_tokens > 0 and (self.measured or self.sink_weight != 1.0)

    def on_block_start(self, trainer, pl_module, ctx: BlockContext) -> None:
        first_inputs: list[tuple[torch.Tensor, str]] = []  # kept alive until every layer was seen once
        pending = set(ctx.layers)
        weighted = self._weighted_layers(ctx) if self._reweighs() else set()
        if self.measured and weighted and not attention_layers(ctx.block):
            if not self._warned:
                rank_zero_warn("HessianCapture(sink_weight='attention'): this model computes attention outside "
                               "transformers' attention interface, so the attention a position receives cannot be "
                               "measured; every position counts 1 (the reference GPTQ Hessian).")
                self._warned = True
            weighted = set()

        def make_hook(name: str):
            def hook(module, args, output):
                x = args[0].detach()
                if self._probing and self.sink_probe_windows and self.probed_windows() >= self.sink_probe_windows:
                    self._probe.close()  # between two attention calls: the rest of the pass runs unprobed
                    self._probing = False
                if name in pending:
                    pending.discard(name)
                    for seen, owner in first_inputs:
                        # Same storage, shape and strides while both tensors are alive: the same input.
                        if (seen.data_ptr(), seen.shape, seen.stride()) == (x.data_ptr(), x.shape, x.stride()):
                            ctx.hessians[name] = ctx.hessians[owner]
                            if owner in self._first:
                                self._first[name] = self._first[owner]
                            self._handles.pop(name).remove()
                            return
                    first_inputs.append((x, name))
                    if not pending:
                        first_inputs.clear()
                if name not in weighted or x.dim() != 3:
                    ctx.hessians[name].add(x)
                elif not self.measured:
                    ctx.hessians[name].add(x, self._token_weights(x, self.sink_weight))
                else:  # the leading positions apart, weighed once the block's attention is measured
                    ctx.hessians[name].add(x, self._token_weights(x, 0.0))
                    self._first[name].add(x[:, : self.sink_tokens])

            return hook

        self._first.clear()
        for name, layer in ctx.layers.items():
            weight = weight_out_in(layer)
            ctx.hessians[name] = HessianAccumulator(linear_in_features(layer), device=weight.device)
            if self.measured and name in weighted:
                self._first[name] = HessianAccumulator(linear_in_features(layer), device=weight.device)
            self._handles[name] = layer.register_forward_hook(make_hook(name))
        if self.measured and weighted:
            self._mass = [0.0, 0.0]
            self._probed = {id(m): 0 for m in attention_layers(ctx.block)}
            self._probe.enter_context(probe_attention(attention_layers(ctx.block), self._record_attention,
                                                      first=self.sink_tokens))
            self._probing = True

    def on_block_end(self, trainer, pl_module, ctx: BlockContext) -> None:
        self._detach()
        if world_size(trainer) > 1:
            self._all_reduce(trainer, ctx)
        if self.measured and self._first and not any(a.nsamples for a in self._first.values()):
            self._first.clear()  # no calibration pass ran (round-to-nearest reads no Hessian)
        if self.measured and self._first:
            weight = self.measured_weight()
            done = set()
            for name, first in self._first.items():
                if id(first) not in done and name in ctx.hessians:
                    done.add(id(first))
                    ctx.hessians[name].hessian.add_(first.hessian.to(ctx.hessians[name].hessian.device), alpha=weight)
            self._first.clear()
            self.block_weights[ctx.block_index] = weight
            rank_zero_info(
                f"{ctx.describe()}: the first {self.sink_tokens} position(s) receive {weight:.1f}x the attention of an "
                f"average other key; Hessian weight {weight:.1f}"
            )
        elif self._reweighs():
            self.block_weights[ctx.block_index] = self.sink_weight

    def _all_reduce(self, trainer, ctx: BlockContext) -> None:
        """Every rank saw its own windows: sum ``Σ xxᵀ`` (fp64) and sample counts over the ranks.
        Dict order is the layers' order, the same on every rank, so the collectives pair up."""
        done = set()
        for accumulator in [*ctx.hessians.values(), *self._first.values()]:
            if id(accumulator) in done:
                continue
            done.add(id(accumulator))
            total = all_reduce_sum(trainer, accumulator.hessian.double() * accumulator.nsamples)
            count = int(all_reduce_sum(trainer, torch.tensor(float(accumulator.nsamples), dtype=torch.float64,
                                                             device=total.device)).item())
            accumulator.hessian = (total / max(count, 1)).to(torch.float32)
            accumulator.nsamples = count
        if self.measured and self._first:
            device = next(iter(self._first.values())).hessian.device
            self._mass = all_reduce_sum(trainer, torch.tensor(self._mass, dtype=torch.float64, device=device)).tolist()

    def state_dict(self) -> dict:
        return {"block_weights": dict(self.block_weights)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.block_weights = {int(k): float(v) for k, v in state_dict.get("block_weights", {}).items()}

    def measured_weight(self) -> float:
        """Attention received per leading position / per other key, over this block's passes so far."""
        first, rest = self._mass
        if first <= 0 or rest <= 0:
            raise RuntimeError("sink_weight='attention' saw no attention in this block's calibration passes.")
        return first / rest

    def _record_attention(self, module, received: torch.Tensor, queries: int, keys: int) -> None:
        """``received`` [batch, heads, s]: attention mass the first ``s`` keys get, summed over ``queries``
        (each query's row sums to 1, so the other ``keys − s`` keys share the rest)."""
        s = received.shape[-1]
        self._probed[id(module)] = self._probed.get(id(module), 0) + received.shape[0]
        first = received.sum().item()
        self._mass[0] += first / s
        self._mass[1] += (received.shape[0] * received.shape[1] * queries - first) / (keys - s)

    def probed_windows(self) -> int:
        """Windows every probed attention layer of the current pass has measured."""
        return min(self._probed.values(), default=0)

    def _weighted_layers(self, ctx: BlockContext) -> set[str]:
        if self.sink_layers == "all":
            return set(ctx.layers)
        paths = {id(m): n for n, m in ctx.block.named_modules()}
        prefixes = [paths[id(m)] + "." if paths[id(m)] else "" for m in attention_layers(ctx.block)]
        if not prefixes and self.measured:
            return set(ctx.layers)  # on_block_start falls back to the plain Hessian, with a warning
        if not prefixes:
            raise MisconfigurationException(
                "HessianCapture.sink_layers='attention': found no attention layer in this block; use sink_layers='all'."
            )
        return {
            name for name in ctx.layers
            if any(name.startswith(p) for p in prefixes) and not is_output_projection(name)
        }

    def _token_weights(self, x: torch.Tensor, weight: float) -> torch.Tensor:
        """``[seq]`` weights for a ``[batch, seq, in]`` input: ``weight`` for the leading positions, else 1."""
        weights = torch.ones(x.shape[1], device=x.device)
        weights[: self.sink_tokens] = weight
        return weights

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._detach()  # a run that stopped mid-block must not leave hooks behind

    def _detach(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self._probe.close()
        self._probing = False


@dataclass
class LayerRecord:
    """What quantizing one layer did: the solver's loss, the damping used, wall seconds."""

    name: str
    block: int
    shape: tuple[int, int]
    method: str
    loss: float
    damp: float
    damp_retries: int
    nsamples: int
    seconds: float


class GPTQCallback(Callback):
    """Quantize each calibrated block's linears and swap in quantized layers.

    Args:
        quant: bits, group size, grid and solver settings.
        method: ``"gptq"`` (needs ``HessianCapture`` among the callbacks) or ``"rtn"`` (round to nearest).
        backend: which quantized-linear backend the layers end up on: ``"auto"`` (default) times every
            backend that supports the layer on this machine, once per layer shape, and takes the
            fastest; or a registered name (``"torch"``, ``"cpu-int4"``, ``"triton"``). While
            calibration goes on, swapped layers are the plain ``torch`` oracle (so the result does
            not depend on the machine's fast kernels); they are converted when training ends.
        calibration_batches: on a user's own module, how many training batches to calibrate on.
        exclude: on a user's own module, regular expressions of layer names to leave in full precision.
        forward_fn: on a user's own module, how to run it on a batch (default ``pl_module(batch)``, or
            ``pl_module(batch[0])`` for tuple/list batches).
    """

    block_hook_order = 10

    def __init__(
        self,
        quant: QuantConfig = QuantConfig(),
        method: Literal["gptq", "rtn"] = "gptq",
        backend: str = AUTO,
        calibration_batches: int = 16,
        exclude: list[str] | None = None,
        forward_fn: Callable[[Any, Any], Any] | None = None,
    ) -> None:
        if method not in ("gptq", "rtn"):
            raise MisconfigurationException(f"GPTQCallback.method must be 'gptq' or 'rtn', got {method!r}")
        if calibration_batches < 1:
            raise MisconfigurationException(f"GPTQCallback.calibration_batches must be >= 1, got {calibration_batches}")
        try:
            check_backend(backend)  # unknown backend -> clear error now, not after calibration
        except ValueError as error:
            raise MisconfigurationException(f"GPTQCallback.backend: {error}") from None
        self.quant = quant
        self.method = method
        self.backend = backend
        self.calibration_batches = calibration_batches
        self.exclude = [re.compile(p) for p in (exclude or [])]
        self.forward_fn = forward_fn
        self.records: list[LayerRecord] = []

    def state_dict(self) -> dict:
        return {"records": [asdict(r) for r in self.records]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.records = [LayerRecord(**{**r, "shape": tuple(r["shape"])}) for r in state_dict.get("records", [])]

    @property
    def needs_calibration(self) -> bool:
        """Whether the driver must run calibration passes (GPTQ needs Hessians; RTN needs nothing)."""
        return self.method == "gptq"

    # -- Lightning hooks ---------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.method == "gptq" and not any(isinstance(cb, HessianCapture) for cb in trainer.callbacks):
            raise MisconfigurationException(
                "GPTQCallback(method='gptq') needs the layer Hessians: add HessianCapture() to the Trainer's callbacks."
            )

    def on_block_end(self, trainer, pl_module, ctx: BlockContext) -> None:
        layers = list(ctx.layers.items())
        bar = _layer_bar(trainer, layers, ctx)
        for name, layer in layers:
            if bar is not None:
                bar.set_postfix_str(name)
            record = self._quantize_layer(ctx, name, layer)
            self.records.append(record)
            _log_layer(trainer, ctx, record)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if world_size(trainer) > 1:
            self._check_ranks_agree(trainer, ctx)

    def _check_ranks_agree(self, trainer, ctx: BlockContext) -> None:
        """Every rank solved the same all-reduced problem; prove they got the same layers."""
        sums = []
        for name in ctx.results:
            q = ctx.results[name]
            sums += [q.codes.to(torch.float64).sum(), q.scales.to(torch.float64).sum(), q.zeros.to(torch.float64).sum()]
        local = torch.stack(sums) if sums else torch.zeros(1, dtype=torch.float64)
        gathered = trainer.strategy.all_gather(local)
        if not bool((gathered == gathered[0]).all()):
            raise RuntimeError(f"{ctx.describe()}: the processes quantized the block differently (different "
                               "hardware or library versions across nodes?); the result would depend on the rank.")

    def on_train_end(self, trainer, pl_module) -> None:
        if not getattr(pl_module, "drives_block_hooks", False):  # GPTQModule fires the block hooks itself
            self.quantize_module(trainer, pl_module)
        # Calibration ran on the oracle layers; now the backend the user asked for (streamed blocks
        # were written out and freed: nothing left to convert).
        if not getattr(pl_module, "streams_blocks", False):
            to_backend(getattr(pl_module, "lm", pl_module), self.backend)

    # -- work --------------------------------------------------------------------------------------
    def _quantize_layer(self, ctx: BlockContext, name: str, layer) -> LayerRecord:
        start = time.perf_counter()
        weight = weight_out_in(layer)
        full_name = ctx.full_name(name)
        nsamples = 0
        if self.method == "gptq":
            accumulator = ctx.hessians.get(name)
            if accumulator is None or accumulator.nsamples == 0:
                raise RuntimeError(f"No calibration inputs reached layer {full_name!r}; cannot run GPTQ on it.")
            nsamples = accumulator.nsamples
            # The last layer reading this Hessian lets the solve consume it (q/k/v share one).
            last = sum(other is accumulator for other in ctx.hessians.values()) == 1
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", DampingIncreasedWarning)
                qweight = gptq_quantize(weight, accumulator.hessian, self.quant, overwrite_hessian=last)
            for w in caught:
                rank_zero_warn(f"{full_name}: {w.message}")
            ctx.hessians.pop(name)  # free in_features² floats once no layer of this step needs them
            if last:
                accumulator.hessian = None  # consumed by the solve
        else:
            qweight = rtn_quantize(weight, self.quant)
        # The oracle ("torch") layer while calibration goes on: later blocks' inputs, hence their
        # Hessians, must not depend on how a fast kernel rounds (a 1-ulp difference in the dense
        # weight compounds over 30 blocks into ±1% layer losses); on_train_end converts.
        replace_submodule(ctx.block, name, make_quant_linear(layer, qweight, CALIBRATION_BACKEND))
        ctx.results[name] = qweight
        return LayerRecord(
            name=full_name, block=ctx.block_index, shape=tuple(weight.shape), method=self.method, loss=qweight.loss,
            damp=qweight.damp, damp_retries=qweight.damp_retries, nsamples=nsamples, seconds=time.perf_counter() - start,
        )

    def quantize_module(self, trainer, pl_module) -> None:
        """Quantize every linear of ``pl_module`` (one block: the whole model), calibrating on the
        first ``calibration_batches`` training batches. Hessians come from the full-precision model."""
        layers = {
            name: m for name, m in pl_module.named_modules()
            if name and is_linear(m) and not any(p.search(name) for p in self.exclude)
        }
        if not layers:
            raise MisconfigurationException("GPTQCallback found no nn.Linear layers to quantize in the LightningModule")
        ctx = BlockContext(block_index=0, num_blocks=1, block=pl_module, layers=layers)
        was_training = pl_module.training
        pl_module.eval()
        fire_block_hook(trainer, pl_module, "on_block_start", ctx)
        seen = 0
        try:
            if self.method == "gptq":
                dataloader = trainer.train_dataloader
                if dataloader is None:
                    raise MisconfigurationException("GPTQCallback needs the training dataloader to calibrate on")
                with torch.no_grad():
                    for batch in dataloader:
                        if seen == self.calibration_batches:
                            break
                        self._forward(pl_module, move_data_to_device(batch, pl_module.device))
                        seen += 1
                # Layers whose forward never runs (nn.MultiheadAttention reads out_proj.weight directly)
                # have no inputs to calibrate on: they stay in full precision.
                idle = [n for n in layers if n in ctx.hessians and ctx.hessians[n].nsamples == 0]
                if idle:
                    rank_zero_warn(f"GPTQCallback: no inputs reached {idle} (their forward is never called); "
                                   "they stay in full precision")
                    for name in idle:
                        del ctx.layers[name], ctx.hessians[name]
        finally:
            fire_block_hook(trainer, pl_module, "on_block_end", ctx)
            pl_module.train(was_training)
        rank_zero_info(f"GPTQCallback: quantized {len(layers)} layers with {self.method} on {seen} calibration batches")

    def _forward(self, pl_module, batch) -> None:
        if self.forward_fn is not None:
            self.forward_fn(pl_module, batch)
        elif isinstance(batch, (tuple, list)):
            pl_module(batch[0])
        else:
            pl_module(batch)

    def summary(self) -> list[dict]:
        return [asdict(r) for r in self.records]


def _layer_bar(trainer, layers, ctx: BlockContext):
    if trainer.progress_bar_callback is None or len(layers) < 2:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=len(layers), desc=f"solve {ctx.describe()}", unit="layer", leave=False, dynamic_ncols=True)


def _log_layer(trainer, ctx: BlockContext, record: LayerRecord) -> None:
    """Per-layer metrics to every logger: one series per layer type, the block index as step."""
    name = record.name[len(ctx.prefix) + 1:] if ctx.prefix else record.name
    metrics = {f"gptq/{name}/loss": record.loss, f"gptq/{name}/damp": record.damp}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=ctx.block_index)
