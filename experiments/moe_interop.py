"""Do other tools read our mixture-of-experts GPTQ folders, and do we read theirs? Tiny random MoE models of every
family we support (tests/tiny_models.py), in three other environments' hands.

    python experiments/moe_interop.py --gptqmodel-python ../interop-venv/bin/python \\
        --vllm-python ../vllm-venv/bin/python [arch ...]

Per architecture (fp32 tiny model, hidden 128, head_dim 64, 4-bit g32, GPTQ on 16 random windows of 16 tokens):
1. ``ours-sym`` (symmetric, ``gptq`` v1; Mixtral also ``ours-modules``: the same in ``names="modules"``) and
   ``ours-act`` (asymmetric with act-order, ``gptq_v2``), written by ``save_quantized``; read back by our
   ``load_quantized``, by ``transformers.from_pretrained`` and ``GPTQModel.load`` in the GPTQModel environment
   (GPTQModel 7.7.0, torch kernel, fp16), and ``ours-sym`` and ``ours-dense-experts`` (experts left dense: a ``-:``
   rule) by vLLM (bf16, CPU). Each reader's logits on fixed token ids are compared with the in-memory quantized
   model's (vLLM: its token log-probabilities).
2. ``theirs``: GPTQModel quantizes the full-precision folder itself (4-bit g32 sym, the same windows) and saves;
   our ``load_quantized``, transformers and vLLM read it, compared with GPTQModel's own logits.

Each line printed starts ``RESULT <arch> <check>``: the relative logit difference (``‖a − b‖ / ‖b‖``) with the
number of quantized layers the reader built, or what refused and why. Results of 2026-12-06: docs/architectures.md
("Other tools and MoE folders"). The other environments run this file as a subprocess (``--their-side``/``--vllm-side``),
so it imports nothing from lightning_gptq at module level.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
GROUP = 32  # vLLM's MoE path (Marlin, on CPU too) takes groups of 32, 64, 128 or whole rows
# wider than the tests' tiny models: vLLM's CPU attention takes no head_dim of 8
WIDER = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
ARCH_KW = {"gpt_oss": dict(head_dim=64), "deepseek_v3": dict(num_key_value_heads=2)}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


# -- the GPTQModel environment --------------------------------------------------------------------------------
def their_side(args) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import transformers
    from gptqmodel import GPTQModel, QuantizeConfig

    ids = torch.load(args.ids)
    report = {}
    if args.read:  # one reader of one folder per process: a crash in one does not hide the others
        folder, reader = args.read[0], args.reader
        key = f"{Path(folder).name}/{reader}"
        try:
            if reader == "gptqmodel":
                model = GPTQModel.load(folder, device="cpu", backend="torch", dtype=torch.float16).model.float()
            else:
                bits = json.loads((Path(folder) / "quantize_config.json").read_text())["bits"]
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    folder, device_map="cpu", dtype=torch.float32,
                    quantization_config=transformers.GPTQConfig(bits=bits, backend="torch"))
            quantized = sum(hasattr(m, "qweight") for m in model.modules())
            torch.save(_logits(model.eval(), ids), Path(args.work) / f"{key.replace('/', '_')}.pt")
            report[key] = {"quantized_layers": quantized}
        except Exception as error:  # noqa: BLE001 - a refusal is the result
            report[key] = {"error": f"{type(error).__name__}: {' '.join(str(error).split())}"[:500]}
    if args.quantize:
        try:
            calibration = torch.load(args.calibration)
            model = GPTQModel.load(args.quantize, QuantizeConfig(bits=4, group_size=GROUP, sym=True, desc_act=False))
            model.quantize([{"input_ids": c.tolist(), "attention_mask": [1] * c.numel()} for c in calibration],
                           batch_size=1)
            model.save(args.out)
            del model
            loaded = GPTQModel.load(args.out, device="cpu", backend="torch", dtype=torch.float16).model.float()
            torch.save(_logits(loaded.eval(), ids), Path(args.work) / "theirs_gptqmodel.pt")
            report["theirs"] = {"quantized_layers": sum(hasattr(m, "qweight") for m in loaded.modules())}
        except Exception as error:  # noqa: BLE001
            report["theirs"] = {"error": f"{type(error).__name__}: {' '.join(str(error).split())}"[:500]}
    print("REPORT " + json.dumps(report))


# -- the vLLM environment -------------------------------------------------------------------------------------
def vllm_side(args) -> None:
    from vllm import LLM, SamplingParams

    ids = torch.load(args.ids).tolist()
    try:
        llm = LLM(model=args.read[0], dtype="bfloat16", max_model_len=64, enforce_eager=True, seed=0,
                  gpu_memory_utilization=0.05)
        out = llm.generate([{"prompt_token_ids": w} for w in ids],
                           SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), use_tqdm=False)
        logprobs = [[out[i].prompt_logprobs[p][t].logprob for p, t in enumerate(w[1:], start=1)]
                    for i, w in enumerate(ids)]
        print("REPORT " + json.dumps({"logprobs": logprobs}))
    except Exception as error:  # noqa: BLE001
        print("REPORT " + json.dumps({"error": f"{type(error).__name__}: {' '.join(str(error).split())}"[-600:]}))


# -- ours -------------------------------------------------------------------------------------------------------
def _run_side(python: str, flag: str, *extra: str) -> dict:
    proc = subprocess.run([python, str(HERE), flag, *extra], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    if not lines:
        return {"side_failed": f"rc {proc.returncode}: {proc.stderr[-800:]}"}
    report = json.loads(lines[-1].removeprefix("REPORT "))
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "Error: " in line and not line.startswith("REPORT ")]
    causes = [line.split("] ", 1)[-1] for line in [x for x in lines if " ERROR " in x] or lines]  # the worker's own line
    if "error" in report and causes:  # vLLM's engine says why in its worker's log, not in what it raises
        report["error"] = causes[-1]
    return report


def _token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[n, seq-1] log-probability of each token after the first."""
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]


