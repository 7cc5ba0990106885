"""Where a fused decode step's time goes (``StaticDecoder(fused=True)``, int8 LM head): the whole step, its 30
``llama_decode_layer`` calls, the same layers' 120 packed matmuls alone (``packed_matmul`` with the step's arguments),
and the head; with the bytes the matmuls read per token, so the layers can be set against this machine's memory speed
(a 256 MB copy timed in the same run). Interleaved rounds, best of each.

    python experiments/fused_step_breakdown.py runs/rtn4/model --rounds 6
"""
import time

import torch
from decode_ab import PROMPT, load, parse_args

from lightning_gptq.models.decode import StaticDecoder

args = parse_args()
model = load(args.folder)
d = StaticDecoder(model, 200, fused=True)
step = d._fused
logits = d.prefill(PROMPT)
token = logits.argmax().reshape(1, 1)
ops = torch.ops.lightning_gptq
position = d.length

matmuls = []  # (x width, tensors, meta) for each of the 120 packed matmuls of a step
bytes_read = 0
for ln1, ln2, eps, scale, tensors, meta, dims in step.layers:
    heads, kv, hd, inter = dims
    widths = [ln1.numel(), heads * hd, ln1.numel(), inter]
    for i in range(4):
        perm, qweight, scales, zeros, bias = tensors[5 * i: 5 * i + 5]
        bits, group, n_out, kernel = meta[4 * i: 4 * i + 4]
        matmuls.append((torch.randn(1, widths[i]), (perm, qweight, scales, zeros, bias, bits, group, n_out, kernel)))
        bytes_read += sum(t.numel() * t.element_size() for t in (qweight, scales, zeros) if t is not None)
head_bytes = sum(t.numel() * t.element_size() for t in step.head.buffers())


def whole():
    step(token, position, d.cache)  # rewrites the same cache row each time: the same work as a real step


def layers():
    x = step.embed(token.reshape(1, 1))
    for (ln1, ln2, eps, scale, tensors, meta, dims), c in zip(step.layers, d.cache.layers):
        x = ops.llama_decode_layer(x, step.cos, step.sin, c.keys, c.values, c.cumulative_length, position, ln1, ln2,
                                   eps, scale, tensors, meta, dims)


def matmuls_alone():
    for x, a in matmuls:
        ops.packed_matmul(x, *a)


h = torch.randn(1, 1, model.config.hidden_size)


def head():
    step.head(h)


big = torch.empty(64 * 2**20)
dst = torch.empty_like(big)


def copy256():
    dst.copy_(big)


parts = {"step": whole, "layers": layers, "matmuls alone": matmuls_alone, "head": head, "256 MB copy": copy256}
best = {name: float("inf") for name in parts}
for _ in range(args.rounds):
    for name, fn in parts.items():
        fn()
        start = time.perf_counter()
        for _ in range(10):
            fn()
        best[name] = min(best[name], (time.perf_counter() - start) / 10 * 1e3)
gbs = 2 * big.numel() * 4 / best["256 MB copy"] / 1e6
print(f"{torch.get_num_threads()} threads; copy {gbs:.1f} GB/s (read + write)")
for name, ms in best.items():
    extra = ""
    if name == "matmuls alone":
        extra = f" ({bytes_read / 2**20:.1f} MiB: {bytes_read / ms / 1e6:.1f} GB/s)"
    if name == "head":
        extra = f" ({head_bytes / 2**20:.1f} MiB: {head_bytes / ms / 1e6:.1f} GB/s)"
    print(f"{name}: {ms:.3f} ms{extra}")
print(f"layers beyond their matmuls: {best['layers'] - best['matmuls alone']:.3f} ms; "
      f"step beyond layers + head: {best['step'] - best['layers'] - best['head']:.3f} ms")
