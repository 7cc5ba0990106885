"""Which torch.compile settings make the decode step fastest here? SmolLM2 4-bit (round-to-nearest codes),
int8 LM head, ``StaticDecoder``'s step compiled with: dynamo's guards kept (``base``), guards on nn modules
skipped (``nnguard``), no guards (``noguard``: what StaticDecoder does), inductor's C++ wrapper (``cpp``), both
(``cpp-noguard``). One variant per process (a fresh dynamo); ms/token of 5 runs of 32 steps, sorted.

    for v in base nnguard noguard cpp cpp-noguard; do python experiments/compile_options.py $v; done
"""
import sys
import time
from pathlib import Path

import torch

from lightning_gptq import QuantConfig, quantize
from lightning_gptq.models.decode import StaticDecoder
from lightning_gptq.nn import int8_head

variant = sys.argv[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
model = quantize(str(SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"), torch.randint(0, 1000, (1, 16)),
                 QuantConfig(bits=4, group_size=128, sym=False), method="rtn")
torch.set_grad_enabled(False)
model.requires_grad_(False).eval()
int8_head(model)
ids = torch.randint(0, 49152, (1, 128), generator=torch.Generator().manual_seed(0))
decoder = StaticDecoder(model, 200, compiled=False)
options = {"cpp_wrapper": "cpp" in variant}
if "nnguard" in variant:
    options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
if "noguard" in variant:
    options["guard_filter_fn"] = torch.compiler.skip_all_guards_unsafe
decoder._step = torch.compile(decoder._forward, fullgraph=True, dynamic=False, options=options)


def run() -> float:
    logits = decoder.prefill(ids)
    start = time.perf_counter()
    for _ in range(32):
        logits = decoder.step(int(logits.argmax()))
    return (time.perf_counter() - start) / 32 * 1e3


start = time.perf_counter()
run()
print(variant, f"first run (compiles) {time.perf_counter() - start:.1f} s; ms/token",
      sorted(round(run(), 2) for _ in range(5)), flush=True)
