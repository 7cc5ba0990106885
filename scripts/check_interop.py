"""Interop with the GPTQ ecosystem, run by hand: it needs a second virtual environment with GPTQModel.

    python3 -m venv ../interop-venv && ../interop-venv/bin/pip install gptqmodel==7.7.0 optimum
    python scripts/check_interop.py --venv ../interop-venv --ours <our quantized folder> \\
        --fp-model <HF folder of the full-precision model> --work ../interop

1. **Ours → theirs.** ``transformers.AutoModelForCausalLM.from_pretrained(<our folder>)`` in the
   GPTQModel environment (transformers hands GPTQ checkpoints to GPTQModel), and ``GPTQModel.load``,
   each score fixed WikiText-2 windows; we compare their logits, perplexity and what each layer became
   (bits, group size or dense: per-layer rules) with our loader's on the same token ids. A reader that
   refuses the folder is reported, and the other still runs.
2. **Theirs → ours.** GPTQModel quantizes the full-precision model (its own calibration pass on
   our calibration text) and saves; GPTQModel loads that and scores the same windows; our
   ``load_quantized`` loads it and scores them too.

Both sides score with the same function (below: non-overlapping windows, loss over the shifted
positions), on token ids tokenized once here and handed over in a file. The GPTQModel side runs
as a subprocess of the other environment's Python on this file (``--their-side``), which therefore
imports nothing from lightning_gptq at module level.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


@torch.no_grad()
def score(model, windows: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``(perplexity, logits of window 0)`` over ``windows`` [n, seqlen] (the paper's protocol)."""
    nll, count, first = 0.0, 0, None
    for w in windows:
        logits = model(w[None]).logits.float()
        if first is None:
            first = logits[0].clone()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], w[1:], reduction="sum")
        nll, count = nll + loss.item(), count + w.numel() - 1
    return float(torch.exp(torch.tensor(nll / count))), first


# -- the GPTQModel side (runs in the other environment) -------------------------------------------
def layer_kinds(model) -> dict:
    """``{layer name: [bits, group_size] or "dense"}`` of the linears inside the blocks, in either library."""
    return {name: [getattr(m, "bits", None), getattr(m, "group_size", None)] if hasattr(m, "qweight") else "dense"
            for name, m in model.named_modules()
            if ".layers." in name and (hasattr(m, "qweight") or type(m).__name__ == "Linear")}


def load_theirs(reader: str, folder: str, report: dict):
    """``folder`` through transformers' ``from_pretrained`` (which hands GPTQ to GPTQModel) or ``GPTQModel.load``."""
    import transformers

    if reader == "gptqmodel":
        from gptqmodel import GPTQModel

        # Its torch kernel takes fp16/bf16 only (bf16 by default on CPU): fp16 keeps 3 more mantissa bits.
        return GPTQModel.load(folder, device="cpu", backend="torch", dtype=torch.float16).model.float().eval()
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32).eval()
    except NotImplementedError as error:  # the kernel GPTQModel picks may not take a ragged last group
        report["default_kernel_refused"] = str(error).splitlines()[0][:300]
        bits = json.loads((Path(folder) / "quantize_config.json").read_text())["bits"]
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, device_map="cpu", dtype=torch.float32,
            quantization_config=transformers.GPTQConfig(bits=bits, backend="torch")).eval()


