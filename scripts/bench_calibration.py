"""The main job side by side: a reference-style GPTQ driver against ``fit`` with a shipped config.

Both sides run in their own child process (so each one's peak RSS is its own), on the same model,
the same calibration windows and the same evaluation windows, one after the other:

- ``reference``: the 2022 research script's loop, written plainly: catch block 0's inputs, then per
  block hook every linear to accumulate its Hessian (its fp32 running mean, ``ReferenceHessian``)
  while the block runs on each window, solve each
  linear with our solver (equal to the reference's on layer problems), write the dequantized weight
  back into the dense ``nn.Linear`` (fake quantization) and run the block again for the next inputs.
  Scored window by window through the whole dense model, from each window's whole logits as the reference's
  evaluation does (``perplexity`` with ``model_window_nll`` swapped for ``window_nll`` of the whole logits; the
  numbers are the same, the memory is not).
- ``fit``: ``python -m lightning_gptq fit --config <config>`` in-process, with the config's sink rule
  and probe, eval_after on the same windows, no latency, no save (the reference saves nothing).

Also measured here: this CPU's fp32 (and bf16) matmul rate, and the FLOP floor of calibration at it
(two passes of every block over every token plus the Hessians' x·xᵀ products).

    python scripts/bench_calibration.py                         # 8 x 512 windows, 4 eval windows (minutes)
    python scripts/bench_calibration.py --full                  # 128 x 2048, all 147 WikiText-2 windows
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

SHARED = Path(__file__).resolve().parents[2] / "shared"


def matmul_rate(dtype_name: str, seconds: float = 1.0) -> float:
    """FLOP/s of a [2048, 576] x [576, 1536] matmul in ``dtype_name`` on this machine (best of a few)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(2048, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    a @ b
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048 * 576 * 1536 / best


def calibration_flops(lm, tokens: int, seqlen: int) -> float:
    """Two passes of every block over ``tokens`` tokens (its linears, and causal attention: about
    ``2 · seqlen · hidden`` per token), plus ``2 · in²`` per token for each distinct layer input's x·xᵀ."""
    from lightning_gptq.driver import pinned_adapter
    from lightning_gptq.lightning.plan import _distinct_inputs

    adapter = pinned_adapter(lm)
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    hidden = int(config.hidden_size)
    blocks = adapter.blocks(lm)
    every_linear = SimpleNamespace(blocks=blocks, adapter=adapter, linear_layers=lambda i: adapter.linear_layers(blocks[i]))
    total = 0.0
    for index, block in enumerate(blocks):
        weights = sum(m.weight.numel() for m in adapter.linear_layers(block).values())
        forward = 2 * weights + 2 * seqlen * hidden
        hessian = 2 * sum(w * w for w in _distinct_inputs(every_linear, index))
        total += tokens * (2 * forward + hessian)
    return total


# -- the two sides, each in a child process ----------------------------------------------------------
class ReferenceHessian:
    """The 2022 script's ``add_batch``: an fp32 running mean ``H = 2/n · Σ xxᵀ``, one full fp32
    product per call (what the reference side times; ours sums per-window products in fp64)."""

    def __init__(self, columns: int) -> None:
        import torch

        self.hessian, self.nsamples = torch.zeros(columns, columns), 0

    def add(self, x) -> None:
        batch = x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        self.hessian *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        x = x * (2 / self.nsamples) ** 0.5
        self.hessian.addmm_(x.T, x)



def run_reference(args) -> dict:
    import torch
    from torch import nn

    from lightning_gptq import QuantConfig, gptq_quantize
    from lightning_gptq.data import evaluation, perplexity
    from lightning_gptq.driver import pinned_adapter
    from lightning_gptq.lightning import CalibrationDataModule
    from lightning_gptq.models import load_causal_lm

    def whole_logits_nll(model, input_ids, *, bos_token_id=None):  # the reference's scoring: the window's logits
        logits = model(input_ids=evaluation.with_bos(input_ids, bos_token_id), use_cache=False).logits
        return evaluation.window_nll(logits, input_ids, bos=bos_token_id is not None)

    evaluation.model_window_nll = whole_logits_nll
    times = {}
    start = time.perf_counter()
    lm, tokenizer = load_causal_lm(args.model, gguf_file=args.gguf_file or None)
    times["load"] = time.perf_counter() - start
    dm = CalibrationDataModule(calibration=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen, seed=0,
                               eval_paths={"wikitext2": args.wikitext}, eval_seqlen=2048,
                               eval_max_windows=args.eval_windows)
    windows = dm.calibration_windows(tokenizer)
    config = QuantConfig(**json.loads(args.quant))
    adapter = pinned_adapter(lm)
    blocks = adapter.blocks(lm)
    torch.set_grad_enabled(False)
    start = time.perf_counter()

    class Catcher(nn.Module):  # the reference's way to get block 0's inputs
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, hidden, *a, **kwargs):
            caught.append((hidden, kwargs))
            raise ValueError

    caught = []
    blocks[0] = Catcher(blocks[0])
    for w in windows:
        try:
            lm(w[None], use_cache=False)
        except ValueError:
            pass
    blocks[0] = blocks[0].block
    hidden = [h for h, _ in caught]
    kwargs = [{k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value")} for _, kw in caught]
    times["capture"] = time.perf_counter() - start
    times["hessian"] = times["solve"] = times["propagate"] = 0.0
    for block in blocks:
        start = time.perf_counter()
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        accs = {n: ReferenceHessian(m.in_features) for n, m in linears.items()}
        hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: accs[n].add(inp[0].data)) for n, m in linears.items()]
        for h, kw in zip(hidden, kwargs):
            block(h, **kw)
        for hook in hooks:
            hook.remove()
        times["hessian"] += time.perf_counter() - start
        start = time.perf_counter()
        for n, m in linears.items():
            m.weight.data = gptq_quantize(m.weight.data, accs[n].hessian, config).dequantize().to(m.weight.dtype)
        del accs
        times["solve"] += time.perf_counter() - start
        start = time.perf_counter()
        outs = []
        for h, kw in zip(hidden, kwargs):
            out = block(h, **kw)
            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
        hidden = outs
        times["propagate"] += time.perf_counter() - start
    times["calibration"] = times["capture"] + times["hessian"] + times["solve"] + times["propagate"]
    del hidden, outs, caught
    start = time.perf_counter()
    result = perplexity(lm, dm.eval_tokens("wikitext2", tokenizer), seqlen=2048, dataset="wikitext2",
                        max_windows=args.eval_windows, progress=False)
    times["scoring"] = time.perf_counter() - start
    return {"times": times, "ppl": result.ppl, "ppl_text": str(result),
            "flops": calibration_flops(lm, windows.numel(), args.seqlen)}