def one(arch: str, root: Path, args) -> None:
    sys.path.insert(0, str(HERE.parents[1] / "tests"))
    from tiny_lm import char_tokenizer
    from tiny_models import MOE_FACTORIES, token_ids

    import lightning_gptq as lg
    from lightning_gptq.checkpoint import load_quantized

    work = root / arch
    work.mkdir(parents=True)
    tokenizer = char_tokenizer()
    kw = {**WIDER, **ARCH_KW.get(arch, {})}
    MOE_FACTORIES[arch](**kw).save_pretrained(work / "fp")
    tokenizer.save_pretrained(work / "fp")
    calibration, ids = token_ids(16, 16), token_ids(2, 16, seed=4)
    torch.save(calibration, work / "calibration.pt")
    torch.save(ids, work / "ids.pt")
    expected, sym = {}, lg.QuantConfig(bits=4, group_size=GROUP, sym=True)
    variants = [("ours-sym", sym, {}, {}), ("ours-act", lg.QuantConfig(bits=4, group_size=GROUP, sym=False, act_order=True),
                                            {}, {"checkpoint_format": "gptq_v2"}),
                ("ours-dense-experts", sym, {"dynamic": {r"-:.*\.experts\..*": {}}}, {})]
    if arch == "mixtral":
        variants.append(("ours-modules", sym, {}, {"names": "modules"}))
    for name, config, fit_options, save_options in variants:
        model = MOE_FACTORIES[arch](**kw)
        lg.quantize(model, calibration, config, accelerator="cpu", **fit_options)
        lg.save_quantized(model, tokenizer, work / name, **save_options)
        expected[name] = _logits(model, ids)
        print("RESULT", arch, name, "ours-loader", f"relative {_relative(_logits(load_quantized(work / name)[0], ids), expected[name]):.2e}",
              flush=True)

    if args.gptqmodel_python:
        report, common = {}, ["--ids", str(work / "ids.pt"), "--work", str(work)]
        for side in ([*common, "--read", str(work / folder), "--reader", reader]
                     for folder in [v[0] for v in variants if v[0] != "ours-dense-experts"]
                     for reader in ("transformers", "gptqmodel")):
            report.update(_run_side(args.gptqmodel_python, "--their-side", *side))
            if "side_failed" in report:
                print("RESULT", arch, side[-3].split("/")[-1], side[-1], "CRASHED", report.pop("side_failed")[-400:].replace("\n", " "), flush=True)
        report.update(_run_side(args.gptqmodel_python, "--their-side", *common, "--quantize", str(work / "fp"),
                                "--calibration", str(work / "calibration.pt"), "--out", str(work / "theirs")))
        if (work / "theirs_gptqmodel.pt").is_file():  # transformers on GPTQModel's own folder
            report.update(_run_side(args.gptqmodel_python, "--their-side", *common, "--read", str(work / "theirs"),
                                    "--reader", "transformers"))
        if "side_failed" in report:
            print("RESULT", arch, "gptqmodel-side FAILED", report["side_failed"].replace("\n", " ")[-600:], flush=True)
        for key, value in report.items():
            if key == "side_failed":
                continue
            if "error" in value:
                print("RESULT", arch, key, "REFUSED", value["error"], flush=True)
            elif key == "theirs/transformers":
                got, want = torch.load(work / "theirs_transformers.pt"), torch.load(work / "theirs_gptqmodel.pt")
                print("RESULT", arch, key, f"against GPTQModel.load: relative {_relative(got, want):.2e}; "
                      f"{value['quantized_layers']} quantized layers", flush=True)
            elif key == "theirs":
                theirs = torch.load(work / "theirs_gptqmodel.pt")
                try:
                    ours = _logits(load_quantized(work / "theirs")[0], ids)
                    print("RESULT", arch, "theirs", f"our loader vs GPTQModel: relative {_relative(ours, theirs):.2e}; "
                          f"{value['quantized_layers']} quantized layers", flush=True)
                except Exception as error:  # noqa: BLE001
                    print("RESULT", arch, "theirs", "OUR LOADER REFUSED", f"{type(error).__name__}: {error}"[:500], flush=True)
            else:
                folder = key.split("/")[0]
                got = torch.load(work / f"{key.replace('/', '_')}.pt")
                print("RESULT", arch, key, f"relative {_relative(got, expected[folder]):.2e}; "
                      f"{value['quantized_layers']} quantized layers", flush=True)
    if args.vllm_python:
        for folder in ("ours-sym", "ours-dense-experts", "theirs"):
            if not (work / folder).is_dir():
                continue
            report = _run_side(args.vllm_python, "--vllm-side", "--ids", str(work / "ids.pt"), "--read", str(work / folder))
            if "logprobs" in report:
                reference = torch.load(work / "theirs_gptqmodel.pt") if folder == "theirs" else expected[folder]
                ours, theirs = _token_logprobs(reference, ids), torch.tensor(report["logprobs"])
                print("RESULT", arch, f"{folder}/vllm", f"token log-probs: max |diff| {float((ours - theirs).abs().max()):.3f}, "
                      f"relative {_relative(theirs, ours):.2e}", flush=True)
            else:
                what = "REFUSED " + report["error"] if "error" in report else "SIDE FAILED " + report["side_failed"]
                print("RESULT", arch, f"{folder}/vllm", what.replace("\n", " ")[-600:], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archs", nargs="*")
    parser.add_argument("--gptqmodel-python")
    parser.add_argument("--vllm-python")
    for hidden in ("--their-side", "--vllm-side"):
        parser.add_argument(hidden, action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--ids", "--work", "--quantize", "--calibration", "--out", "--reader"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--read", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.their_side:
        return their_side(args)
    if args.vllm_side:
        return vllm_side(args)

    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    sys.path.insert(0, str(HERE.parents[1] / "tests"))
    from tiny_models import MOE_FACTORIES

    root = Path(tempfile.mkdtemp(prefix="moe_interop_"))
    print("work folder", root, flush=True)
    for arch in args.archs or list(MOE_FACTORIES):
        try:
            one(arch, root, args)
        except Exception as error:  # noqa: BLE001 - one architecture's failure is a result
            print("RESULT", arch, "FAIL", type(error).__name__, str(error)[:400].replace("\n", " "), flush=True)


if __name__ == "__main__":
    main()
