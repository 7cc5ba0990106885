"""PyTorch's int4 CUDA matmul (``aten._weight_int4pack_mm``, the "tinygemm" kernel) over GPTQ codes.

The kernel computes ``x @ Wᵀ`` for bf16 ``x`` with ``W[n, k] = (q[n, k] − 8) · s[g, n] + z'[g, n]``,
4-bit ``q`` in its own tiled layout and ``(s, z')`` bf16 per group of ``group`` input columns (32, 64,
128 or 256) — the same line as the CPU kernel (``cpu_int4``), so a GPTQ grid maps onto it with
``z' = s · (8 − z)`` and 2/3-bit codes are valid 4-bit codes.

Its input is the codes two per byte, ``uint8 [N, K/2]``, column ``2i`` in the high nibble and ``2i+1``
in the low one; ``inner_k_tiles`` (2, 4 or 8) sets the tiling and asks ``K`` to be a multiple of
``16 · inner_k_tiles``, ``N`` of 8. It writes ``int32 [N/8, K/(16·t), 32, t/2]``: one tile of 8 rows
× 16·t columns per ``[32, t/2]`` slice, its codes in an order private to torch. That order is not
assumed: :func:`tile_order` learns it from the kernel itself (packing each digit of the codes'
positions as codes), :func:`unpack` reads codes back with it (for saving, and for the dense paths),
and :func:`unavailable` checks the whole round trip and a product once on the GPU. Needs sm80+.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

KERNEL_GROUPS = (256, 128, 64, 32)
INNER_K_TILES = (8, 4, 2)
ROW_MULTIPLE = 8  # output rows: the kernel's n tile


def _convert_op(w: Tensor, inner_k_tiles: int) -> Tensor:
    return torch.ops.aten._convert_weight_to_int4pack(w, inner_k_tiles)


def _mm_op(x: Tensor, packed: Tensor, group: int, sz: Tensor) -> Tensor:
    return torch.ops.aten._weight_int4pack_mm(x, packed, group, sz)


def _ops():
    return getattr(torch.ops.aten, "_convert_weight_to_int4pack", None), getattr(torch.ops.aten, "_weight_int4pack_mm", None)


@functools.cache
def unavailable(device_index: int = 0) -> str | None:
    """Why the kernel cannot run here, or None: CUDA, sm80+, the ops, and our reading of their layout."""
    convert, mm = _ops()
    if convert is None or mm is None:
        return "this torch has no _weight_int4pack_mm"
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return "needs an NVIDIA CUDA GPU"
    if torch.cuda.get_device_capability(device_index) < (8, 0):
        return "needs an sm80+ GPU (Ampere or newer)"
    try:
        return check_layout(torch.device("cuda", device_index))
    except (RuntimeError, NotImplementedError) as error:
        return f"the int4 kernel failed a round trip: {error}"


def check_layout(device: torch.device) -> str | None:
    """None when, for every tiling, codes unpack to what was packed and the kernel's product equals the
    dense one computed from those codes; else what failed."""
    gen = torch.Generator().manual_seed(0)
    for t in INNER_K_TILES:
        n, k, group = 24, 16 * t * 3, 32
        codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8).to(device)
        packed = pack(codes, t)
        if not torch.equal(unpack(packed, n, k, t), codes):
            return f"the int4 kernel's layout (inner_k_tiles {t}) is not the one this backend learned"
        scales = torch.rand(k // group, n, generator=gen).to(device) / 8 + 0.01
        zeros = torch.randint(0, 16, (k // group, n), generator=gen).to(device)
        x = torch.randn(3, k, generator=gen).to(device, torch.bfloat16)
        w = (codes.float() - zeros.repeat_interleave(group, 0).T) * scales.repeat_interleave(group, 0).T
        y, ref = matmul(x, packed, group, scales_and_zeros(scales, zeros)).float(), x.float() @ w.T
        if not (y - ref).norm() <= 2e-2 * ref.norm():
            return f"the int4 kernel's product (inner_k_tiles {t}) differs from the dense one"
    return None


def tiles_for(in_features: int, group: int) -> tuple[int, int]:
    """``(inner_k_tiles, k_pad)``: the tiling that pads the input dimension least (then the widest), and
    ``K`` zero-padded to a multiple of both the kernel group and the tile."""
    def padded(t: int) -> int:
        step = max(group, 16 * t)  # both powers of two: their least common multiple
        return -(-in_features // step) * step
    t = min(INNER_K_TILES, key=lambda t: (padded(t), -t))
    return t, padded(t)


def kernel_group(group_size: int, in_features: int) -> int | None:
    """The widest kernel group dividing the GPTQ group with the least padding (-1: one group per row)."""
    fits = [g for g in KERNEL_GROUPS if group_size == -1 or group_size % g == 0]
    if not fits:
        return None
    return min(fits, key=lambda g: (tiles_for(in_features, g)[1], -g))


def pack(codes: Tensor, inner_k_tiles: int) -> Tensor:
    """Codes [N, K] in ``[0, 16)`` (N a multiple of 8, K of 16·inner_k_tiles) → the kernel's packed weight."""
    c = codes.to(torch.uint8)
    return _convert_op(((c[:, ::2] << 4) | c[:, 1::2]).contiguous(), inner_k_tiles)


