"""PyTorch's int4 CPU matmul (``aten._weight_int4pack_mm_for_cpu``) over GPTQ codes.

The kernel computes ``x @ Wᵀ`` with ``W[n, k] = (q[n, k] − 8) · s[g, n] + z'[g, n]`` for bf16 ``x``,
4-bit ``q`` in its own blocked layout, and ``(s, z')`` in bf16 per group of ``kernel_group`` input
columns (32, 64, 128 or 256). A GPTQ grid ``s · (q − z)`` is the same line with ``z' = s · (8 − z)``,
and a 2- or 3-bit code is a valid 4-bit code, so every GPTQ weight with ``bits ≤ 4`` maps exactly
onto it, up to bf16 rounding of ``s``, ``z'`` and the activations.

The blocked layout (torch 2.5+ CPU): blocks of 64 output rows; within a block, for each input
column ``k``, 32 bytes whose low nibbles hold rows 0–31 and high nibbles rows 32–63. The layout is
torch's private detail, so :func:`is_available` checks it once by a round trip and the backend
stays off when it changed.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

KERNEL_GROUPS = (256, 128, 64, 32)
ROW_BLOCK = 64  # output rows per block of the packed layout


def _op(name: str):
    return getattr(torch.ops.aten, name, None)


@functools.cache
def is_available() -> bool:
    """The ops exist and our reading of the packed layout matches what torch writes."""
    if _op("_convert_weight_to_int4pack_for_cpu") is None or _op("_weight_int4pack_mm_for_cpu") is None:
        return False
    try:
        codes = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        return torch.equal(unpack(pack(codes), 128, 64), codes)
    except (RuntimeError, NotImplementedError):
        return False


def pack(codes: Tensor) -> Tensor:
    """uint8/int codes [N, K] in ``[0, 16)`` → the kernel's packed weight (N a multiple of 64, K of 32)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)


def unpack(packed: Tensor, n: int, k: int) -> Tensor:
    """Inverse of :func:`pack`: → uint8 [N, K]."""
    b = packed.reshape(n // ROW_BLOCK, k, 32)
    nibbles = torch.stack([b & 0xF, b >> 4], dim=2)  # [row block, k, half, 32]
    return nibbles.permute(0, 2, 3, 1).reshape(n, k)


def kernel_group(group_size: int, in_features: int) -> int | None:
    """The kernel's group width for a GPTQ group size (-1: one group per row), or None if none fits.

    It must divide the GPTQ group (scales are repeated across the kernel groups inside it). Among
    those, the one that needs the least zero-padding of the input dimension wins, then the widest:
    SmolLM2's 576 columns at g128 take 64 (no padding) rather than 128 (padded to 640).
    """
    fits = [g for g in KERNEL_GROUPS if group_size == -1 or group_size % g == 0]
    if not fits:
        return None
    return min(fits, key=lambda g: (-(-in_features // g) * g, -g))


def scales_and_zeros(scales: Tensor, zeros: Tensor) -> Tensor:
    """Kernel ``[n_groups, N, 2]`` bf16 from GPTQ ``scales`` [n_groups, N] and true zero codes."""
    s = scales.float()
    return torch.stack([s, s * (8 - zeros.float())], dim=-1).to(torch.bfloat16).contiguous()


def matmul(x: Tensor, packed: Tensor, group: int, sz: Tensor) -> Tensor:
    """``x`` bf16 [M, K] → bf16 [M, N]."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)
