"""Prepare ``.gpu-check/`` (git-ignored) for ``scripts/check_gpu.py --all`` on a bare GPU machine.

The GPU machine sees only the checkout (at most 64 MiB travels) and cannot reach a package index:

- ``SmolLM2-<n>of30blocks.gguf``: SmolLM2-135M from ``../shared/models`` with only the blocks ``--keep``
  names (the whole model's 98 MB does not travel; 12 blocks do), renumbered, tensors copied byte for byte
  (Q4_1 linears, Q8_0 embedding), ``llama.block_count`` set to match: a real model, shallower. The default,
  blocks 0–2 and 21–29, scores perplexity about 2,100 on Brown text where the first 12 alone score 6e10 (a
  regime where any rounding moves the score by far more than the check's 1% means); chosen on Brown text,
  which the check does not evaluate (``experiments/gpu_bundle_blocks.py``).
- ``data/``: the calibration and evaluation text the check reads.
- ``wheels/``: the pure-Python packages the project needs that the GPU image lacks (jsonargparse and
  its ``signatures`` extra, gguf), downloaded here for Python 3.12.

    python scripts/make_gpu_bundle.py             # then: device run, carry [".gpu-check"], command
    python scripts/check_gpu.py --all             # (see check_gpu.py)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import gguf

from lightning_gptq.checkpoint.gguf_export import copy_metadata

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BUNDLE = ROOT / ".gpu-check"
MODEL = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = {"wiki.test.raw": SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw",
         "wikipedia-vital-leads.txt": SHARED / "data" / "calibration" / "wikipedia-vital-leads.txt"}
WHEELS = ["jsonargparse==4.53.0", "docstring-parser", "typeshed-client", "gguf==0.19.0"]


def blocks_of(spec: str) -> list[int]:
    """``"0-2,21-29"`` → ``[0, 1, 2, 21, …, 29]``."""
    keep = []
    try:
        for part in spec.split(","):
            first, _, last = part.partition("-")
            keep += range(int(first), int(last or first) + 1)
    except ValueError:
        raise SystemExit(f"--keep {spec!r}: expected block numbers and ranges, e.g. 0-2,21-29") from None
    if not keep or sorted(set(keep)) != keep:
        raise SystemExit(f"--keep {spec!r}: blocks must be named once each, in increasing order")
    return keep


def truncate_gguf(src: Path, dst: Path, keep: list[int]) -> None:
    """Write ``src`` with only the blocks ``keep``, renumbered 0…len(keep)-1 (and every tensor outside the blocks)."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    total = reader.fields[f"{arch}.block_count"].contents()
    if keep[-1] >= total:
        raise SystemExit(f"{src.name} has {total} blocks; --keep names block {keep[-1]}")
    writer = gguf.GGUFWriter(dst, arch)
    copy_metadata(reader, writer, values={f"{arch}.block_count": len(keep)})
    renumber = {old: new for new, old in enumerate(keep)}
    for t in reader.tensors:
        name = t.name
        if name.startswith("blk."):
            _, index, rest = name.split(".", 2)
            if int(index) not in renumber:
                continue
            name = f"blk.{renumber[int(index)]}.{rest}"
        writer.add_tensor(name, t.data, raw_dtype=t.tensor_type)  # data: rows of bytes for quantized types
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", default="0-2,21-29", help="blocks kept, e.g. 0-2,21-29 (12 blocks fit the 64 MiB)")
    parser.add_argument("--eval-chars", type=int, default=400_000, help="characters of WikiText-2 test kept")
    args = parser.parse_args()
    (BUNDLE / "data").mkdir(parents=True, exist_ok=True)
    keep = blocks_of(args.keep)
    model = BUNDLE / f"SmolLM2-{len(keep)}of30blocks.gguf"
    truncate_gguf(MODEL, model, keep)
    for old in BUNDLE.glob("SmolLM2-*blocks.gguf"):  # check_gpu.py takes the one model in the bundle
        if old != model:
            old.unlink()
    for name, path in TEXTS.items():
        text = path.read_text()
        (BUNDLE / "data" / name).write_text(text[: args.eval_chars if name == "wiki.test.raw" else 1_500_000])
    wheels = BUNDLE / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "py", "--platform", "any", "-d", str(wheels), *WHEELS], check=True)
    size = sum(f.stat().st_size for f in BUNDLE.rglob("*") if f.is_file())
    print(f"{BUNDLE}: {size / 2**20:.1f} MiB ({model.name}: {model.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
