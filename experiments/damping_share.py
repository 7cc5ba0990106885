"""How much of each linear's Hessian the first position of a window is, and what that does to GPTQ's damping.

GPTQ damps with ``λ = damp · mean(diag H)``. Where one token's input is huge in a few channels (SmolLM2's
position 0 at ``down_proj``), ``mean(diag H)`` is that token's, and ``λ`` can exceed most channels' own
``H_jj``: there the solve barely moves the other columns (it tends to round to nearest). Per block, over
``--windows`` windows of the full-precision model (drawn from the calibration file with seed 0):

- ``pos0``: the share of ``tr H`` from position 0;
- ``λ/med``: ``λ`` over the median ``H_jj`` (damp 0.01), with and without position 0 in ``H``;
- ``under λ``: the share of channels with ``H_jj < λ``.

    python experiments/damping_share.py --windows 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lightning_gptq.data.calibration import calibration_windows
from lightning_gptq.models import get_adapter, load_causal_lm

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models"))
    parser.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--calibration", default=str(SHARED / "data" / "calibration" / "wikipedia-vital-leads.txt"))
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--layers", nargs="+", default=["q_proj", "o_proj", "up_proj", "down_proj"])
    args = parser.parse_args()
    model, tokenizer = load_causal_lm(args.model, gguf_file=args.gguf_file or None)
    windows = calibration_windows(args.calibration, tokenizer, nsamples=args.windows, seqlen=args.seqlen)
    adapter = get_adapter(model)
    sums: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for b, block in enumerate(adapter.blocks(model)):
        for name, layer in adapter.linear_layers(block).items():
            short = name.rsplit(".", 1)[-1]
            if short not in args.layers:
                continue

            def hook(module, inputs, b=b, short=short):
                x = inputs[0].double().reshape(-1, inputs[0].shape[-1])
                first = inputs[0][:, 0].double()
                total, lead = sums.setdefault((b, short), [0, 0])
                sums[(b, short)] = [total + x.T @ x, lead + first.T @ first]
            handles.append(layer.register_forward_pre_hook(hook))
    with torch.no_grad():
        for window in windows:
            model(window[None])
    for h in handles:
        h.remove()
    print(f"{args.windows} windows of {args.seqlen}, damp {args.damp}")
    print("| block | layer | pos0 share of tr H | λ/median H_jj | under λ | without pos 0: λ/median | under λ |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for (b, short), (total, lead) in sorted(sums.items()):
        row = [f"{b}", short, f"{lead.trace() / total.trace():.3f}"]
        for h in (total, total - lead):
            d = h.diagonal()
            lam = args.damp * d.mean()
            row += [f"{lam / d.median():.2f}", f"{(d < lam).double().mean():.2f}"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