def scales_and_zeros(scales: Tensor, zeros: Tensor) -> Tensor:
    """Kernel ``[n_groups, N, 2]`` bf16 from GPTQ ``scales`` [n_groups, N] and true zero codes."""
    s = scales.float()
    return torch.stack([s, s * (8 - zeros.float())], dim=-1).to(torch.bfloat16).contiguous()


def matmul(x: Tensor, packed: Tensor, group: int, sz: Tensor) -> Tensor:
    """``x`` bf16 [M, K] → bf16 [M, N]."""
    return _mm_op(x, packed, group, sz)


def _nibbles(packed: Tensor) -> Tensor:
    """The 4-bit fields of int32 words in memory order, least significant first: uint8 [numel·8]."""
    words = packed.contiguous().view(-1, 1)
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    return ((words >> shifts) & 0xF).to(torch.uint8).view(-1)


_ORDERS: dict[int, Tensor] = {}


def tile_order(inner_k_tiles: int, device: torch.device) -> Tensor:
    """For each nibble of one packed tile (8 rows × 16·t columns), in memory order, the position
    ``row · 16t + column`` of the code it holds (long [128·t], on ``device``). Learned once, on ``device``,
    by packing a tile whose codes are the base-16 digits of their own positions, one digit at a time; later
    calls on any device reuse it (a layer moved to the CPU to be saved reads its codes without the kernel)."""
    if inner_k_tiles not in _ORDERS:
        cols = 16 * inner_k_tiles
        position = torch.arange(ROW_MULTIPLE * cols, device=device).view(ROW_MULTIPLE, cols)
        order = sum(_nibbles(pack((position >> (4 * d)) & 0xF, inner_k_tiles)).long() << (4 * d) for d in range(3))
        if not torch.equal(order.sort().values, torch.arange(order.numel(), device=device)):
            raise RuntimeError(f"the int4 kernel's tile (inner_k_tiles {inner_k_tiles}) is not a permutation of its codes")
        _ORDERS[inner_k_tiles] = order
    return _ORDERS[inner_k_tiles].to(device)


def unpack(packed: Tensor, n: int, k: int, inner_k_tiles: int) -> Tensor:
    """Inverse of :func:`pack` → uint8 [N, K] (a gather: as cheap as reading the weight)."""
    cols = 16 * inner_k_tiles
    nib = _nibbles(packed).view(n // ROW_MULTIPLE, k // cols, ROW_MULTIPLE * cols)
    tiles = torch.empty_like(nib)
    tiles[..., tile_order(inner_k_tiles, packed.device)] = nib
    return tiles.view(n // ROW_MULTIPLE, k // cols, ROW_MULTIPLE, cols).permute(0, 2, 1, 3).reshape(n, k)


@torch.no_grad()
def unpack_through_kernel(packed: Tensor, n: int, k: int, group: int, chunk: int = 1024) -> Tensor:
    """The codes read by the kernel itself (a check on :func:`unpack`, K² · N work): with ``s = 1, z' = 8``
    the weight is the codes, and an identity's rows pick out its columns. → uint8 [N, K]."""
    sz = scales_and_zeros(torch.ones(k // group, n, device=packed.device), torch.zeros(k // group, n, device=packed.device))
    out = torch.empty(n, k, dtype=torch.uint8, device=packed.device)
    for start in range(0, k, chunk):
        rows = min(chunk, k - start)
        eye = torch.zeros(rows, k, dtype=torch.bfloat16, device=packed.device)
        eye[:, start: start + rows] = torch.eye(rows, dtype=torch.bfloat16, device=packed.device)
        out[:, start: start + rows] = matmul(eye, packed, group, sz).T.round().to(torch.uint8)
    return out
