"""Which weights should a group's grid be fitted on when the group starts inside a block?

``QuantConfig.group_grid``: ``"updated"`` (every column quantized so far) or ``"block-start"``
(the reference code's rule: the weights as the current block began). They differ only for
``group_size < block_size``. This measures both on the same layer problems, by the output error on
held-out inputs, ``‖(W − Q)Xᵀ‖² / ‖WXᵀ‖²``, and prints the ratio updated / block-start (< 1: updated
is better), as a geometric mean over layers (or seeds).

    python experiments/group_grid_rule.py --synthetic     # 256x512 problems with outlier channels, 6 seeds
    python experiments/group_grid_rule.py --real          # SmolLM2 layers from ../shared, fp model inputs

Real problems: the inputs of every linear in a few blocks of the full-precision model, on
calibration windows of ``wikipedia-vital-leads.txt`` (seed 0) for the Hessian and on *other*
windows of the same file (seed 1, not used for the Hessian) for the error: no reported evaluation
text is involved.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict
from pathlib import Path

import torch

from lightning_gptq import HessianAccumulator, QuantConfig, gptq_quantize

SHARED = Path(__file__).resolve().parents[2] / "shared"


def output_error(weight: torch.Tensor, quantized: torch.Tensor, x: torch.Tensor) -> float:
    return ((weight - quantized) @ x.T).square().sum().item() / (weight @ x.T).square().sum().item()


def compare(weight, hessian, x_test, bits, group_size, act_order) -> float:
    errors = {}
    for rule in ("updated", "block-start"):
        config = QuantConfig(bits=bits, group_size=group_size, sym=False, act_order=act_order, group_grid=rule)
        errors[rule] = output_error(weight, gptq_quantize(weight, hessian, config).dequantize(), x_test)
    return errors["updated"] / errors["block-start"]


def synthetic(seed: int, rows: int = 256, cols: int = 512, tokens: int = 4096):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols // 4, cols, generator=gen)
    gain = torch.ones(cols)
    gain[torch.randperm(cols, generator=gen)[: cols // 64]] = 20.0  # outlier channels

    def inputs(n):
        return ((torch.randn(n, cols // 4, generator=gen) @ mix) / math.sqrt(cols // 4)
                + 0.3 * torch.randn(n, cols, generator=gen)) * gain

    x_cal, x_test = inputs(tokens), inputs(tokens)
    acc = HessianAccumulator(cols)
    acc.add(x_cal)
    return torch.randn(rows, cols, generator=gen) * 0.02, acc.hessian, x_test


def real_problems(blocks: list[int], nsamples: int, seqlen: int, model_path: str, text: str):
    from lightning_gptq.data import calibration_windows
    from lightning_gptq.models import get_adapter, load_causal_lm

    model, tokenizer = load_causal_lm(model_path)
    both = calibration_windows(text, tokenizer, nsamples=2 * nsamples, seqlen=seqlen, seed=0)
    cal, test = both[:nsamples], both[nsamples:]  # disjoint windows of one draw
    adapter = get_adapter(model)
    layers = {f"{b}.{n}": m for b in blocks for n, m in adapter.linear_layers(adapter.blocks(model)[b]).items()}
    captured: dict[str, list[torch.Tensor]] = defaultdict(list)
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: captured[name].append(inp[0].reshape(-1, inp[0].shape[-1])))
             for name, m in layers.items()]
    problems = {}
    with torch.no_grad():
        for split, windows in (("cal", cal), ("test", test)):
            for w in windows:
                model(w[None])
            for name in layers:
                problems.setdefault(name, {})[split] = torch.cat(captured.pop(name))
    for h in hooks:
        h.remove()
    for name, m in layers.items():
        acc = HessianAccumulator(m.in_features)
        acc.add(problems[name]["cal"])
        yield name, m.weight.detach().clone(), acc.hessian, problems[name]["test"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--real", action="store_true")
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20, 29])
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--model", default=str(SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"), help="for --real")
    parser.add_argument("--calibration", default=str(SHARED / "data" / "calibration" / "wikipedia-vital-leads.txt"),
                        help="for --real: the text both window sets are drawn from")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.synthetic:
        print("synthetic 256x512, outlier channels, 6 seeds; ratio updated / block-start (geometric mean)")
        for bits in (2, 3, 4):
            for act_order in (False, True):
                cells = []
                for g in (32, 64, 128):
                    ratios = [compare(*synthetic(seed), bits, g, act_order) for seed in range(6)]
                    cells.append(f"g{g} {math.exp(sum(map(math.log, ratios)) / len(ratios)):.4f}")
                print(f"  {bits}-bit act-order {act_order!s:>5}: " + "  ".join(cells), flush=True)
    if args.real:
        start = time.perf_counter()
        problems = list(real_problems(args.blocks, args.nsamples, args.seqlen, args.model, args.calibration))
        print(f"SmolLM2 blocks {args.blocks}: {len(problems)} layers, Hessians on {args.nsamples}x{args.seqlen} tokens, "
              f"error on {args.nsamples}x{args.seqlen} other tokens ({time.perf_counter() - start:.0f} s to capture); "
              f"ratio updated / block-start: geometric mean [min, max] over layers")
        for bits in (2, 3, 4):
            for act_order in (False, True):
                cells = []
                for g in (32, 64, 128):
                    ratios = [compare(w, h, x, bits, g, act_order) for _, w, h, x in problems]
                    gm = math.exp(sum(map(math.log, ratios)) / len(ratios))
                    cells.append(f"g{g} {gm:.4f} [{min(ratios):.3f}, {max(ratios):.3f}]")
                print(f"  {bits}-bit act-order {act_order!s:>5}: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
