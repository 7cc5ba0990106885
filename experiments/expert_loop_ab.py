"""One decode step's MoE bank (1 token, top-8 of 128 experts, SmolLM2-like widths): looping over every expert
(what ExpertBank did first) against only the chosen ones (now). Interleaved rounds, best of each.

    python experiments/expert_loop_ab.py
"""

import time

import torch
from torch import nn

from lightning_gptq.models.experts import ExpertBank, ExpertMLP


def every_expert(bank, hidden, index, weights):
    out, chosen = torch.zeros_like(hidden), index.t()
    for e, expert in enumerate(bank):
        slot, token = torch.where(chosen == e)
        if token.numel() == 0:
            continue
        out.index_add_(0, token, expert(hidden[token]) * weights[token, slot, None])
    return out


def main(experts: int = 128, k: int = 8, hidden: int = 576, inter: int = 256, rounds: int = 5, calls: int = 200):
    torch.manual_seed(0)
    bank = ExpertBank([ExpertMLP(hidden, inter, nn.SiLU()) for _ in range(experts)]).eval()
    x = torch.randn(1, hidden)
    index, weights = torch.randperm(experts)[:k][None], torch.rand(1, k)
    with torch.no_grad():
        assert torch.equal(bank(x, index, weights), every_expert(bank, x, index, weights))
        best = {"every expert": float("inf"), "chosen only": float("inf")}
        for _ in range(rounds):
            for name, fn in (("every expert", lambda: every_expert(bank, x, index, weights)),
                             ("chosen only", lambda: bank(x, index, weights))):
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                best[name] = min(best[name], (time.perf_counter() - start) / calls * 1e6)
    for name, us in best.items():
        print(f"{name:14s} {us:8.1f} µs per bank call")
    print(f"ratio {best['every expert'] / best['chosen only']:.2f}x")


if __name__ == "__main__":
    main()
