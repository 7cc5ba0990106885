"""``fit --model.dry_run=true``: what a run will need, before any heavy work.

Memory is counted from the model, the calibration settings and this process's resident size now;
time is extrapolated from a quick measurement on this machine, on one calibration batch: block 0 whole, and
through the attention probe when the sink rule is measured; each calibration pass rehearsed as the driver
runs it (ending at its group's input; true-sequential: replays and propagation included); each of block 0's
layers solved as the callback solves it (input scaling: every exponent and the rewrite's checks), taken for
every layer of its shape (another shape scaled from the widest by in³ + out·in²); the quantized layers'
dequantization (once a stage; per call when streamed scoring runs them), timed on the widest layer; one
evaluation window, or, when streaming, block 0 per token and a slice of the head, scaled to every window
and block.

    resident weights    parameters + buffers of the loaded model
    activation cache    nsamples × seqlen × hidden × itemsize (twice that while a block's outputs are collected)
    Hessians            in_features² × 8 B (fp64 sums) per distinct layer input of the largest block (q/k/v share one)
    block transient     one batch through one block: MLP intermediate and attention rows, fp32
    solve workspace     the largest solve beyond its Hessian: fp32 weight copy + codes (1.5 weights), half a
                        Hessian of temporaries, one more Hessian where later layers share the input
    scoring             3 slices of fp32 logits (the head runs ``LOGITS_SLICE_BYTES`` of positions at a time: logits,
                        their log-softmax, a temporary); streaming also holds every window's hidden
                        state between blocks (windows × eval_seqlen × hidden × itemsize; on disk when it spills)
    peak                now + the largest of: calibrate, propagate, solve, evaluate
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, field

import torch

from lightning_gptq.data.evaluation import LOGITS_SLICE_BYTES
from lightning_gptq.models import (
    capture_block_inputs,
    estimate_activation_bytes,
    run_block,
)
from lightning_gptq.models.adapters import (
    is_output_projection,
    linear_in_features,
    linear_out_features,
    weight_out_in,
)
from lightning_gptq.models.attention_probe import attention_layers, probe_attention
from lightning_gptq.models.compute_dtype import floating_to, running_in
from lightning_gptq.models.replay import PartReplay
from lightning_gptq.nn import exact_kernels
from lightning_gptq.nn.build import make_quant_linear
from lightning_gptq.nn.quant_linear import dense_weights_held, n_groups_for
from lightning_gptq.quant import HessianAccumulator, QuantConfig, gptq_quantize, rtn_quantize
from lightning_gptq.quant.equalize import equalized_gptq_quantize
from lightning_gptq.quant.rules import LayerRules

from .callbacks import CALIBRATION_BACKEND

__all__ = ["FitPlan", "available_bytes", "measure_plan", "resident_bytes"]

MiB = 2**20


def resident_bytes() -> int:
    """This process's resident set size now (not the peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_bytes() -> int:
    """Memory the machine can still give (``MemAvailable``), or total RAM where that is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class FitPlan:
    """Estimated bytes and seconds of one ``fit`` (see the module docstring for each term)."""

    bytes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    disk: dict[str, int] = field(default_factory=dict)
    available: int = 0
    advice: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return self.bytes["peak"]

    def describe(self) -> str:
        lines = ["dry run: the plan for this fit (nothing was quantized)", "", "memory (MiB):"]
        lines += [f"  {k:<22}{v / MiB:>12,.0f}" for k, v in self.bytes.items()]
        lines += [f"  {'available now':<22}{self.available / MiB:>12,.0f}", "", "disk (MiB):"]
        lines += [f"  {k:<22}{v / MiB:>12,.0f}" for k, v in self.disk.items()]
        lines += ["", "time (s, measured here on a sample and extrapolated):"]
        lines += [f"  {k:<22}{v:>12,.1f}" for k, v in self.seconds.items()]
        if self.peak > self.available:
            lines += ["", (f"WARNING: the estimated peak ({self.peak / MiB:,.0f} MiB) exceeds the memory available "
                           f"({self.available / MiB:,.0f} MiB).")]
        lines += [f"  - {a}" for a in self.advice]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"bytes": self.bytes, "seconds": self.seconds, "disk": self.disk, "available": self.available,
                "advice": self.advice}


def _distinct_inputs(driver, index: int) -> list[int]:
    """in_features of each distinct input of block ``index``'s quantized linears: output projections one each; the
    rest one per module in a true-sequential group (q/k/v read one tensor; a MoE bank's step holds each expert's)."""
    block, quantized = driver.blocks[index], driver.linear_layers(index)
    widths = []
    for group in driver.adapter.sequential_groups(block):
        linears = {n: block.get_submodule(n) for n in group if n in quantized}
        outputs = [n for n in linears if is_output_projection(n)]
        inputs = [n for n in linears if n not in outputs]
        widths += [linear_in_features(linears[n]) for n in outputs]
        readers = {}
        for name in inputs:
            readers.setdefault(name.rpartition(".")[0], linear_in_features(linears[name]))
        widths += list(readers.values())
    return widths


def memory_breakdown(module, calibrates: bool = True) -> dict[str, int]:
    """Bytes of the main things a fit of ``module`` (its driver built) holds, for the dry run and the
    run summary: the model's parameters and buffers as now, this process's activation cache (twice
    that while a block's outputs are collected), one block's Hessians (fp64 sums, the largest block),
    and the scoring logits (3 slices of positions × vocab × 4 B: logits, their log-softmax, a temporary).
    Asymmetric calibration (the driver's reference stream) doubles the activation cache and the Hessians
    (each layer input's mismatch ``D`` is as large as its ``H``)."""
    lm, adapter, dm = module.lm, module.driver.adapter, module.trainer.datamodule
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    share = -(-dm.nsamples // max(1, module.trainer.world_size))
    blocks = adapter.blocks(lm)
    streaming = module.driver.streams
    scores = bool(dm.eval_datasets) and (module.hparams.eval_after or (streaming and module.hparams.eval_before))
    streams = 2 if module.driver.reference_stream else 1
    vocab = int(getattr(config, "vocab_size", 0) or 0) or 1
    return {
        "weights": sum(t.numel() * t.element_size() for t in [*lm.parameters(), *lm.buffers()]),
        "activation cache": streams * estimate_activation_bytes(config, share, dm.seqlen, module.activation_dtype())
        if calibrates else 0,
        "Hessians (one block)": streams * max(sum(w * w * 8 for w in _distinct_inputs(module.driver, b))
                                              for b in range(len(blocks))) if calibrates else 0,
        "scoring logits": 4 * 3 * min(dm.eval_seqlen, max(1, LOGITS_SLICE_BYTES // (4 * vocab))) * vocab if scores
        else 0,
    }


def spills_to_disk(storage: str, cache_bytes: int) -> bool:
    """Whether ``activation_storage`` keeps a cache of ``cache_bytes`` in files: ``disk``, or ``auto``
    when the propagate stage's two copies would take over half the memory available now."""
    return storage == "disk" or (storage == "auto" and 2 * cache_bytes > available_bytes() // 2)


def _hessian_dtype(module) -> torch.dtype:
    """fp64 Hessians and solves for an fp64 calibration stream (``calibration_dtype: float64``), else fp32."""
    return torch.float64 if module.driver.widens and module.driver.compute_dtype == torch.float64 else torch.float32


def _solve_bytes(name: str, layer, itemsize: int = 4) -> int:
    """Memory a layer's solve adds beyond its Hessian: the sweep copy of the weight and the codes
    (1.5 fp32 weights), half a Hessian of factorisation temporaries, and a copy of a Hessian that later
    layers still read (an output projection's input is its own, so its solve consumes it); ``itemsize``
    8 for an fp64 solve."""
    i, o = linear_in_features(layer), linear_out_features(layer)
    return int(itemsize * (1.5 * i * o + (0.5 if is_output_projection(name) else 1.5) * i * i))


def _packed_bytes(layer, quant: QuantConfig, scale_bytes: int) -> int:
    out_features, in_features = linear_out_features(layer), linear_in_features(layer)
    groups = n_groups_for(in_features, quant.group_size)
    return (in_features * out_features * quant.bits // 8 + groups * out_features * scale_bytes
            + groups * out_features * quant.bits // 8 + in_features * 4)


@torch.no_grad()
def measure_plan(module, report: dict, *, calibrates: bool) -> FitPlan:
    """Count and time the fit ``module`` (a set-up ``GPTQModule``, its ``driver`` built) is about to run;
    ``report``: the callbacks' merged ``report()`` (quantization settings, sink rule, resume)."""
    lm, adapter, dm = module.lm, module.driver.adapter, module.trainer.datamodule
    quant, resume = report["quant"], bool(report.get("resume_every_n_blocks"))
    blocks = adapter.blocks(lm)
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    itemsize = next(lm.parameters()).element_size()
    act_dtype = module.activation_dtype()
    world = max(1, module.trainer.world_size)
    nsamples = -(-dm.nsamples // world)  # this process's share
    batches = -(-nsamples // dm.batch_size)
    seqlen, batch = dm.seqlen, dm.batch_size
    hidden = int(config.hidden_size)
    intermediate = int(getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", 1))
    plan = FitPlan(available=available_bytes())

    layers = [m for b in blocks for m in adapter.linear_layers(b).values()]
    streaming = module.driver.streams
    outside = module.driver.outside_blocks() if streaming else []
    if streaming:  # only what streaming holds at once: the embedding stage (capture), then one block
        for part in [*outside, blocks[0]]:
            module.source.fetch(part)
    try:
        plan.seconds = _time_stages(module, blocks, adapter, quant, nsamples, batches, calibrates, layers,
                                    report.get("hessian"), _solve_kinds(report))
        now = resident_bytes()  # after the timing ran the model: memory-mapped weights are paged in
    finally:
        if streaming:
            for part in [*outside, blocks[0]]:
                module.source.free(part)
    parts = memory_breakdown(module, calibrates)
    weights = model_bytes = parts["weights"]
    cache, hessians, scoring = parts["activation cache"], parts["Hessians (one block)"], parts["scoring logits"]
    wide = _hessian_dtype(module).itemsize  # 8: an fp64 stream's passes and solves
    transient = wide * batch * seqlen * (3 * intermediate + 8 * hidden + heads * min(seqlen, 256))
    solve_ws = max((_solve_bytes(name, m, wide) for b in range(len(blocks))
                    for name, m in module.driver.linear_layers(b).items()), default=0)
    scores = bool(scoring)
    # block-by-block scoring (streaming) holds every window's hidden state between blocks
    score_hidden = _eval_windows(module) * dm.eval_seqlen * hidden * itemsize if (scores and streaming) else 0
    if scores and streaming and not getattr(config, "tie_word_embeddings", False):  # an untied head is read too
        scoring += sum(p.numel() * itemsize for m in adapter.final_modules(lm) for p in m.parameters())
    if streaming:
        block_bytes = max(sum(t.numel() * t.element_size() for t in b.parameters()) for b in blocks)
        outside_bytes = sum(t.numel() * t.element_size() for m in outside for t in m.parameters())
        # `now` holds block 0 and the embedding stage; the largest block replaces block 0 later
        now += block_bytes - sum(t.numel() * t.element_size() for t in blocks[0].parameters())
        weights = block_bytes + outside_bytes
    plan.bytes = {
        "resident now": now, "of which weights": weights, "activation cache": cache, "Hessians (one block)": hessians,
        "block transient": transient, "solve workspace": solve_ws, "scoring logits": scoring,
    }
    hidden_spilled = bool(score_hidden) and spills_to_disk(module.hparams.activation_storage, score_hidden)
    if score_hidden:
        plan.bytes["scoring hidden states"] = score_hidden
    spilled = bool(cache) and spills_to_disk(module.hparams.activation_storage, cache)
    held = 0 if spilled else cache  # a spilled cache is file pages the kernel evicts when memory is short
    stages = {"calibrate": held + hessians + transient, "propagate": 2 * held + transient,
              "solve": held + hessians + solve_ws, "evaluate": scoring + transient + (0 if hidden_spilled else score_hidden)}
    plan.bytes["peak"] = now + max(stages.values())

    scale_bytes = torch.empty((), dtype=getattr(torch, module.hparams.save_dtype or "float32")).element_size() \
        if module.hparams.save_dtype else itemsize
    rules = LayerRules(report.get("dynamic"))  # per-layer bits and groups; `-:` layers stay dense
    configs = [(m, rules.config_for(f"{module.driver.block_prefix(b)}.{name}", quant))
               for b, block in enumerate(blocks) for name, m in adapter.linear_layers(block).items()]
    quantized = sum(_packed_bytes(m, config, scale_bytes) for m, config in configs if config is not None)
    dense_rest = model_bytes - sum(weight_out_in(m).numel() * itemsize for m, config in configs if config is not None)
    plan.disk = {"quantized model": quantized + dense_rest * scale_bytes // itemsize}
    if resume and calibrates and not streaming:
        plan.disk["resume checkpoint"] = cache + quantized  # at the last block; written next to the old one
        plan.disk["peak"] = plan.disk["quantized model"] + 2 * plan.disk["resume checkpoint"]

    if hidden_spilled:
        plan.disk["scoring files"] = score_hidden
    if spilled:
        plan.disk["activation files"] = 2 * cache  # while propagating: this block's inputs and outputs
        if "peak" in plan.disk:
            plan.disk["peak"] += 2 * cache
    _advise(plan, module, dm, held, act_dtype)
    return plan


def _solve_kinds(report: dict):
    """How ``GPTQCallback`` solves a layer, by full name: None where a ``-:`` rule keeps it dense, else the
    input-scaling exponents it tries besides plain GPTQ (``equalize``; ``()``: a plain solve)."""
    rules, quant = LayerRules(report.get("dynamic")), report["quant"]
    alphas, pattern = tuple(report.get("equalize") or ()), report.get("equalize_layers")
    scaled = None if pattern is None else re.compile(pattern)

    def kind(full_name: str) -> tuple[float, ...] | None:
        if rules.config_for(full_name, quant) is None:
            return None
        return alphas if alphas and (scaled is None or scaled.match(full_name)) else ()
    return kind


def _time_stages(module, blocks, adapter, quant, nsamples, batches, calibrates, layers, hessian,
                 kinds=lambda full_name: ()) -> dict[str, float]:
    lm, dm = module.lm, module.trainer.datamodule
    ids = dm.calibration_windows()[: dm.batch_size]

    def capture():
        return capture_block_inputs(lm, adapter, ids, batch_size=ids.shape[0],
                                    storage_dtype=module.hparams.activation_dtype)

    inputs = capture()  # the first call also pays one-time costs (allocation, lazy set-up): not timed
    t_capture = _best_of(2, capture)
    block = blocks[0]
    compute = module.driver.compute_dtype  # the passes' dtype (calibration_dtype); the cast is timed too
    propagates_in = compute if module.driver.widens else None  # a narrower dtype feeds the Hessians only
    hidden = inputs.hidden[0]

    def run(dtype=compute):
        with running_in(block, dtype):
            return run_block(block, hidden, floating_to(inputs.kwargs_for(0, 0), dtype))

    run(propagates_in)  # warm-up (first calls allocate, pick kernels)
    t_block = _best_of(3, lambda: run(propagates_in))
    seconds = {"capture": t_capture * batches}
    extra_per_call = 0.0  # round to nearest: propagation and scoring run the same layers
    if calibrates:
        accumulators, handles = {}, []
        own = module.driver.linear_layers(0) or adapter.linear_layers(block)  # (block 0 wholly dense: as if not)
        for name, layer in own.items():
            accumulators[name] = HessianAccumulator(linear_in_features(layer), dtype=_hessian_dtype(module))
            handles.append(layer.register_forward_hook(lambda m, a, o, n=name: accumulators[n].add(a[0])))
        probed = hessian is not None and hessian["measured"] and bool(attention_layers(block))
        groups = module.driver.groups(0)
        # The whole block with hooks: the baseline the probe's extra is read against, and block 0's Hessians when
        # it is wholly dense (no pass to rehearse); otherwise the rehearsed passes time calibration and fill them.
        t_calibrate = _best_of(3, run) if probed or not groups else 0.0
        probed_batches = 0
        if probed:  # the measured sink rule recomputes each attention layer's first-key mass
            windows = min(nsamples, hessian["sink_probe_windows"] or nsamples)
            probed_batches = min(batches, -(-windows // dm.batch_size))
            with probe_attention(attention_layers(block), lambda *args: None, first=hessian["sink_tokens"]):
                t_probed = _best_of(3, run)
            t_probed = max(t_probed, t_calibrate)  # (a busy machine can time the bigger pass faster: never below 0 s)
        for handle in handles:
            handle.remove()
        calibrated = sum(bool(module.driver.groups(b)) for b in range(len(blocks)))  # none for a wholly dense block
        if module.driver.true_sequential and groups:
            # each pass ends at its group and replays what earlier ones recorded: rehearsed on block 0
            rehearsals = [_rehearse_passes(module.driver, block, groups, run, accumulators,
                                           hidden.numel() * hidden.element_size(), compute) for _ in range(2)]
            t_passes = [min(r[0][g] for r in rehearsals) for g in range(len(groups))]
            t_propagate = min(r[1] for r in rehearsals)
            per_block = sum(t_passes) * batches
            if probed:  # a probed window's first pass runs on through the attention (and the probe) in each probing pass
                probing = 1 if hessian.get("sink_layers") == "attention" else len(groups)
                per_block += probing * probed_batches * (max(t_passes[1:2] or [t_passes[0]]) + t_probed - t_calibrate)
            seconds["calibrate"] = per_block * calibrated
            seconds["propagate"] = (t_propagate * calibrated + t_block * (len(blocks) - calibrated)) * batches
        else:  # one pass, ending as the driver ends it (before the last linear's product); none: block 0 is dense
            t_pass = _best_of(3, lambda: _rehearse_passes(module.driver, block, groups, run, accumulators, 0, compute,
                                                           replays=False, propagation=False)) / len(groups) \
                if groups else t_calibrate
            per_pass = t_pass * batches + ((t_probed - t_calibrate) * probed_batches if probed else 0.0)
            seconds["calibrate"] = per_pass * sum(len(module.driver.groups(b)) for b in range(len(blocks)))
            seconds["propagate"] = t_block * batches * len(blocks)
        name = max(own, key=lambda n: linear_in_features(own[n]) * linear_out_features(own[n]))
        layer = own[name]
        weight = weight_out_in(layer).detach()
        # A stage holds its block's quantized layers dequantized (dense_weights_held): each costs one
        # dequantization per stage, not per batch. Propagation dequantizes every layer; a true-sequential
        # pass, the groups before it. Timed on the widest layer and scaled by weight size.
        quantized = make_quant_linear(layer, rtn_quantize(weight, quant), CALIBRATION_BACKEND)  # codes cost alike
        t_dequantize = _best_of(2, lambda: _hold_dense(quantized))
        per_element = t_dequantize / weight.numel()
        all_elements = sum(weight_out_in(m).numel() for m in layers)
        seconds["propagate"] += per_element * all_elements
        if module.driver.true_sequential and groups:
            sizes = [sum(weight_out_in(block.get_submodule(n)).numel() for n in g) for g in groups]
            held = sum(sum(sizes[:g]) for g in range(len(groups)))  # block 0's elements held over its passes
            seconds["calibrate"] += per_element * held * all_elements / sum(sizes)
        if module.driver.streams:  # block-by-block scoring calls the layers' kernels, dequantizing per call
            x = torch.randn(dm.batch_size, dm.seqlen, linear_in_features(layer), dtype=weight.dtype)
            extra = max(0.0, _best_of(2, lambda: quantized(x)) - _best_of(2, lambda: layer(x)))
            extra_per_call = extra * all_elements / weight.numel()  # every layer once

        seconds["solve"] = _solve_seconds(module.driver, blocks, adapter, own, accumulators, quant, kinds,
                                          checks=lambda: run(propagates_in))
    else:
        seconds["quantize (RTN)"] = 0.0
    if module.driver.streams:
        if dm.eval_datasets and (module.hparams.eval_after or module.hparams.eval_before):
            seconds["evaluate"] = _streamed_scoring_seconds(module, blocks, t_block, extra_per_call)
    elif module.hparams.eval_after and dm.eval_datasets:
        windows = 0
        for name in dm.eval_datasets:
            n = dm.eval_tokens(name, module.tokenizer).numel() // dm.eval_seqlen
            windows += min(n, dm.eval_max_windows or n)
        sample = dm.eval_tokens(dm.eval_datasets[0], module.tokenizer).reshape(-1)[: dm.eval_seqlen].reshape(1, -1)
        with exact_kernels():
            start = time.perf_counter()
            lm(input_ids=sample.to(next(lm.parameters()).device), use_cache=False)
            seconds["evaluate"] = (time.perf_counter() - start) * windows
    else:  # still run the whole model once, so every weight is paged in before memory is read
        lm(input_ids=ids[:, :16].to(next(lm.parameters()).device), use_cache=False)
    seconds["total"] = sum(seconds.values())
    return seconds


def _eval_windows(module) -> int:
    """The most windows one eval set scores (block-by-block scoring holds them all between blocks)."""
    dm = module.trainer.datamodule
    return max(dm.eval_windows(name, module.tokenizer)[0].shape[0] for name in dm.eval_datasets)


def _streamed_scoring_seconds(module, blocks, t_block: float, extra_per_call: float) -> float:
    """Block-by-block scoring: every block over every window (a full-precision block's measured time
    per token, plus the quantized layers' per-call dequantization when scoring after quantizing),
    then the head over every window (timed on a slice of it). Counts eval_before and eval_after."""
    dm, lm = module.trainer.datamodule, module.lm
    windows = sum(dm.eval_windows(name, module.tokenizer)[0].shape[0] for name in dm.eval_datasets)
    per_window = t_block * len(blocks) * dm.eval_seqlen / (dm.batch_size * dm.seqlen)
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    hidden, vocab = int(config.hidden_size), int(getattr(config, "vocab_size", 0) or 0)
    rows = min(vocab, 8192)
    if rows:
        x, w = torch.randn(dm.eval_seqlen, hidden), torch.randn(rows, hidden)
        per_window += _best_of(2, lambda: torch.nn.functional.linear(x, w)) * vocab / rows
    seconds = 0.0
    if module.hparams.eval_before:
        seconds += windows * per_window
    if module.hparams.eval_after:
        seconds += windows * (per_window + extra_per_call)
    return seconds


class _PassEnd(Exception):
    pass


def _shared_inputs(block, names: list[str], run) -> dict[str, str]:
    """Which of ``names`` read the very tensor an earlier one reads (name -> that one), learned on one run of the
    block as ``HessianCapture`` learns it on a pass's first batch."""
    seen, shared = [], {}

    def read(name):
        def hook(module, args):
            first = next((reader for x, reader in seen if x is args[0]), None)
            if first is None:
                seen.append((args[0], name))
            else:
                shared[name] = first
            if len(seen) + len(shared) == len(names):
                raise _PassEnd
        return hook

    handles = [block.get_submodule(name).register_forward_pre_hook(read(name)) for name in names]
    try:
        run()
    except _PassEnd:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return shared


def _rehearse_passes(driver, block, groups: list[list[str]], run, accumulators: dict, limit_bytes: int,
                     dtype, replays: bool = True, propagation: bool = True) -> tuple[list[float], float]:
    """Seconds of block ``block``'s calibration passes on one batch, one per group, each ending once its group has
    read its input (Hessian hooks on the group; layers reading one tensor share one accumulator in ``accumulators``,
    one product) and, with ``replays``
    (true-sequential), replaying what the passes before it recorded, as the driver runs them; and of its
    propagation (``propagation=False``: 0.0, not run). The layers stay dense: a quantized one costs what its
    dense weight does while the driver holds it dequantized."""
    replay = PartReplay(block) if driver.replay_parts and replays else None
    # readers of one tensor share one accumulator, and after its first batch a pass ends at the first of them (the
    # driver's ``ctx.same_input``)
    same_input = _shared_inputs(block, [n for group in groups for n in group], run)
    seconds = []
    for g in range(len(groups) + (1 if propagation else 0)):
        group = groups[g] if g < len(groups) else []
        if replay is not None:
            replay.begin_pass(dtype, done=[n for gr in groups[:g] for n in gr],
                              pending=[n for gr in groups[g:] for n in gr], consume=not group)
        for name in group:  # one accumulator for a shared input's readers, whether or not the pass reaches them
            if same_input.get(name) in group:
                accumulators[name] = accumulators[same_input[name]]
        entered: set[str] = set()

        def read(name):
            def hook(module, args):
                if same_input.get(name) not in group:  # (else its accumulator is the first reader's, fed there)
                    accumulators[name].add(args[0])
                entered.add(name)
                if all(n in entered or same_input.get(n) in entered for n in group):
                    raise _PassEnd
            return hook

        handles = [block.get_submodule(name).register_forward_pre_hook(read(name)) for name in group]
        start = time.perf_counter()
        try:
            with replay.batch(0, limit_bytes) if replay is not None else contextlib.nullcontext():
                run()
        except _PassEnd:
            pass
        seconds.append(time.perf_counter() - start)
        for handle in handles:
            handle.remove()
        if replay is not None:
            replay.end_pass(1)
    return (seconds[:-1], seconds[-1]) if propagation else (seconds, 0.0)


def _solve_seconds(driver, blocks, adapter, own: dict, accumulators: dict, quant: QuantConfig, kinds,
                   checks) -> float:
    """Every layer's solve as ``GPTQCallback`` runs it (``kinds``: see ``_solve_kinds``): block 0's layers
    (``own``) each timed once on their Hessians, an input-scaled one at every exponent with its output errors;
    a layer of another block taken as block 0's of the same shape and kind, or else scaled from the widest by
    the in³ + out·in² cost of its Cholesky/inverse and sweep. A block with input-scaled layers also runs
    itself about three times on one batch (``checks``) to plan and check the rewrite."""
    def shape(m):
        return linear_in_features(m), linear_out_features(m)

    def cost(i, o):  # the solve: an in² Cholesky/inverse and an out × in² sweep
        return i ** 3 + o * i * i

    def solve(weight, h, alphas):
        if alphas:
            equalized_gptq_quantize([weight], h, [quant], list(alphas))
        else:
            gptq_quantize(weight.clone(), h, quant)

    timed = {}
    for name, layer in own.items():
        alphas = kinds(f"{driver.block_prefix(0)}.{name}")
        key = shape(layer), alphas or ()
        if key not in timed and accumulators[name].nsamples:  # (a MoE expert the batch missed: another is timed)
            weight, h = weight_out_in(layer).detach(), accumulators[name].hessian
            timed[key] = _best_of(1, lambda: solve(weight, h, alphas))
    if not timed:
        return 0.0  # no layer of block 0 read a token
    t_checks = 3 * _best_of(1, checks) if any(k[1] for k in timed) else 0.0
    per_solve = {k[0]: t / (1 + len(k[1])) for k, t in timed.items()}  # one plain solve, by shape
    widest = max(per_solve, key=lambda k: k[0] * k[1])
    total = 0.0
    for b, block in enumerate(blocks):
        scaled = False
        for name, layer in adapter.linear_layers(block).items():
            alphas = kinds(f"{driver.block_prefix(b)}.{name}")
            if alphas is None:
                continue
            scaled = scaled or bool(alphas)
            seconds = timed.get((shape(layer), alphas))
            if seconds is None:  # another shape or kind: plain solves scaled by cost, once per exponent and plain
                seconds = per_solve[widest] * cost(*shape(layer)) / cost(*widest) * (1 + len(alphas))
            total += seconds
        total += t_checks if scaled else 0.0
    return total


def _hold_dense(layer) -> None:
    """Dequantize ``layer``'s weight as a driver stage does, once, and release it."""
    with dense_weights_held(layer):
        pass


def _best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _advise(plan: FitPlan, module, dm, cache: int, act_dtype: str) -> None:
    if plan.peak <= plan.available:
        return
    over = plan.peak - plan.available
    if cache and str(act_dtype) == "float32":
        plan.advice.append(f"--model.activation_dtype=bfloat16 halves the activation cache ({cache / MiB:,.0f} MiB; "
                           f"the propagate stage holds it twice)")
    if cache:
        plan.advice.append("--model.activation_storage=disk keeps the activation cache in files the kernel pages "
                           f"out when memory runs short (it needs {2 * cache / MiB:,.0f} MiB of disk)")
        need = max(1, int(dm.nsamples * max(0.0, 1 - over / (2 * cache))))
        plan.advice.append(f"--data.nsamples={need} (from {dm.nsamples}) shrinks the cache enough on its own")
    if dm.batch_size > 1:
        plan.advice.append("--data.batch_size=1 shrinks the per-batch transient memory")
    plan.advice.append("--trainer.strategy=gptq_ddp with more processes splits the windows (and the cache) among them")