def their_side(args) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import gptqmodel
    import transformers

    windows = torch.load(args.windows_file)
    report = {"gptqmodel": gptqmodel.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    if args.ours:
        for reader in ("transformers", "gptqmodel"):
            start = time.perf_counter()
            try:
                model = load_theirs(reader, args.ours, report)
            except (ValueError, RuntimeError) as error:  # a refusal: recorded, the other reader still runs
                report[f"{reader}_refused"] = " ".join(str(error).split())[:400]
                continue
            report[f"{reader}_load_s"] = time.perf_counter() - start
            report[f"{reader}_qlinear"] = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
            # What each layer became on their side: per-layer rules (`dynamic`) must give these bits / dense layers.
            report[f"{reader}_layers"] = layer_kinds(model)
            report[f"{reader}_ppl"], logits = score(model, windows)
            torch.save(logits, Path(args.work) / f"logits_{reader}_on_ours.pt")
            del model
    if args.fp_model:
        from gptqmodel import GPTQModel, QuantizeConfig

        calibration = torch.load(args.calibration)
        config = QuantizeConfig(bits=4, group_size=128, desc_act=True, sym=False,
                                dynamic=json.loads(args.their_dynamic) if args.their_dynamic else None)
        start = time.perf_counter()
        model = GPTQModel.load(args.fp_model, config)
        model.quantize([{"input_ids": c.tolist(), "attention_mask": [1] * c.numel()} for c in calibration], batch_size=1)
        model.save(args.gptqmodel_out)
        report["gptqmodel_quantize_s"] = time.perf_counter() - start
        del model
        loaded = GPTQModel.load(args.gptqmodel_out, device="cpu", backend="torch", dtype=torch.float16).model.float().eval()
        report["theirs_ppl_by_gptqmodel"] = score(loaded, windows)[0]
        report["theirs_layers"] = layer_kinds(loaded)
    print("REPORT " + json.dumps(report))


# -- our side ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", help="the GPTQModel environment (its bin/python runs the other side)")
    parser.add_argument("--ours", help="a checkpoint folder written by lightning-gptq")
    parser.add_argument("--fp-model", help="HF folder of the full-precision model for GPTQModel to quantize")
    parser.add_argument("--work", default="interop", help="folder for the hand-over files and GPTQModel's checkpoint")
    parser.add_argument("--windows", type=int, default=8, help="WikiText-2 windows scored (of 2048 tokens)")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--wikitext", default="../shared/data/wikitext-2-raw/wiki.test.raw",
                        help="WikiText-2 test text (wiki.test.raw) the windows are cut from")
    parser.add_argument("--calibration-text", default="../shared/data/calibration/wikipedia-vital-leads.txt",
                        help="text GPTQModel calibrates on (part 2)")
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--calibration-seqlen", type=int, default=512)
    parser.add_argument("--their-dynamic", help="GPTQModel's per-layer rules for part 2, JSON (e.g. "
                        "'{\"+:.*down_proj$\": {\"bits\": 8}}')")
    parser.add_argument("--their-side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--calibration", help=argparse.SUPPRESS)
    parser.add_argument("--windows-file", help=argparse.SUPPRESS)
    parser.add_argument("--gptqmodel-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.their_side:
        return their_side(args)
    if args.their_dynamic:
        try:
            if not isinstance(json.loads(args.their_dynamic), dict):
                raise ValueError("not a JSON object")
        except ValueError as error:  # before any model work, not as a traceback from the other environment
            parser.error(f"--their-dynamic must be a JSON object of rules ({error})")

    from transformers import AutoTokenizer

    from lightning_gptq.checkpoint import load_quantized, read_settings
    from lightning_gptq.data import calibration_windows, eval_tokens

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.ours or args.fp_model)
    tokens = eval_tokens("wikitext2", tokenizer, path=args.wikitext, seqlen=args.seqlen)
    windows = tokens.reshape(-1)[: args.windows * args.seqlen].view(args.windows, args.seqlen)
    torch.save(windows, work / "windows.pt")
    calibration = calibration_windows(args.calibration_text, tokenizer,
                                      nsamples=args.calibration_windows, seqlen=args.calibration_seqlen, seed=0)
    torch.save(calibration, work / "calibration.pt")
    gptqmodel_out = work / "gptqmodel-4bit-g128"
    command = [str(Path(args.venv) / "bin" / "python"), __file__, "--their-side", "--work", str(work),
               "--windows-file", str(work / "windows.pt"), "--calibration", str(work / "calibration.pt"),
               "--gptqmodel-out", str(gptqmodel_out)]
    command += ["--ours", str(Path(args.ours).resolve())] if args.ours else []
    command += ["--fp-model", str(Path(args.fp_model).resolve())] if args.fp_model else []
    command += ["--their-dynamic", args.their_dynamic] if args.their_dynamic else []
    print("GPTQModel side:", " ".join(command), flush=True)
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2"})
    report_lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    if proc.returncode or not report_lines:
        print(proc.stdout[-4000:], proc.stderr[-6000:], sep="\n")
        sys.exit(f"the GPTQModel side failed (exit {proc.returncode})")
    report = json.loads(report_lines[-1].removeprefix("REPORT "))
    print(f"GPTQModel side: gptqmodel {report['gptqmodel']}, transformers {report['transformers']}, torch {report['torch']}")
    if args.ours:
        model, _ = load_quantized(args.ours, backend="torch")
        ppl, logits = score(model, windows)
        settings = read_settings(Path(args.ours))
        print(f"1. our checkpoint ({settings.checkpoint_format}, sym {settings.sym}"
              f"{', dynamic rules' if settings.dynamic else ''}): our loader's perplexity {ppl:.4f} on {args.windows} windows")
        if "default_kernel_refused" in report:
            print(f"   transformers' default GPTQ kernel refused our layers: {report['default_kernel_refused']}; "
                  f"loaded with GPTQConfig(backend='torch')")
        for reader, how in (("transformers", "transformers.from_pretrained"), ("gptqmodel", "GPTQModel.load (fp16)")):
            if f"{reader}_refused" in report:
                print(f"   {how}: refused: {report[f'{reader}_refused']}")
                continue
            theirs = torch.load(work / f"logits_{reader}_on_ours.pt")
            diff = (logits - theirs).abs().max().item()
            rel = ((logits - theirs).norm() / logits.norm()).item()
            expected = layer_kinds(model)
            differ = sorted(n for n in expected.keys() | report[f"{reader}_layers"].keys()
                            if report[f"{reader}_layers"].get(n) != expected.get(n))
            kinds = sorted({str(v) for v in report[f"{reader}_layers"].values()})
            print(f"   {how} [{', '.join(report[f'{reader}_qlinear'])}], loaded in {report[f'{reader}_load_s']:.1f} s: "
                  f"perplexity {report[f'{reader}_ppl']:.4f} (ours {ppl:.4f}); logits of window 0: max |diff| "
                  f"{diff:.2e}, relative {rel:.2e}; layers ({len(expected)}; {', '.join(kinds)}): "
                  + ("all as ours" if not differ else f"{len(differ)} differ, e.g. {differ[:2]}"))
    if args.fp_model:
        model, _ = load_quantized(gptqmodel_out, backend="torch")
        ppl = score(model, windows)[0]
        ours = layer_kinds(model)
        differ = sorted(n for n in ours.keys() | report["theirs_layers"].keys() if report["theirs_layers"].get(n) != ours.get(n))
        settings = read_settings(gptqmodel_out)
        print(f"2. GPTQModel's checkpoint ({settings.checkpoint_format}{', dynamic rules' if settings.dynamic else ''}, "
              f"quantized in {report['gptqmodel_quantize_s']:.0f} s): perplexity by GPTQModel (fp16) "
              f"{report['theirs_ppl_by_gptqmodel']:.4f}, by our loader {ppl:.4f} on {args.windows} windows; layers "
              f"({len(ours)}; {', '.join(sorted({str(v) for v in ours.values()}))}): "
              + ("all as theirs" if not differ else f"{len(differ)} differ, e.g. {differ[:2]}"))


if __name__ == "__main__":
    main()
