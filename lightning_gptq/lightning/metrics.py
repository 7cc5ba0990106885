"""The paper's perplexity as a torchmetrics metric (GPTQ-REFERENCE.md §3)."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric

from lightning_gptq.data.evaluation import window_nll


class ProtocolPerplexity(Metric):
    """``exp(Σ nll_w / (n_windows · seqlen))`` where ``nll_w`` is a window's mean shifted cross-entropy
    times ``seqlen``: exactly ``lightning_gptq.data.perplexity`` when fed the same windows."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, bos: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bos = bos  # logits come from the windows with BOS put first (``with_bos``)
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, input_ids: torch.Tensor) -> None:
        """``logits`` [b, seqlen, vocab] for windows ``input_ids`` [b, seqlen]."""
        self.update_nll(window_nll(logits, input_ids, bos=self.bos), input_ids)

    def update_nll(self, nll: torch.Tensor, input_ids: torch.Tensor) -> None:
        """The windows' protocol terms ``nll`` [b] (``window_nll``, or ``model_window_nll``: no whole-window logits)."""
        self.nll_sum += nll.double().sum()
        self.tokens += input_ids.numel()

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll_sum / self.tokens)

    @staticmethod
    def from_sum(nll_sum: float, tokens: int) -> float:
        return math.exp(nll_sum / tokens)