def run_fit(args, dry_run: bool = False) -> dict:
    from lightning_gptq.cli import main

    out = Path(args.scratch) / ("plan" if dry_run else "fit")
    start = time.perf_counter()
    main(["fit", f"--model.dry_run={str(dry_run).lower()}", f"--config={args.config}", f"--model.model={args.model}", f"--model.gguf_file={args.gguf_file or 'null'}",
          f"--data.calibration={args.calibration}", f"--data.nsamples={args.nsamples}", f"--data.seqlen={args.seqlen}",
          "--data.eval_datasets=[wikitext2]", f"--data.eval_paths={{wikitext2: {args.wikitext}}}",
          f"--data.eval_max_windows={'null' if args.eval_windows is None else args.eval_windows}",
          "--model.latency=false", "--model.save_quantized=false", f"--model.output_dir={out}",
          f"--trainer.default_root_dir={Path(args.scratch) / 'root'}", "--trainer.logger=false",
          "--trainer.enable_progress_bar=false", *args.fit_args])
    wall = time.perf_counter() - start
    if dry_run:
        plan = json.loads((out / "plan.json").read_text())
        return {"times": {"wall": wall}, "ppl": None, "plan": plan}
    summary = json.loads((out / "summary.json").read_text())
    times = {k: v for k, v in summary["timings_s"].items()}
    times["calibration"] = times.get("total_fit", 0.0)  # fit start to train end, before eval_after and saving
    times["scoring"] = times.get("eval_after", 0.0)
    times["wall"] = wall
    after = summary["results"]["after"]["wikitext2"]
    return {"times": times, "ppl": after["ppl"], "ppl_text": after["text"]}


def child(args) -> None:
    result = run_reference(args) if args.side == "reference" else run_fit(args, dry_run=args.side == "plan")
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.result).write_text(json.dumps(result))


