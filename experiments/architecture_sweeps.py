"""Every tiny architecture of the tests (dense and MoE) through one feature at a time, to find what a feature
gets wrong on a model family its tests do not cover. Prints one ``RESULT <arch> ...`` line per architecture.

    python experiments/architecture_sweeps.py cli                  # fit -> validate (whole, streamed) -> predict, auto decode
    python experiments/architecture_sweeps.py compressed-tensors   # save_compressed_tensors -> load: same logits
    python experiments/architecture_sweeps.py gptaq                # RTN / GPTQ / GPTAQ (asymmetric) logit error, 3-bit
    python experiments/architecture_sweeps.py sink                 # the measured sink rule runs (and what it warns)
    python experiments/architecture_sweeps.py streamed-fit         # streaming fit == in-memory fit, tensor for tensor
    python experiments/architecture_sweeps.py ddp                  # gptq_ddp on 2 processes == 1 process (slow: ~1 min each)
    python experiments/architecture_sweeps.py resume               # SIGKILL in the last block's two stages; resume == uninterrupted

Append architecture names to sweep only those. Results of 2026-12-06: docs/architectures.md ("Sweeps").
"""

import logging
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_lightning import cli_args  # noqa: E402
from tiny_lm import char_tokenizer  # noqa: E402
from tiny_models import FACTORIES, MOE_FACTORIES, full_logits, token_ids  # noqa: E402

import lightning_gptq as lg  # noqa: E402
from lightning_gptq.checkpoint.shards import Shards  # noqa: E402
from lightning_gptq.cli import main  # noqa: E402

ALL = {**FACTORIES, **MOE_FACTORIES}


def _source(root: Path, arch: str) -> Path:
    folder = root / arch / "src"
    if not (folder / "config.json").exists():
        ALL[arch]().save_pretrained(folder)
        char_tokenizer().save_pretrained(folder)
    return folder


def _differing(a: Path, b: Path) -> list[str]:
    x, y = Shards(a), Shards(b)
    return sorted(set(x.shapes) ^ set(y.shapes)) + [n for n in x.shapes if n in y.shapes and not torch.equal(x.get(n), y.get(n))]


def compressed_tensors(arch: str, root: Path) -> str:
    from lightning_gptq.checkpoint import load_compressed_tensors, save_compressed_tensors

    model = ALL[arch]()
    lg.quantize(model, token_ids(4, 16), lg.QuantConfig(bits=4, group_size=16, sym=False), method="rtn", accelerator="cpu")
    save_compressed_tensors(model, None, root / arch / "ct")
    loaded, _ = load_compressed_tensors(root / arch / "ct")
    ids = token_ids(2, 12, seed=4)
    return f"max |logit difference| {float((full_logits(model, ids) - full_logits(loaded, ids)).abs().max()):.3g}"


def gptaq(arch: str, root: Path) -> str:
    ids = token_ids(4, 16, seed=9)
    base = full_logits(ALL[arch](), ids)
    errors = {}
    for name, options in (("rtn", {"method": "rtn"}), ("gptq", {}), ("gptaq", {"asymmetric": True})):
        model = ALL[arch]()
        lg.quantize(model, token_ids(32, 16), lg.QuantConfig(bits=3, group_size=16), accelerator="cpu", **options)
        errors[name] = round(float((full_logits(model, ids) - base).norm() / base.norm()), 4)
    return str(errors)


def sink(arch: str, root: Path) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lg.quantize(ALL[arch](), token_ids(8, 16), lg.QuantConfig(bits=4, group_size=16), accelerator="cpu",
                    sink_weight="attention")
    return "ran; " + str(sorted({str(w.message)[:80] for w in caught if "sink" in str(w.message)}))


QUIET = ["--model.eval_after=false", "--model.latency=false", "--gptq.quant.act_order=true"]


def streamed_fit(arch: str, root: Path) -> str:
    src, out = _source(root, arch), root / arch
    main(["fit", *cli_args(src, out / "a", *QUIET, "--hessian.sink_weight=16", f"--model.output_dir={out / 'whole'}")])
    main(["fit", *cli_args(src, out / "b", *QUIET, "--hessian.sink_weight=16", "--model.streaming=true",
                           f"--model.output_dir={out / 'streamed'}")])
    diff = _differing(out / "whole" / "model", out / "streamed" / "model")
    return "equal" if not diff else f"{len(diff)} tensors differ: {diff[:3]}"


