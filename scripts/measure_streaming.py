"""Peak resident memory and time of a ``fit`` against the model's fp32 size, and the dry run's estimate.

Runs ``python -m lightning_gptq fit`` (``--model.streaming=true`` unless ``--in-memory``) in a child
process, reads the child's peak RSS from the kernel and its stage times from ``summary.json``, and
first runs the same command with ``--model.dry_run=true`` to set its estimates beside them. Extra
CLI arguments go after ``--``.

    python scripts/make_synthetic_llama.py --out /tmp/llama-1b
    python scripts/measure_streaming.py /tmp/llama-1b --nsamples 8 --seqlen 512
    python scripts/make_synthetic_llama.py --out /tmp/llama-1b-slice --layers 3
    python scripts/measure_streaming.py /tmp/llama-1b-slice --compare   # + an in-memory fit, tensor for tensor
    python scripts/measure_streaming.py ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --in-memory --nsamples 16 \
        --seqlen 2048 -- --config configs/smollm2-135m.yaml --model.gguf_file=null --data.eval_max_windows=16 \
        "--data.eval_datasets=[ptb-valid=../shared/data/ptb/ptb.valid.txt]" --model.eval_after=true
    python scripts/measure_streaming.py /tmp/llama-1b-slice --compare -- --model.eval_after=true \
        "--data.eval_datasets=[ptb-valid=../shared/data/ptb/ptb.valid.txt]" --data.eval_max_windows=8 --data.eval_seqlen=512
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from pathlib import Path


def run(argv: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in bytes) of one child process."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: exec the CLI (fork + exec keeps the RSS measurement to this child alone)
        os.execv(sys.executable, [sys.executable, "-m", "lightning_gptq", *argv])
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"fit failed ({status}): {' '.join(argv)}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--calibration", default="../shared/data/calibration/wikipedia-vital-leads.txt",
                        help="calibration text (data.calibration)")
    parser.add_argument("--in-memory", action="store_true", help="the ordinary fit (the whole model in memory)")
    parser.add_argument("--compare", action="store_true",
                        help="then also fit in memory and compare the two written models tensor for tensor")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # CLI arguments for the fit, after --
    args = parser.parse_args(argv[:cut])
    args.extra = []
    for item in argv[cut + 1 :]:  # "--config FILE" -> "--config=FILE", so it can be moved as one
        if args.extra and args.extra[-1] == "--config":
            args.extra[-1] = f"--config={item}"
        else:
            args.extra.append(item)

    folder = Path(args.model)
    files = list(folder.glob("*.safetensors")) if folder.is_dir() else [folder]
    fp32 = sum(p.stat().st_size for p in files)
    root = Path(tempfile.mkdtemp(prefix="streaming-"))
    common = ["fit", f"--model.model={folder}", f"--data.calibration={args.calibration}",
              f"--data.nsamples={args.nsamples}", f"--data.seqlen={args.seqlen}", "--data.eval_datasets=[]",
              "--model.eval_after=false", "--model.latency=false", f"--gptq.quant.bits={args.bits}",
              "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}"]
    if args.extra:  # a --config must come first for the other arguments to override it
        configs = [a for a in args.extra if a.startswith("--config")]
        common = [common[0], *configs, *common[1:], *[a for a in args.extra if a not in configs]]
    mode = [] if args.in_memory else ["--model.streaming=true"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _, _ = run([*common, *mode, "--model.dry_run=true", f"--model.output_dir={root / 'plan'}"])
    plan = json.loads((root / "plan" / "plan.json").read_text())
    seconds, peak = run([*common, *mode, f"--model.output_dir={root / 'fit'}"])
    summary = json.loads((root / "fit" / "summary.json").read_text())
    label = "in-memory" if args.in_memory else "streaming"
    print(f"model {folder}: {fp32 / 2**30:.2f} GiB on disk")
    print(f"{label} fit: peak RSS {peak / 2**20:,.0f} MiB = {peak / fp32:.1%} of the files, {seconds:.0f} s")
    estimate = plan["seconds"]["total"] - plan["seconds"].get("evaluate", 0)  # total_fit stops before scoring
    measured = summary["timings_s"].get("total_fit", 0)
    print(f"dry run estimate: peak {plan['bytes']['peak'] / 2**20:,.0f} MiB ({plan['bytes']['peak'] / peak - 1:+.0%}), "
          f"fit time without scoring {estimate:.0f} s vs {measured:.0f} s ({estimate / max(measured, 1e-9) - 1:+.0%})")
    names = {"calibrate": "hessian", "propagate": "propagate", "solve": "solve", "evaluate": "eval_after"}
    for stage, key in names.items():
        measured = summary["timings_s"].get(key)
        if measured and stage in plan["seconds"]:
            estimate = plan["seconds"][stage]
            print(f"  {stage}: estimate {estimate:.1f} s, measured {measured:.1f} s ({estimate / measured - 1:+.0%})")
    if args.compare and not args.in_memory:
        from lightning_gptq.checkpoint.shards import Shards

        seconds, peak = run([*common, f"--model.output_dir={root / 'memory'}"])
        print(f"in-memory fit: peak RSS {peak / 2**20:,.0f} MiB = {peak / fp32:.1%} of the files, {seconds:.0f} s")
        a, b = Shards(root / "fit" / "model"), Shards(root / "memory" / "model")
        same = [n for n in a.shapes if n in b.shapes and torch.equal(a.get(n), b.get(n))]
        print(f"streamed vs in-memory checkpoint: {len(same)} of {len(b.shapes)} tensors equal "
              f"({len(a.shapes)} streamed)")
        whole = json.loads((root / "memory" / "summary.json").read_text())["results"].get("after", {})
        for name, result in summary["results"].get("after", {}).items():  # eval_after: block by block vs whole
            if name in whole:
                print(f"eval_after {name}: streamed (block by block) {result['ppl']:.4f}, in memory "
                      f"{whole[name]['ppl']:.4f} ({result['ppl'] / whole[name]['ppl'] - 1:+.1e})")


if __name__ == "__main__":
    main()
