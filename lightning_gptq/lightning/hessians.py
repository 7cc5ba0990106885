"""``HessianCapture``: the layer Hessians of the block being calibrated, from its forward inputs."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Literal

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gptq.models.adapters import is_output_projection, linear_in_features, weight_out_in
from lightning_gptq.models.attention_probe import attention_layers, probe_attention
from lightning_gptq.models.experts import routed_layers
from lightning_gptq.quant import HessianAccumulator, MismatchAccumulator

from .distributed import all_reduce_sum, world_size
from .hooks import BlockContext, BlockHooks, drives_blocks, run_report

__all__ = ["HessianCapture"]


class HessianCapture(BlockHooks, Callback):
    """Accumulates ``H = 2/n Σ xxᵀ`` for every layer of the current block from its forward inputs.

    ``on_block_start`` attaches a forward pre-hook (the input is all it reads) to each layer in ``ctx.layers`` and puts a
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
            calibration windows of the run (every window still feeds ``H``; under DDP the same
            windows, whichever process holds them). ``None``: every window.
        asymmetric: also accumulate each layer's input mismatch ``D = 2/n Σ (x_fp − x)xᵀ`` against
            the full-precision model's inputs (``ctx.mismatches``), so the solve corrects the error the
            blocks before it left (GPTAQ; ``QuantConfig.gptaq_alpha`` weighs it). The calibration
            driver then carries the full-precision activations too: twice the activation cache and
            one more block forward per window. Token weights apply to ``D`` as to ``H``.
    """

    block_hook_order = 0

    def __init__(
        self,
        sink_tokens: int = 1,
        sink_weight: float | Literal["attention"] = 1.0,
        sink_layers: Literal["all", "attention"] = "all",
        sink_probe_windows: int | None = None,
        asymmetric: bool = False,
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
        if not isinstance(asymmetric, bool):
            raise MisconfigurationException(f"HessianCapture.asymmetric must be true or false, got {asymmetric!r}")
        self.asymmetric = asymmetric
        self.sink_probe_windows = sink_probe_windows
        self.sink_tokens = sink_tokens
        self.sink_weight = sink_weight if measured else float(sink_weight)
        self.sink_layers = sink_layers
        self.block_weights: dict[int, float] = {}  # block index -> the weight used (measured or fixed)
        self._handles: dict[str, object] = {}
        self._first: dict[str, HessianAccumulator] = {}  # "attention": leading positions, weighed at block end
        self._first_mismatch: dict[str, MismatchAccumulator] = {}  # the same for D (asymmetric)
        self._ctx = None
        # "attention": attention mass the leading positions received, and per key count k the mass all
        # others received (summed over windows with k - sink_tokens other keys). Sums of fp32 numbers of
        # similar size, so exact in fp64 and independent of window order and split.
        self._received = 0.0
        self._rest: dict[int, float] = {}
        self._probe_limit: int | None = None  # windows this process probes per pass (DDP: its share of the first N)
        self._probe = ExitStack()
        self._probing = False
        self._probed: dict[int, int] = {}  # id(attention layer) -> windows it measured in this pass
        self._warned = False
        self._warned_routed = False

    @property
    def measured(self) -> bool:
        return self.sink_weight == "attention"

    def _reweighs(self) -> bool:
        return self.sink_tokens > 0 and (self.measured or self.sink_weight != 1.0)

    def on_block_start(self, trainer, pl_module, ctx: BlockContext) -> None:
        if self.asymmetric and (ctx.inputs is None or ctx.inputs.reference is None):
            raise MisconfigurationException(
                "HessianCapture(asymmetric=True) needs the full-precision model's activations, which the calibration "
                "driver keeps only when asked (GPTQModule builds it so when this callback is in the Trainer; "
                "true_sequential must be false).")
        self._ctx = ctx
        # a MoE expert reads the tokens routed to it, and the two streams route differently: its rows cannot be
        # paired with the full-precision ones, so it is solved with the plain Hessian
        paired = set(ctx.layers) - routed_layers(ctx.block) if self.asymmetric else set()
        if self.asymmetric and len(paired) < len(ctx.layers) and not self._warned_routed:
            rank_zero_warn("HessianCapture(asymmetric=True): MoE experts read differently routed tokens in the "
                           "quantized and the full-precision model, so they are solved without the mismatch term "
                           "(plain GPTQ); the other layers of the blocks take it")
            self._warned_routed = True
        first_inputs: list[tuple[torch.Tensor, str]] = []  # kept alive until every layer was seen once
        pending = set(ctx.layers)
        weighted = self._weighted_layers(ctx) if self._reweighs() else set()
        attention = attention_layers(ctx.block)
        if self.measured and weighted and not attention:
            if not self._warned:
                rank_zero_warn("HessianCapture(sink_weight='attention'): this model computes attention outside "
                               "transformers' attention interface, so the attention a position receives cannot be "
                               "measured; every position counts 1 (the reference GPTQ Hessian).")
                self._warned = True
            weighted = set()

        def make_hook(name: str):
            def hook(module, args):
                if ctx.reference_pass:
                    return  # the full-precision stream: read through ctx.reference_inputs below
                if not isinstance(args[0], torch.Tensor):
                    raise MisconfigurationException(
                        f"layer {ctx.full_name(name)!r} was called on a {type(args[0]).__name__}, not a tensor: does the "
                        "calibration forward hand the module its batch as the loader gives it? Give GPTQCallback a "
                        "forward_fn(module, batch), e.g. lambda module, batch: module(batch['input'])")
                x = args[0].detach()
                if self._probing and self._probe_limit is not None and self.probed_windows() >= self._probe_limit:
                    self._probe.close()  # between two attention calls: the rest of the pass runs unprobed
                    self._probing = False
                    for module in attention:  # nor does it need the attention any more
                        ctx.runs_through.remove(module)
                if name in pending:
                    pending.discard(name)
                    for seen, owner in first_inputs:
                        # Same storage, shape and strides while both tensors are alive: the same input.
                        if (seen.data_ptr(), seen.shape, seen.stride()) == (x.data_ptr(), x.shape, x.stride()):
                            ctx.hessians[name] = ctx.hessians[owner]
                            ctx.same_input[name] = owner  # later batches' passes may end at the owner's input
                            if owner in self._first:
                                self._first[name] = self._first[owner]
                            if owner in ctx.mismatches:
                                ctx.mismatches[name] = ctx.mismatches[owner]
                            if owner in self._first_mismatch:
                                self._first_mismatch[name] = self._first_mismatch[owner]
                            self._handles.pop(name).remove()
                            return
                    first_inputs.append((x, name))
                    if not pending:
                        first_inputs.clear()
                reference = ctx.reference_inputs[name] if name in paired else None
                weights = None
                if name in weighted and x.dim() == 3:
                    # measured: the leading positions apart, weighed once the block's attention is known
                    weights = self._token_weights(x, 0.0 if self.measured else self.sink_weight)
                mask = ctx.token_mask
                if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
                    weights = mask.to(x.device) if weights is None else weights * mask.to(x.device)
                ctx.hessians[name].add(x, weights)
                if reference is not None:
                    ctx.mismatches[name].add(x, reference, weights)
                if name in weighted and x.dim() == 3 and self.measured:
                    self._first[name].add(x[:, : self.sink_tokens])
                    if reference is not None:
                        self._first_mismatch[name].add(x[:, : self.sink_tokens], reference[:, : self.sink_tokens])

            return hook

        self._first.clear()
        self._first_mismatch.clear()
        for name, layer in ctx.layers.items():
            weight, width = weight_out_in(layer), linear_in_features(layer)
            # A pass in fp64 (calibration_dtype: float64) keeps its Hessians fp64; any other, fp32 products.
            kind = {"device": weight.device, "dtype": torch.float64 if weight.dtype == torch.float64 else torch.float32}
            ctx.hessians[name] = HessianAccumulator(width, **kind)
            if name in paired:
                ctx.mismatches[name] = MismatchAccumulator(width, **kind)
            if self.measured and name in weighted:
                self._first[name] = HessianAccumulator(width, **kind)
                if name in paired:
                    self._first_mismatch[name] = MismatchAccumulator(width, **kind)
            self._handles[name] = layer.register_forward_pre_hook(make_hook(name))
        if self.measured and weighted:
            self._received, self._rest = 0.0, {}
            # Window i of the run is window i // W of rank i % W (WindowShards): the first N windows
            # of the run, the ones the single-process run probes, are each rank's first few.
            rank, world = (0, 1) if trainer is None else (trainer.global_rank, world_size(trainer))
            self._probe_limit = None if self.sink_probe_windows is None else len(range(rank, self.sink_probe_windows, world))
            self._probed = {id(m): 0 for m in attention}
            ctx.runs_through.extend(attention)  # a true-sequential q/k/v pass would end before it
            self._probe.enter_context(probe_attention(attention, self._record_attention,
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
            for parts, whole in ((self._first, ctx.hessians), (self._first_mismatch, ctx.mismatches)):
                for name, first in parts.items():
                    if id(first) not in done and name in whole:
                        done.add(id(first))
                        whole[name].add_scaled_(first, weight)
            self._first.clear()
            self._first_mismatch.clear()
            self.block_weights[ctx.block_index] = weight
            rank_zero_info(
                f"{ctx.describe()}: the first {self.sink_tokens} position(s) receive {weight:.1f}x the attention of an "
                f"average other key; Hessian weight {weight:.1f}"
            )
        elif self._reweighs() and not self.measured:  # measured, but nothing was: round to nearest
            self.block_weights[ctx.block_index] = self.sink_weight

    def _all_reduce(self, trainer, ctx: BlockContext) -> None:
        """Every rank saw its own windows: sum ``Σ xxᵀ`` (fp64, exact: see ``HessianAccumulator``), the
        sample counts and the attention masses over the ranks. Dict order is the layers' order, the
        same on every rank, and so is which layers share an accumulator (``_share_alike``): the
        collectives pair up."""
        self._share_alike(trainer, ctx)
        done = set()
        for accumulator in [*ctx.hessians.values(), *self._first.values(), *ctx.mismatches.values(),
                            *self._first_mismatch.values()]:
            if id(accumulator) in done:
                continue
            done.add(id(accumulator))
            accumulator.total = all_reduce_sum(trainer, accumulator.total)
            accumulator.nsamples = int(all_reduce_sum(trainer, torch.tensor(
                float(accumulator.nsamples), dtype=torch.float64, device=accumulator.total.device)).item())
        if self.measured and self._first:
            device = next(iter(self._first.values())).total.device
            keys = sorted(self._rest)
            if int(all_reduce_sum(trainer, torch.tensor(float(len(keys)), dtype=torch.float64, device=device)).item()) \
                    != world_size(trainer) * len(keys):
                raise RuntimeError("sink_weight='attention' across processes needs calibration windows of one length")
            masses = torch.tensor([self._received, *(self._rest[k] for k in keys)], dtype=torch.float64, device=device)
            masses = all_reduce_sum(trainer, masses).tolist()
            self._received, self._rest = masses[0], dict(zip(keys, masses[1:]))

    def _share_alike(self, trainer, ctx: BlockContext) -> None:
        """A rank learns that layers read one input (and share an accumulator) from their first input: a MoE
        expert none of this rank's tokens chose keeps its own, empty, accumulators here while another rank
        shares one. Take the union over the ranks (each layer's owner: the first layer it shares with anywhere)."""
        names = list(ctx.hessians)
        if not names:
            return
        first_of = {}
        local = [float(first_of.setdefault(id(ctx.hessians[n]), i)) for i, n in enumerate(names)]
        device = trainer.strategy.root_device  # nccl gathers CUDA tensors only; gloo CPU ones
        owners = trainer.strategy.all_gather(torch.tensor(local, dtype=torch.float64, device=device))
        owners = owners.reshape(-1, len(names)).min(dim=0).values.tolist()
        for name, owner in zip(names, owners):
            owner = names[int(owner)]
            if ctx.hessians[name] is ctx.hessians[owner]:
                continue
            if ctx.hessians[name].nsamples:
                raise RuntimeError(f"{ctx.describe()}: {name} read another input than {owner} here and the same "
                                   "input in another process")
            for accumulators in (ctx.hessians, ctx.mismatches, self._first, self._first_mismatch):
                if name in accumulators and owner in accumulators:
                    accumulators[name] = accumulators[owner]

    def report(self) -> dict:
        return {"hessian": {"sink_tokens": self.sink_tokens, "sink_weight": self.sink_weight,
                            "sink_layers": self.sink_layers, "sink_probe_windows": self.sink_probe_windows,
                            "measured": self.measured, "asymmetric": self.asymmetric,
                            "block_weights": dict(self.block_weights)}}

    def state_dict(self) -> dict:
        return {"block_weights": dict(self.block_weights)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.block_weights = {int(k): float(v) for k, v in state_dict.get("block_weights", {}).items()}

    def measured_weight(self) -> float:
        """Attention received per leading position / per other key, over this block's passes so far."""
        first = self._received / self.sink_tokens
        rest = sum(mass / others for others, mass in sorted(self._rest.items()))
        if first <= 0 or rest <= 0:
            raise RuntimeError("sink_weight='attention' saw no attention in this block's calibration passes.")
        return first / rest

    def _record_attention(self, module, received: torch.Tensor, queries: int, keys: int) -> None:
        """``received`` [batch, heads, s]: attention mass the first ``s`` keys get, summed over ``queries``
        (each query's row sums to 1, so the other ``keys − s`` keys share the rest)."""
        if self._ctx is not None and self._ctx.reference_pass:
            return  # the full-precision stream's attention is not the model being calibrated
        s = received.shape[-1]
        self._probed[id(module)] = self._probed.get(id(module), 0) + received.shape[0]
        for window in received.sum(dim=(1, 2)).tolist():  # one sum per window (fp32, or fp64), whatever the batch
            self._received += window
            self._rest[keys - s] = self._rest.get(keys - s, 0.0) + (received.shape[1] * queries - window)

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

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and "quant" not in run_report(trainer):
            raise MisconfigurationException("HessianCapture accumulates the Hessians that GPTQCallback solves with, and no "
                                            "GPTQCallback is in the Trainer's callbacks: add one, or nothing is quantized")
        if stage != "fit" or drives_blocks(pl_module):
            return
        if self.asymmetric:  # (a user's own module, quantized whole at train end: found here, not after training)
            raise MisconfigurationException(
                "HessianCapture(asymmetric=True) pairs each layer's input with the full-precision model's, which only "
                "a block-by-block calibration keeps (GPTQModule); on your own module use asymmetric=False")
        if (self.sink_layers == "attention" and self._reweighs() and not self.measured
                and not attention_layers(pl_module)):
            raise MisconfigurationException("HessianCapture.sink_layers='attention': found no attention layer in this "
                                            "module; use sink_layers='all'")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._detach()  # a run that stopped mid-block must not leave hooks behind

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._detach()  # (Lightning skips teardown when a hook raised)

    def _detach(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self._probe.close()
        self._probing = False
