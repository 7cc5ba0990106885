"""The LM head's decode step on CPU, which GPTQ leaves in fp32.

At one row a dense head is a GEMV bound by reading its weight: SmolLM2's tied 49152×576 head is
113 MB per token. PyTorch's fp32 GEMV (MKL) read it at 6.6 GB/s on both threads of an AVX2 EPYC,
where a plain read of the same bytes ran at 17 GB/s, and took half of a quantized decode step.
:func:`speed_up_head` times that GEMV against our C++ one (``cpu_gemm.dense_gemv``) on the head's own
weight and, when ours is faster here, lets the head's calls of up to ``GemvHead.max_rows`` rows go
through it. The weight, its tie to the embeddings and the ``state_dict`` stay as they are.

:func:`int8_head` (an option, ``lm_head: int8``) goes further: the head computes with an int8 copy of its weight,
a quarter of the bytes, at a perplexity cost measured in ``docs/kernels.md``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gptq.kernels import cpu_gemm

from . import ops, timing

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
            y = ops.dense_gemv(x, w) if ops.tracing() else cpu_gemm.dense_gemv(x, w)
            return y if self.bias is None else y + self.bias
        return F.linear(x, w, self.bias)


class Int8Head(nn.Linear):
    """An ``nn.Linear`` that computes with an int8 copy of its weight, one fp32 step per output row
    (``step = max|w_row| / 127``, codes ``round(w / step)``): a quarter of the bytes an fp32 decode step reads.
    Calls of at most ``max_rows`` rows use ``cpu_gemm.int8_row_gemv`` (with AVX-512 VNNI it rounds its input to two
    int8 digits per run of 32, about 2⁻¹⁵ relative); longer ones multiply by the dequantized copy in slices of
    ``chunk`` rows, so a perplexity measures the same weights decoding uses. The fp32 weight
    stays (tied embeddings read it; ``state_dict`` and saved checkpoints are unchanged); the copy is a
    non-persistent buffer. Made by :func:`int8_head`."""

    max_rows = 4
    chunk = 8192

    def forward(self, x: Tensor) -> Tensor:
        q, step = self.int8_weight, self.int8_step
        if x.numel() <= self.max_rows * self.in_features and x.dtype == torch.float32 and x.device.type == "cpu":
            y = ops.int8_row_gemv(x, q, step) if ops.tracing() else cpu_gemm.int8_row_gemv(x, q, step)
        else:
            y = torch.cat([F.linear(x, q[i:i + self.chunk].to(x.dtype) * step[i:i + self.chunk, None].to(x.dtype))
                           for i in range(0, self.out_features, self.chunk)], dim=-1)
        return y if self.bias is None else y + self.bias


def int8_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(codes int8 [N, K], step fp32 [N])`` with ``weight ≈ codes * step[:, None]``: symmetric, one step per row."""
    w = weight.detach().float()
    step = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    return torch.round(w / step[:, None]).clamp_(-127, 127).to(torch.int8).contiguous(), step.contiguous()


def int8_head_unsupported(model: nn.Module, device: torch.device | str | None = None) -> str | None:
    """Why :func:`int8_head` cannot apply to ``model`` computing on ``device`` (default: where its head is), or
    None. Asked before any heavy work, so that a run is refused at once rather than after calibrating."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, Int8Head):
        return None
    if not isinstance(head, nn.Linear):
        return f"lm_head int8 needs the output head to be an nn.Linear, got {type(head).__name__}"
    device = torch.device(device) if device is not None else head.weight.device
    if device.type != "cpu":
        return f"lm_head int8 runs on CPU only (the model computes on {device})"
    reason = cpu_gemm.unavailable()
    return f"lm_head int8 needs the C++ CPU kernel: {reason}" if reason else None


@torch.no_grad()
def int8_head(model: nn.Module) -> str:
    """Switch ``model``'s output head (``get_output_embeddings()``, an ``nn.Linear`` on CPU) to :class:`Int8Head` in
    place; returns what was done, for the log. Needs the C++ kernel; raises ``ValueError`` when it cannot apply."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, Int8Head):
        return "LM head: already int8"
    reason = int8_head_unsupported(model)
    if reason:
        raise ValueError(reason)
    codes, step = int8_rows(head.weight)
    head.register_buffer("int8_weight", codes, persistent=False)
    head.register_buffer("int8_step", step, persistent=False)
    head.__class__ = Int8Head
    rel = ((codes.float() * step[:, None] - head.weight.float()).norm() / head.weight.float().norm()).item()
    return (f"LM head {head.out_features}x{head.in_features}: int8 rows ({codes.numel() / 2**20:.1f} MiB read per "
            f"decode step instead of {head.weight.numel() * head.weight.element_size() / 2**20:.1f}; "
            f"relative weight error {rel:.2e})")


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
