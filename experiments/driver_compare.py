"""Our Lightning pipeline against a plain reference-style driver, on the same windows and solver.

The reference code (IST-DASLab ``llama.py``) catches block 0's inputs, then per block: hooks every
linear to accumulate its Hessian while the block runs on each window (``attention_mask=None``),
quantizes all linears (not true-sequential), writes the dequantized weight back into the dense
``nn.Linear`` and runs the block again for the next block's inputs. ``reference_driver`` below does
exactly that with our solver (which equals the reference's on layer problems), so what differs
from ``fit`` is the driver alone. Both score the first ``--eval-windows`` WikiText-2 windows.

    python experiments/driver_compare.py --seeds 0 1 2 --nsamples 32 --seqlen 512

Variants of ``fit``: the default (``auto`` backend: layers of the int4 CPU layout, exact fp32
kernels during calibration) and ``--gptq.backend=torch`` (the plain dequantize-then-matmul layer).
Prints per-block median layer-loss ratios against the reference driver and the perplexities.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from lightning_gptq import HessianAccumulator, QuantConfig, gptq_quantize

SHARED = Path(__file__).resolve().parents[2] / "shared"
GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = SHARED / "data" / "calibration" / "wikipedia-vital-leads.txt"
WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
QUANT = dict(bits=4, group_size=128, sym=False, act_order=True, damp=0.01, block_size=128)


@torch.no_grad()
def reference_driver(model, windows: torch.Tensor) -> dict[str, float]:
    """Quantize ``model`` in place the reference's way; returns ``{"<block>.<linear>": loss}``."""
    layers = model.model.layers
    caught: dict = {"hidden": [], "kwargs": None}

    class Catcher(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, hidden, *args, **kwargs):
            caught["hidden"].append(hidden)
            caught["kwargs"] = kwargs
            raise ValueError  # stop the forward pass after block 0's input

    layers[0] = Catcher(layers[0])
    for w in windows:
        try:
            model(w[None], use_cache=False)
        except ValueError:
            pass
    layers[0] = layers[0].block
    kwargs = dict(caught["kwargs"])
    kwargs["attention_mask"] = None  # as the reference driver passes it
    kwargs.pop("past_key_values", None)
    kwargs["use_cache"] = False
    hidden = caught["hidden"]
    config = QuantConfig(**QUANT)
    losses = {}
    for b, block in enumerate(layers):
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        accs = {n: HessianAccumulator(m.in_features) for n, m in linears.items()}
        hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: accs[n].add(inp[0].data)) for n, m in linears.items()]
        for h in hidden:
            block(h, **kwargs)
        for hook in hooks:
            hook.remove()
        for n, m in linears.items():
            q = gptq_quantize(m.weight.data, accs[n].hessian, config)
            m.weight.data = q.dequantize().to(m.weight.dtype)
            losses[f"{b}.{n}"] = q.loss
        outs = []
        for h in hidden:
            out = block(h, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
        hidden = outs
    return losses


def run_fit(seed: int, nsamples: int, seqlen: int, eval_windows: int, backend: str, root: Path) -> tuple[dict, float]:
    from lightning_gptq.cli import main

    out = root / f"fit-{backend}-{seed}"
    cli = main([
        "fit", "--config=configs/smollm2-135m.yaml", f"--model.model={GGUF.parent}", f"--data.calibration={TEXT}",
        f"--data.eval_paths={{wikitext2: {WIKI}}}", f"--data.nsamples={nsamples}", f"--data.seqlen={seqlen}",
        f"--data.seed={seed}", f"--data.eval_max_windows={eval_windows}", "--model.latency=false",
        "--model.save_quantized=false", f"--model.output_dir={out}", "--hessian.sink_weight=1",
        f"--gptq.backend={backend}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
    ])
    summary = json.loads((out / "summary.json").read_text())
    prefix = "model.layers."
    losses = {r["name"].removeprefix(prefix): r["loss"] for r in summary["layers"]}
    return losses, cli.model.results["after"]["wikitext2"]["ppl"]


def block_ratios(ours: dict, ref: dict) -> list[float]:
    by_block = defaultdict(list)
    for name, loss in ref.items():
        if name in ours and loss > 0:
            by_block[int(name.split(".")[0])].append(ours[name] / loss)
    return [statistics.median(by_block[b]) for b in sorted(by_block)]


def main() -> None:
    global GGUF, TEXT, WIKI
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--backends", nargs="+", default=["auto", "torch"])
    parser.add_argument("--model", default=str(GGUF), help="the SmolLM2 GGUF file (its folder goes to the config)")
    parser.add_argument("--calibration", default=str(TEXT))
    parser.add_argument("--wikitext", default=str(WIKI), help="WikiText-2 test text (wiki.test.raw)")
    args = parser.parse_args()
    GGUF, TEXT, WIKI = Path(args.model), Path(args.calibration), Path(args.wikitext)

    from lightning_gptq.data import calibration_windows, eval_tokens, perplexity
    from lightning_gptq.models import load_causal_lm

    root = Path(tempfile.mkdtemp(prefix="driver-compare-"))
    print(f"SmolLM2, 4-bit g128 asym act-order, damp 0.01, sink_weight 1, {args.nsamples}x{args.seqlen} calibration "
          f"windows; first {args.eval_windows} WikiText-2 windows of 2048", flush=True)
    table = defaultdict(dict)
    for seed in args.seeds:
        model, tokenizer = load_causal_lm(str(GGUF))
        windows = calibration_windows(str(TEXT), tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=seed)
        start = time.perf_counter()
        ref_losses = reference_driver(model, windows)
        tokens = eval_tokens("wikitext2", tokenizer, path=str(WIKI), seqlen=2048)
        ref_ppl = perplexity(model, tokens, seqlen=2048, dataset="wikitext2", max_windows=args.eval_windows).ppl
        table[seed]["reference driver"] = ref_ppl
        print(f"seed {seed}: reference driver {ref_ppl:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
        for backend in args.backends:
            start = time.perf_counter()
            losses, ppl = run_fit(seed, args.nsamples, args.seqlen, args.eval_windows, backend, root)
            table[seed][f"fit, backend {backend}"] = ppl
            ratios = block_ratios(losses, ref_losses)
            print(f"seed {seed}: fit backend={backend} {ppl:.4f} ({time.perf_counter() - start:.0f} s); "
                  f"median layer-loss ratio fit/reference per block: "
                  + " ".join(f"{r:.4f}" for r in ratios), flush=True)
    print()
    columns = list(next(iter(table.values())))
    print("| seed | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for seed, row in table.items():
        print(f"| {seed} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
