"""Where did two `fit` runs part? Compares their `summary.json` files layer by layer.

Each layer record carries a digest of the Hessian its solve read, of the codes, zero points and
column order it gave, and of its scales. The first layer whose Hessian differs is where the two calibration streams (the inputs
the layers saw) parted; a layer whose codes differ under the same Hessian was solved differently.
GPTQ is chaotic across blocks: once one code differs, most codes of every later block do.

    python scripts/compare_runs.py runs/a/.../quantized runs/b/.../quantized   # folders or summary.json files

Exit status 0 when every layer's codes agree, 1 when some differ, 2 when the files cannot be compared.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

SETTINGS = ("quant", "dynamic", "method", "hessian", "calibration")
MACHINE = ("cpu", "cpu_capability", "threads", "torch", "version")


def load(path: str) -> dict:
    p = Path(path)
    p = p / "summary.json" if p.is_dir() else p
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"compare_runs: cannot read {p}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def differing(a: dict, b: dict, keys) -> list[str]:
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def compare(a: dict, b: dict, out=None) -> int:
    """Prints the comparison; returns the exit status (0 codes equal, 1 they differ, 2 not comparable)."""
    out = out or sys.stdout
    machine = differing(a.get("tool", {}), b.get("tool", {}), MACHINE)
    print("machines: " + ("; ".join(machine) if machine else "the same as far as recorded"), file=out)
    def setting(summary, key):  # the measured sink weights are results, compared below
        value = summary.get(key)
        return {k: v for k, v in value.items() if k != "block_weights"} if key == "hessian" and value else value

    settings = [d for k in SETTINGS for d in differing({k: setting(a, k)}, {k: setting(b, k)}, [k])]
    model = differing(a.get("model", {}), b.get("model", {}),
                      sorted((set(a.get("model", {})) | set(b.get("model", {}))) - {"output_dir"}))
    if settings or model:
        print("settings differ: " + "; ".join(settings + [f"model.{m}" for m in model]), file=out)
    wa, wb = ((s.get("hessian") or {}).get("block_weights") or {} for s in (a, b))
    parted = [k for k in wa if k in wb and wa[k] != wb[k]]
    if parted:
        worst = max(abs(wa[k] - wb[k]) / max(abs(wa[k]), 1e-300) for k in parted)
        print(f"measured sink weights differ from block {parted[0]} on ({len(parted)} of {len(wa)} blocks, "
              f"up to {worst:.1e} relative)", file=out)
    la, lb = a.get("layers", []), b.get("layers", [])
    if [r["name"] for r in la] != [r["name"] for r in lb]:
        print(f"the runs quantized different layers ({len(la)} and {len(lb)}): not comparable", file=out)
        return 2
    if not la or not all(r.get("codes_sha256") for r in la + lb):
        print("a summary without layer digests (written before they were recorded): not comparable", file=out)
        return 2
    def first(key):
        return next((r["name"] for r, s in zip(la, lb) if r.get(key) != s.get(key)), None)

    first_h, first_c, first_s = first("hessian_sha256"), first("codes_sha256"), first("scales_sha256")
    for label, summary in (("a", a), ("b", b)):
        after = (summary.get("results") or {}).get("after") or {}
        scores = ", ".join(f"{k} {v['ppl']:.6f}" for k, v in after.items() if isinstance(v, dict) and "ppl" in v)
        if scores:
            print(f"perplexity {label}: {scores}", file=out)
    print(f"first layer whose Hessian differs: {first_h or 'none'}", file=out)
    print(f"first layer whose scales differ: {first_s or 'none'}", file=out)
    if first_c is None:
        print(f"every layer's codes, zero points and column order agree ({len(la)} layers)", file=out)
        return 0
    print(f"first layer whose codes differ: {first_c}", file=out)
    order = [r["name"] for r in la].index
    if first_h is None or order(first_c) < order(first_h):
        print("  it read the same Hessian in both runs: the solve itself gave other codes there", file=out)
    else:
        print(f"  the layers' inputs had parted at {first_h} (the calibration streams differ from there on)", file=out)
    per_block: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for r, s in zip(la, lb):
        per_block[r["block"]][0] += r["codes_sha256"] != s["codes_sha256"]
        per_block[r["block"]][1] += 1
    print("layers with differing codes per block: "
          + " ".join(f"{blk}:{d}/{n}" for blk, (d, n) in sorted(per_block.items())), file=out)
    return 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="a run's quantized/ folder or its summary.json")
    parser.add_argument("b")
    args = parser.parse_args(argv)
    return compare(load(args.a), load(args.b))


if __name__ == "__main__":
    sys.exit(main())