def ddp(arch: str, root: Path) -> str:
    from test_distributed import DDP, EXACT, EXTRA, _fit

    src, out = _source(root, arch), root / arch
    main(["fit", *cli_args(src, out / "single", *EXTRA, *EXACT, f"--model.output_dir={out / 'single-out'}", group_size=16)])
    proc = _fit(cli_args(src, out / "ddp", *EXTRA, *EXACT, f"--model.output_dir={out / 'ddp-out'}", group_size=16), out, *DDP)
    if proc.returncode:
        return f"2 processes failed (rc {proc.returncode}): {proc.stderr[-400:]}"
    diff = _differing(out / "single-out" / "model", out / "ddp-out" / "model")
    return "equal" if not diff else f"{len(diff)} tensors differ: {diff[:3]}"


def resume(arch: str, root: Path) -> str:
    from test_resume import _args, _killed_run

    results = []
    src = _source(root, arch)
    last = 2 * ALL[arch]().config.num_hidden_layers - 2
    for epoch in (last, last + 1):  # calibrating the last block; propagating it (3 blocks: stages 4 and 5)
        out = root / arch / f"kill{epoch}"
        main(["fit", *_args(src, out / "whole", out / "whole-out")])
        _killed_run(src, out / "runs", out / "out", epoch, out)
        main(["fit", *_args(src, out / "runs", out / "out"), "--ckpt_path=last"])
        diff = _differing(out / "whole-out" / "model", out / "out" / "model")
        results.append(f"kill at {epoch}: " + ("equal" if not diff else f"{len(diff)} differ"))
    return "; ".join(results)


def cli(arch: str, root: Path) -> str:
    """The user's path: ``fit`` (perplexity after, latency with ``auto`` decode), then ``validate`` the folder
    (streamed too) and ``predict`` with ``auto`` decode."""
    import json

    src, out = _source(root, arch), root / arch
    main(["fit", *cli_args(src, out / "fit", "--model.latency_decode=auto", f"--model.output_dir={out / 'q'}",
                           group_size=16)])
    summary = json.loads((out / "q" / "summary.json").read_text())
    after, latency = summary["results"]["after"]["wikitext2"]["ppl"], summary["results"]["latency"]
    scores = [main(["validate", *cli_args(out / "q" / "model", out / f"val{i}", "--model.latency=false", *extra)]
                   ).model.results["val"]["wikitext2"]["ppl"] for i, extra in enumerate([[], ["--model.streaming=true"]])]
    prompts = '--data.prompts=["the cat", "a dog"]'
    main(["predict", *cli_args(out / "q" / "model", out / "pred", prompts, "--model.generation.decode=auto",
                               "--model.generation.max_new_tokens=4")])
    same = all(abs(p - after) <= 1e-5 * after for p in scores)
    return (f"ppl after fit {after:.4f}, validate {scores[0]:.4f}, streamed {scores[1]:.4f} ({'same' if same else 'DIFFERENT'}); "
            f"decode {latency['decode_path']} {latency['decode_ms_per_token']:.2f} ms/token"
            + (f", compile error {latency['compile_error']}" if latency.get("compile_error") else ""))


CHECKS = {"cli": cli, "compressed-tensors": compressed_tensors, "gptaq": gptaq, "sink": sink, "streamed-fit": streamed_fit,
          "ddp": ddp, "resume": resume}


def run(check: str, archs: list[str]) -> None:
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    root = Path(tempfile.mkdtemp())
    for arch in archs or (sorted(FACTORIES) if check == "streamed-fit" else list(ALL)):
        try:
            print("RESULT", arch, CHECKS[check](arch, root), flush=True)
        except BaseException as error:  # noqa: BLE001 - one architecture's failure is a result, not the end
            print("RESULT", arch, "FAIL", type(error).__name__, str(error)[:300].replace("\n", " "), flush=True)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2:])
