"""Resident memory against the bytes of live tensors during a small SmolLM2 fit (every 20 stages).

Tells a leak (live tensors grow) from allocator retention (resident memory grows while live tensors
do not): ``python experiments/live_tensors_vs_rss.py [--model FOLDER] [--calibration TEXT]``.
"""
import argparse
import gc
import os
from collections import Counter
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


def live() -> tuple[int, Counter]:
    """Bytes of every distinct tensor storage the garbage collector can see, and per (dtype, shape)."""
    seen, kinds = {}, Counter()
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and not o.is_meta:
            storage = o.untyped_storage()
            if storage.data_ptr() not in seen:
                seen[storage.data_ptr()] = storage.nbytes()
                kinds[(str(o.dtype), tuple(o.shape)[:3])] += storage.nbytes()
    return sum(seen.values()), kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(SHARED / "models"))
    parser.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--calibration", default=str(SHARED / "data" / "calibration" / "wikipedia-vital-leads.txt"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lightning_gptq as lg
    import lightning_gptq.lightning.module as module
    from lightning_gptq.lightning.plan import resident_bytes
    from lightning_gptq.models import load_causal_lm

    start = module.GPTQModule.on_train_epoch_start

    def report(self):
        if self.current_epoch % 20 == 0:
            total, _ = live()
            print(f"stage {self.current_epoch}: resident {resident_bytes() >> 20} MiB, live tensors {total >> 20} MiB",
                  flush=True)
        return start(self)

    module.GPTQModule.on_train_epoch_start = report
    lm, tokenizer = load_causal_lm(args.model, gguf_file=args.gguf_file or None)
    lg.quantize(lm, args.calibration, lg.QuantConfig(bits=4, group_size=128, sym=False, act_order=True),
                tokenizer=tokenizer, nsamples=2, seqlen=128, accelerator="cpu", backend="torch")
    total, _ = live()
    print(f"end: resident {resident_bytes() >> 20} MiB, live tensors {total >> 20} MiB")


if __name__ == "__main__":
    main()
