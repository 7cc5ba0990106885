"""The LM head's decode step on CPU, which GPTQ leaves in fp32.

At one row a dense head is a GEMV bound by reading its weight: SmolLM2's tied 49152×576 head is
113 MB per token. PyTorch's fp32 GEMV (MKL) read it at 6.6 GB/s on both threads of an AVX2 EPYC,
where a plain read of the same bytes ran at 17 GB/s, and took half of a quantized decode step.
:func:`speed_up_head` times that GEMV against our C++ one (``cpu_gemm.dense_gemv``) on the head's own
weight and, when ours is faster here, lets the head's calls of up to ``GemvHead.max_rows`` rows go
through it. The weight, its tie to the embeddings and the ``state_dict`` stay as they are.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gptq.kernels import cpu_gemm

from . import timing

log = logging.getLogger("lightning_gptq")

#: our GEMV must beat ``F.linear`` by this factor to be used (a margin over timing noise)
MARGIN = 1.1


class GemvHead(nn.Linear):
    """An ``nn.Linear`` whose fp32 CPU calls of at most ``max_rows`` rows use ``cpu_gemm.dense_gemv``: the same
    result up to fp32 summation order. Other calls, and training, go through ``F.linear``."""

    max_rows = 4

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (x.numel() <= self.max_rows * self.in_features and x.dtype == torch.float32 and w.dtype == torch.float32
                and x.device.type == "cpu" and w.device.type == "cpu" and w.is_contiguous()
                and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):
            y = cpu_gemm.dense_gemv(x, w)
            return y if self.bias is None else y + self.bias
        return F.linear(x, w, self.bias)


@torch.no_grad()
def speed_up_head(model: nn.Module) -> str:
    """Switch ``model``'s output head (``get_output_embeddings()``, a plain fp32 ``nn.Linear`` on CPU) to
    :class:`GemvHead` in place when our GEMV, timed here on the head's weight at one row, beats ``F.linear`` by
    ``MARGIN``. Returns what was decided, for the log."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, GemvHead):
        return "LM head: already on our GEMV"
    if type(head) is not nn.Linear:
        return "LM head: not a plain nn.Linear; left as it is"
    w = head.weight
    if w.device.type != "cpu" or w.dtype != torch.float32 or not w.is_contiguous():
        return f"LM head: {w.dtype} on {w.device.type}; left on F.linear"
    reason = cpu_gemm.unavailable()
    if reason:
        return f"LM head: left on F.linear ({reason})"
    x = torch.randn(1, head.in_features)
    ours = min(timing.time_call(lambda: cpu_gemm.dense_gemv(x, w), min_reps=1) for _ in range(3))
    theirs = min(timing.time_call(lambda: F.linear(x, w), min_reps=1) for _ in range(3))
    verdict = (f"LM head {head.out_features}x{head.in_features} at 1 row: our GEMV {ours * 1e3:.2f} ms, "
               f"F.linear {theirs * 1e3:.2f} ms")
    if theirs > MARGIN * ours:
        head.__class__ = GemvHead  # same module, same parameters and ties: only forward changes
        return verdict + f" ({theirs / ours:.2f}x): calls of up to {GemvHead.max_rows} rows use our GEMV"
    return verdict + ": left on F.linear"
