"""Write a quantized folder as one GGUF file for llama.cpp, code for code.

    python -m lightning_gptq.export_gguf runs/smollm2-135m/lightning_logs/version_0/quantized/model smollm2-gptq.gguf
    python -m lightning_gptq.export_gguf <folder> <out.gguf> --template <the original model as .gguf>

The template gives the metadata (tokenizer, chat template, hyper-parameters) and the tensors GPTQ left alone; a
folder ``fit`` made from a ``.gguf`` file names it (``meta.lightning_gptq``), so ``--template`` is optional then.
Which layers GGUF holds exactly, and how: ``lightning_gptq.checkpoint.gguf_export``. Exits 2 with one line on a
user error (no template, a layer GGUF cannot hold, a template of another model).
"""

from __future__ import annotations

import argparse
import os
import sys

from ._unshadow import import_hf_kernels_first

import_hf_kernels_first()

from lightning_gptq.checkpoint import CheckpointError, is_quantized_checkpoint, load_quantized  # noqa: E402
from lightning_gptq.checkpoint.gguf_export import default_template, save_gguf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_gptq.export_gguf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a quantized folder (GPTQ or compressed-tensors layout)")
    parser.add_argument("output", help="the .gguf file to write")
    parser.add_argument("--template", help="the original model as GGUF (default: the .gguf the folder was fit from)")
    parser.add_argument("--no-verify", action="store_true", help="skip reading the file back against the layers")
    args = parser.parse_args(argv)
    try:
        if not os.path.isdir(os.path.expanduser(args.folder)):
            raise CheckpointError(f"{args.folder}: no such folder" if not os.path.exists(os.path.expanduser(args.folder))
                                  else f"{args.folder} is a file: give the quantized folder")
        if not is_quantized_checkpoint(args.folder):
            raise CheckpointError(f"{args.folder} is not a quantized checkpoint folder (no GPTQ or compressed-tensors "
                                  "config.json): give the folder fit wrote, <output_dir>/model")
        template = args.template or default_template(args.folder)
        if template is None:
            raise CheckpointError(f"{args.folder} names no .gguf source that exists here: pass --template with the "
                                  "original model as GGUF (llama.cpp's convert_hf_to_gguf.py writes one)")
        model, _ = load_quantized(args.folder, backend="torch")
        report = save_gguf(model, args.output, template, verify=not args.no_verify)
    except (CheckpointError, OSError) as err:  # OSError: a path that cannot be read or written
        print(f"error: {err}", file=sys.stderr)
        return 2
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(report.types.items()))
    print(f"wrote {report.path} ({report.bytes / 2**20:.1f} MiB): {kinds} layers; {report.copied} tensors copied from "
          f"{template}" + (f", {len(report.rewritten)} rewritten as F32" if report.rewritten else "")
          + ("" if args.no_verify else f"; read back: every layer within {report.fp16_error:.2g} grid steps "
                                       "of its weight (fp16 scales)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