# -- the parent: run both, print the table -------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models"), help="model folder, hub id or .gguf")
    parser.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf", help="GGUF file in --model ('' for none)")
    parser.add_argument("--config", default="configs/smollm2-135m.yaml", help="the config fit runs with")
    parser.add_argument("--calibration", default=str(SHARED / "data" / "calibration" / "wikipedia-vital-leads.txt"))
    parser.add_argument("--wikitext", default=str(SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"))
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=4, help="first WikiText-2 windows of 2048 to score")
    parser.add_argument("--full", action="store_true", help="128 x 2048 calibration windows, every eval window")
    parser.add_argument("--quant", default='{"bits": 4, "group_size": 128, "sym": false, "act_order": true, '
                        '"damp": 0.01, "block_size": 128}', help="the reference side's QuantConfig (JSON)")
    parser.add_argument("--sides", nargs="+", default=["reference", "fit", "plan"], choices=["reference", "fit", "plan"])
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("fit_args", nargs="*", help="extra arguments for fit (after --)")
    args = parser.parse_args()
    if args.full:
        args.nsamples, args.seqlen, args.eval_windows = 128, 2048, None
    if args.side:
        return child(args)
    if args.nsamples < 1 or args.seqlen < 1 or (args.eval_windows is not None and args.eval_windows < 1):
        parser.error("--nsamples, --seqlen and --eval-windows must be at least 1")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-calibration-") as scratch:
        for side in args.sides:
            path = Path(scratch) / f"{side}.json"
            own = sys.argv[1:sys.argv.index("--")] if "--" in sys.argv else sys.argv[1:]
            command = [sys.executable, __file__, "--side", side, "--result", str(path), "--scratch", scratch, *own,
                       "--", *args.fit_args]
            print(f"running {side} ...", flush=True)
            subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL if side != "reference" else None)
            results[side] = json.loads(path.read_text())
    fp32, bf16 = matmul_rate("float32"), matmul_rate("bfloat16")
    print(f"\n{args.nsamples} x {args.seqlen} calibration windows, {args.eval_windows or 'all'} WikiText-2 windows; "
          f"fit: {args.config} {' '.join(args.fit_args)}")
    print(f"matmul rate here: fp32 {fp32 / 1e9:.1f} GFLOP/s, bf16 {bf16 / 1e9:.1f} GFLOP/s")
    if "reference" in results:
        flops = results["reference"]["flops"]
        print(f"calibration FLOPs {flops / 1e12:.2f} T: floor {flops / fp32:.1f} s at fp32, {flops / bf16:.1f} s at bf16")
    plan = results.pop("plan", None)
    rows = ["capture", "hessian", "solve", "propagate", "on_block_propagated", "calibration", "scoring"]
    print("(fit's calibration is its whole fit up to scoring: the stages, the loop, resume points, the swap to"
          " the chosen kernels)")
    print("\n| stage (s) | " + " | ".join(results) + (" | fit / reference |" if len(results) == 2 else " |"))
    print("|---|" + "---:|" * (len(results) + (len(results) == 2)))
    for row in rows:
        values = [results[s]["times"].get(row) for s in results]
        ratio = (f" {values[1] / values[0]:.2f} |" if len(values) == 2 and values[0] and values[1] is not None
                 else (" |" if len(values) == 2 else ""))
        print(f"| {row} | " + " | ".join("–" if v is None else f"{v:.1f}" for v in values) + " |" + ratio)
    peak = [results[s]["peak_rss_mib"] for s in results]
    print("| peak RSS (MiB) | " + " | ".join(f"{p:,.0f}" for p in peak) + " |"
          + (f" {peak[1] / peak[0]:.2f} |" if len(peak) == 2 else ""))
    ppl = [results[s]["ppl"] for s in results]
    print("| WikiText-2 ppl | " + " | ".join(f"{p:.4f}" for p in ppl) + " |" + (" |" if len(ppl) == 2 else ""))
    if plan is not None:
        predicted = plan["plan"]["bytes"]["peak"] / 2**20
        line = f"\ndry run (--model.dry_run=true) predicts a peak RSS of {predicted:,.0f} MiB"
        if "fit" in results:
            line += f": {predicted / results['fit']['peak_rss_mib']:.2f}x fit's measured peak"
        print(line + " (" + ", ".join(f"{k} {v / 2**20:,.0f}" for k, v in plan["plan"]["bytes"].items()) + " MiB)")
    if "fit" in results:
        times = results["fit"]["times"]
        staged = sum(times.get(k, 0.0) for k in rows[:5])
        print(f"\nfit, every timing (s): " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(times.items()))
              + f"; calibration outside the stages {times.get('calibration', 0.0) - staged:.1f}")


if __name__ == "__main__":
    main()
