"""Our asymmetric calibration (``HessianCapture(asymmetric=True)``) against GPTQModel's ``v2`` (GPTAQ), same windows.

Both tools quantize the same full-precision SmolLM2 (the HF folder our GGUF loader caches) on the
same calibration windows, 4-bit g128 act-order asymmetric, plain GPTQ Hessian (``sink_weight`` 1:
GPTQModel has no sink rule), once plain (``v1``) and once asymmetric (``v2``), and every model is
scored by the same function on the same PTB *valid* windows (not a reported test set). GPTQModel
runs in its own environment (see ``scripts/check_interop.py``)::

    python3 -m venv ../interop-venv && ../interop-venv/bin/pip install gptqmodel==7.7.0 optimum
    python experiments/gptaq_vs_gptqmodel.py --venv ../interop-venv
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from check_interop import score  # noqa: E402  (one scoring function for both environments)


def their_side(args) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig

    calibration, windows = torch.load(args.calibration), torch.load(args.windows_file)
    report = {"gptqmodel": gptqmodel.__version__}
    for v2 in (False, True):
        out = Path(args.work) / f"gptqmodel-{'v2' if v2 else 'v1'}"
        config = QuantizeConfig(bits=4, group_size=128, desc_act=True, sym=False, damp_percent=0.01, act_group_aware=False,
                                **({"gptaq": {"alpha": 0.25}} if v2 else {}))
        start = time.perf_counter()
        model = GPTQModel.load(args.fp_model, config)
        model.quantize([{"input_ids": c.tolist(), "attention_mask": [1] * c.numel()} for c in calibration], batch_size=1)
        model.save(str(out))
        seconds = time.perf_counter() - start
        del model
        loaded = GPTQModel.load(str(out), device="cpu", backend="torch")
        report[f"v2={v2}"] = {"ppl": score(loaded.model.float().eval(), windows)[0], "quantize_s": seconds}
        del loaded
    print("REPORT " + json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", help="the GPTQModel environment (required)")
    parser.add_argument("--gguf", default=str(ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--work", default="runs/gptaq_vs_gptqmodel")
    parser.add_argument("--calibration-text", default=str(ROOT.parent / "shared" / "data" / "calibration" / "wikipedia-vital-leads.txt"))
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-text", default=str(ROOT.parent / "shared" / "data" / "ptb" / "ptb.valid.txt"))
    parser.add_argument("--windows", type=int, default=8, help="scored windows of 2048 tokens")
    parser.add_argument("--their-side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fp-model", help=argparse.SUPPRESS)
    parser.add_argument("--calibration", help=argparse.SUPPRESS)
    parser.add_argument("--windows-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.their_side:
        return their_side(args)
    if not args.venv:
        parser.error("--venv is required")

    import lightning_gptq as lg
    from lightning_gptq.data import calibration_windows, eval_tokens
    from lightning_gptq.models import load_causal_lm
    from lightning_gptq.models.loading import gguf_cache_folder

    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    lm, tokenizer = load_causal_lm(args.gguf)  # converts once into the cache folder GPTQModel reads
    fp_folder = gguf_cache_folder(args.gguf)
    windows = eval_tokens("ptb-new", tokenizer, path=args.eval_text, seqlen=2048).reshape(-1)  # ptb-new's joining rule
    windows = windows[: args.windows * 2048].view(args.windows, 2048)
    calibration = calibration_windows(args.calibration_text, tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    torch.save(windows, work / "windows.pt")
    torch.save(calibration, work / "calibration.pt")

    ours = work / "ours.json"  # our side's results, kept so a failed GPTQModel side can be rerun alone
    rows = json.loads(ours.read_text()) if ours.exists() else {}
    if rows:
        print(f"our side: reusing {ours} (delete it to measure again)")
    else:
        rows["fp32"] = score(lm.eval(), windows)[0]
    config = lg.QuantConfig(bits=4, group_size=128, act_order=True, sym=False)
    del lm
    for asymmetric in (False, True) if "ours v1" not in rows else ():
        model, _ = load_causal_lm(str(fp_folder))
        start = time.perf_counter()
        model = lg.quantize(model, calibration, config, asymmetric=asymmetric, backend="torch", accelerator="cpu")
        seconds = time.perf_counter() - start
        rows[f"ours {'v2 (asymmetric)' if asymmetric else 'v1'}"] = score(model.eval(), windows)[0]
        rows[f"ours {'v2' if asymmetric else 'v1'} quantize s"] = seconds
        del model
        ours.write_text(json.dumps(rows, indent=2))

    command = [str(Path(args.venv) / "bin" / "python"), __file__, "--their-side", "--work", str(work),
               "--fp-model", str(fp_folder), "--calibration", str(work / "calibration.pt"),
               "--windows-file", str(work / "windows.pt")]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2"})
    (work / "their_side.log").write_text(proc.stdout + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    if proc.returncode or not lines:
        sys.exit(f"the GPTQModel side failed (exit {proc.returncode}); see {work / 'their_side.log'}")
    theirs = json.loads(lines[-1].removeprefix("REPORT "))
    rows["GPTQModel v1"], rows["GPTQModel v1 quantize s"] = theirs["v2=False"]["ppl"], theirs["v2=False"]["quantize_s"]
    rows["GPTQModel v2"], rows["GPTQModel v2 quantize s"] = theirs["v2=True"]["ppl"], theirs["v2=True"]["quantize_s"]
    print(f"SmolLM2-135M 4-bit g128 act-order asym, {args.nsamples}x{args.seqlen} calibration windows, "
          f"PTB valid first {args.windows}x2048 windows, GPTQModel {theirs['gptqmodel']}")
    print("| | perplexity | quantize (s) |\n|---|---:|---:|")
    print(f"| fp32 | {rows['fp32']:.4f} | |")
    for who in ("ours", "GPTQModel"):
        for v in ("v1", "v2"):
            key = f"{who} {v}" if who == "GPTQModel" else f"ours {'v2 (asymmetric)' if v == 'v2' else 'v1'}"
            print(f"| {who} {v} | {rows[key]:.4f} | {rows[f'{who} {v} quantize s']:.0f} |")
    (work / "result.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
