"""fp32 / round-to-nearest / GPTQ perplexity of SmolLM2-135M on the shared WikiText-2 text.

Each row is one real CLI run (``python -m lightning_gptq fit|validate --config configs/smollm2-135m.yaml``
with overrides) timed from start to finish; rows are appended to ``--out`` as they complete, so a
long session that is cut short keeps what it measured.

    python scripts/smollm2_table.py --out runs/smollm2_table.md                # every row
    python scripts/smollm2_table.py --rows gptq-4-g128 rtn-4-g128            # some rows
    python scripts/smollm2_table.py --rows fp32 -- --data.eval_datasets='[wikitext2, ptb-new]' \
        --data.eval_paths='{wikitext2: ../shared/data/wikitext-2-raw/wiki.test.raw, ptb-new: ../shared/data/ptb/ptb.test.txt}'
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2-135m.yaml"
WIKIPEDIA = ROOT.parent / "shared" / "data" / "calibration" / "wikipedia-vital-leads.txt"
# The reference algorithm and its calibration, whatever the config has taken since: the sink weight 1, min-max grids,
# no static groups or input scaling, Wikipedia alone (as scripts/quality_table.py's ref rows).
REFERENCE = ["--hessian.sink_weight=1", "--gptq.quant.mse=false", "--gptq.quant.static_groups=false",
             "--gptq.equalize=[]", f"--data.calibration={WIKIPEDIA}"]
ROWS = {  # name: (method, bits, group_size); "gptq" rows are the config, "ref" rows REFERENCE
    "gptq-4-g128": ("gptq", 4, 128),
    "ref-4-g128": ("ref", 4, 128),
    "ref-3-g128": ("ref", 3, 128),
    "ref-4-row": ("ref", 4, -1),
    "ref-3-row": ("ref", 3, -1),
    "rtn-4-g128": ("rtn", 4, 128),
    "gptq-3-g128": ("gptq", 3, 128),
    "rtn-3-g128": ("rtn", 3, 128),
    "rtn-4-row": ("rtn", 4, -1),
    "rtn-3-row": ("rtn", 3, -1),
    "gptq-4-row": ("gptq", 4, -1),
    "gptq-3-row": ("gptq", 3, -1),
    "fp32": (None, 32, 0),
}


def run(name: str, workdir: Path, extra: list[str]) -> dict:
    method, bits, group = ROWS[name]
    folder = workdir / name
    common = [f"--trainer.default_root_dir={folder}", f"--trainer.logger.init_args.save_dir={folder}", *extra]
    if method is None:
        cmd = [sys.executable, "-m", "lightning_gptq", "validate", f"--config={CONFIG}", "--model.latency=false", *common]
    else:
        reference = REFERENCE if method == "ref" else ["--gptq.quant.mse=false"] if method == "rtn" else []
        cmd = [sys.executable, "-m", "lightning_gptq", "fit", f"--config={CONFIG}",
               f"--gptq.method={'gptq' if method == 'ref' else method}", *reference,
               f"--gptq.quant.bits={bits}", f"--gptq.quant.group_size={group}", "--model.latency=false",
               "--model.save_quantized=false", f"--model.output_dir={folder}", *common]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    (workdir / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {workdir / f'{name}.log'}")
    if method is None:
        lines = [l.strip() for l in proc.stdout.splitlines() + proc.stderr.splitlines()]
        found = [re.search(r"val perplexity (\S+): ([0-9.]+)", l) for l in lines]
        ppl = {m.group(1): float(m.group(2)) for m in found if m}
        return {"row": name, "ppl": ppl, "wall_s": wall, "detail": "; ".join(l for l, m in zip(lines, found) if m)}
    summary = json.loads((folder / "summary.json").read_text())
    after = summary["results"]["after"]
    return {"row": name, "ppl": {k: v["ppl"] for k, v in after.items()}, "wall_s": wall,
            "detail": "; ".join(v["text"] for v in after.values()), "timings": summary["timings_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--out", default="runs/smollm2_table.md")
    parser.add_argument("--workdir", default="runs/smollm2_table")
    parser.add_argument("extra", nargs="*", help="further CLI overrides for every run, after --")
    args = parser.parse_args()
    workdir = (ROOT / args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out = (ROOT / args.out).resolve()
    if not out.exists():
        out.write_text("| run | method | bits | group | perplexity | wall time (s) | stage times (s) |\n"
                       "|---|---|---:|---:|---|---:|---|\n")
    for name in args.rows:
        result = run(name, workdir, args.extra)
        method, bits, group = ROWS[name]
        scores = ", ".join(f"{k} {v:.3f}" for k, v in result["ppl"].items())
        stages = ", ".join(f"{k} {v:.0f}" for k, v in result.get("timings", {}).items())
        with out.open("a") as f:
            f.write(f"| {name} | {method or 'fp32'} | {bits} | {group if method else '-'} | {scores} | "
                    f"{result['wall_s']:.0f} | {stages} |\n")
        (workdir / f"{name}.json").write_text(json.dumps(result, indent=2))
        print(f"{name}: {scores}, {result['wall_s']:.0f} s -- {result['detail']}", flush=True)


if __name__ == "__main__":
    main()
