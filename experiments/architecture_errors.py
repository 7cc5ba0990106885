"""GPTQ against round-to-nearest on every tiny architecture of the tests (random init, 3 layers of width 32):
relative logit error on held-out token windows, 3-bit g16 act-order, 32 x 16 calibration tokens.

    python experiments/architecture_errors.py   (from the repository root; about a minute on 2 cores)

Random tiny models say that each architecture runs through the whole pipeline and that the solve uses its
Hessians; they say nothing about quality on a real checkpoint of that family.
"""

import logging
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import lightning_gptq as lg  # noqa: E402  (first: keeps the checkout's kernels/ from shadowing HF's)
from tiny_models import FACTORIES, MOE_FACTORIES, full_logits, token_ids  # noqa: E402


def main() -> None:
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    windows, held_out = token_ids(n=32, seqlen=16), token_ids(n=4, seqlen=16, seed=5)
    config = lg.QuantConfig(bits=3, group_size=16, act_order=True)
    print("| architecture | RTN | GPTQ | GPTQ / RTN |\n|---|---:|---:|---:|")
    for arch, factory in sorted({**FACTORIES, **MOE_FACTORIES}.items()):
        reference = full_logits(factory(), held_out)
        errors = []
        for method in ("rtn", "gptq"):
            model = lg.quantize(factory(), windows, config, method=method, accelerator="cpu",
                                true_sequential=arch in MOE_FACTORIES)
            errors.append(float((full_logits(model, held_out) - reference).norm() / reference.norm()))
        print(f"| {arch} | {errors[0]:.4f} | {errors[1]:.4f} | {errors[1] / errors[0]:.2f} |")


if __name__ == "__main__":
    main()
