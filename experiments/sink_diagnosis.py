"""Where do quantized models go wrong: the first position of each window (the attention sink) or the rest?

For each saved model and each layer type (q/k/v/o/gate/up/down), the relative output error
``‖(W − Ŵ)X‖² / ‖WX‖²`` over all blocks, with ``X`` the full-precision model's inputs on calibration
windows, split into position 0 and positions 1..seqlen-1. Then, for every ordered pair of models,
the perplexity of model A with its k/v projections taken from model B.

    python experiments/sink_diagnosis.py runs/rtn/model runs/gptq/model --windows 4

Plain GPTQ weighs position 0 as 1 token in seqlen, so its k/v error there can be many times RTN's
while its error on the other positions is far lower; every later token reads that position's
keys and values. ``hessian.sink_weight`` is the remedy (docs/sink-rule.md).
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import torch
from _saved_models import parse_and_load, parser_for

from lightning_gptq.checkpoint import load_quantized
from lightning_gptq.data.evaluation import perplexity
from lightning_gptq.models import get_adapter
from lightning_gptq.models.adapters import weight_out_in
from lightning_gptq.nn import QuantLinear, replace_submodule


def split_hessians(model, adapter, windows):
    """Per block linear: (``x₀x₀ᵀ`` summed over windows, ``Σ_{t≥1} x_t x_tᵀ``), fp64."""
    path = {id(m): n for n, m in model.named_modules()}
    names = [f"{path[id(block)]}.{n}" for block in adapter.blocks(model) for n in adapter.linear_layers(block)]
    first, rest = defaultdict(float), defaultdict(float)

    def hook(name):
        def record(module, args, output):
            x = args[0].detach().double()  # [batch, seq, in]
            first[name] = first[name] + torch.einsum("bi,bj->ij", x[:, 0], x[:, 0])
            rest[name] = rest[name] + torch.einsum("bti,btj->ij", x[:, 1:], x[:, 1:])
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for window in windows:
                model(input_ids=window[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: (first[n], rest[n]) for n in names}


def relative_error(weight, qweight, hessian):
    delta = (weight - qweight).double()
    return (torch.einsum("oi,ij,oj->", delta, hessian, delta) / torch.einsum("oi,ij,oj->", weight.double(), hessian, weight.double())).item()


def main() -> None:
    args, base, windows = parse_and_load(parser_for(__doc__, windows=4, allow_fp32=False))
    adapter = get_adapter(base)
    hessians = split_hessians(base, adapter, windows)
    quantized = {m: load_quantized(m)[0] for m in args.models}

    print(f"relative output error, summed over blocks; X from the fp model on {args.windows} windows of {args.seqlen}")
    print(f"{'layer':10s} " + " ".join(f"{'pos 0':>10s} {'pos 1..':>10s}" for _ in args.models) + "   (" + ", ".join(args.models) + ")")
    for kind in sorted({n.rsplit(".", 1)[-1] for n in hessians}):
        cells = []
        for m, model in quantized.items():
            err = [0.0, 0.0]
            for name, (h0, hr) in hessians.items():
                if name.rsplit(".", 1)[-1] != kind:
                    continue
                w, q = weight_out_in(base.get_submodule(name)), model.get_submodule(name)
                assert isinstance(q, QuantLinear), name
                deq = q.dequantize()
                err[0] += relative_error(w, deq, h0)
                err[1] += relative_error(w, deq, hr)
            cells.append(f"{err[0]:10.3g} {err[1]:10.3g}")
        print(f"{kind:10s} " + " ".join(cells))

    tokens = windows.reshape(1, -1)
    for m, model in quantized.items():
        ppl = perplexity(model, tokens, seqlen=args.seqlen, dataset="calibration", progress=False).ppl
        print(f"{m}: perplexity on those windows {ppl:.4f}", flush=True)
    for a, b in itertools.permutations(args.models, 2):
        model = load_quantized(a)[0]
        for name in hessians:
            if name.rsplit(".", 1)[-1] in ("k_proj", "v_proj"):
                replace_submodule(model, name, quantized[b].get_submodule(name))
        ppl = perplexity(model, tokens, seqlen=args.seqlen, dataset="calibration", progress=False).ppl
        print(f"{a} with k_proj/v_proj from {b}: {ppl:.4f}", flush=True)


if __name__ == "__main__":
    main()
