"""Where a calibration pass's time goes on one SmolLM2 block: the forward alone, with the reference's
per-linear Hessian hooks, with HessianCapture (shared Hessians, early stop, probe), in fp32 and bf16.

    python experiments/pass_profile.py --nsamples 4 --seqlen 2048
"""
import argparse
import time
from pathlib import Path

import torch

from lightning_gptq.models import capture_block_inputs, get_adapter, load_causal_lm, run_block
from lightning_gptq.data import calibration_windows  # noqa: F401  (documents where windows come from)
from lightning_gptq.lightning.datamodule import CalibrationDataModule
from lightning_gptq.quant import HessianAccumulator

SHARED = Path(__file__).resolve().parents[2] / "shared"
p = argparse.ArgumentParser()
p.add_argument("--nsamples", type=int, default=4)
p.add_argument("--seqlen", type=int, default=2048)
p.add_argument("--block", type=int, default=10)
args = p.parse_args()
torch.set_grad_enabled(False)
lm, tok = load_causal_lm(str(SHARED / "models"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
dm = CalibrationDataModule(calibration=str(SHARED / "data/calibration/wikipedia-vital-leads.txt"),
                           nsamples=args.nsamples, seqlen=args.seqlen, seed=0, eval_datasets=[])
windows = dm.calibration_windows(tok)
adapter = get_adapter(lm)
inputs = capture_block_inputs(lm, adapter, windows, batch_size=1)
block = adapter.blocks(lm)[args.block]
hidden = inputs.hidden
kw = [inputs.kwargs_for(args.block, j) for j in range(len(hidden))]


def timed(label, fn, repeat=2):
    fn()
    best = float("inf")
    for _ in range(repeat):
        s = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - s)
    print(f"{label:55s} {best / len(hidden) * 1e3:8.1f} ms/window")
    return best


def passes():
    for h, k in zip(hidden, kw):
        run_block(block, h, k)


timed("forward fp32", passes)
linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
accs = {}
hooks = [m.register_forward_hook(lambda mod, i, o, n=n: accs.setdefault(n, HessianAccumulator(mod.in_features)).add(i[0]))
         for n, m in linears.items()]
timed("forward + 7 per-linear Hessians (reference hooks)", passes)
for h in hooks:
    h.remove()
x = hidden[0].reshape(-1, hidden[0].shape[-1])
for d in (576, 1536):
    xx = torch.randn(x.shape[0], d)
    a = HessianAccumulator(d)
    s = time.perf_counter(); [a.add(xx) for _ in range(3)]
    print(f"Hessian product {d}: {(time.perf_counter() - s) / 3 * 1e3:.1f} ms/window")
from lightning_gptq.models.attention_probe import attention_layers, probe_attention
with probe_attention(attention_layers(block), lambda *a: None, first=1):
    timed("forward fp32 + attention probe", passes)
saved = {n: t.data for n, t in block.named_parameters()}
for n, t in block.named_parameters():
    t.data = t.data.bfloat16()
kwb = [{k: (v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else
            tuple(x.bfloat16() for x in v) if isinstance(v, tuple) and all(torch.is_tensor(x) for x in v) else v)
        for k, v in kk.items()} for kk in kw]
hb = [h.bfloat16() for h in hidden]


def passes_bf16():
    for h, k in zip(hb, kwb):
        run_block(block, h, k)


timed("forward bf16", passes_bf16)
out16 = run_block(block, hb[0], kwb[0]).float()
for n, t in block.named_parameters():
    t.data = saved[n]
out32 = run_block(block, hidden[0], kw[0])
print("bf16 vs fp32 block output, max error / max |output|:",
      ((out16 - out32).abs().max() / out32.abs().max()).item())
