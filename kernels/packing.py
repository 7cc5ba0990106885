"""The GPTQ checkpoint layout: b-bit codes packed into int32 words, lowest bits first.

Codes are written as one little-endian bit stream along the packed dimension: value ``i`` occupies
bits ``[i·b, (i+1)·b)`` of the stream, and word ``w`` holds stream bits ``[32w, 32w+32)``. For
b = 2, 4, 8 a word holds ``32/b`` whole values; for b = 3 (or 5, 6, 7) 32 values fill ``b`` words
and some values straddle two words, exactly as AutoGPTQ/GPTQModel pack 3-bit weights.

``qweight`` packs along the input dimension (dim 0 of ``[in, out]``), ``qzeros`` along the output
dimension (dim 1 of ``[n_groups, out]``). A length that is not a multiple of 32 is padded with
zero codes up to one (the ecosystem's own shapes are always multiples of 32 there).
"""

from __future__ import annotations

import torch
from torch import Tensor


def packed_length(n: int, bits: int) -> int:
    """int32 words that hold ``n`` codes of ``bits`` bits (whole 32-value runs)."""
    return -(-n // 32) * bits


def _runs(bits: int):
    """For each of the 32 values of a run: (word it starts in, bit offset there, bits spilling into the next word)."""
    for i in range(32):
        word, offset = divmod(i * bits, 32)
        yield i, word, offset, max(0, offset + bits - 32)


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """``codes`` [n, cols] integers in ``[0, 2**bits)`` → int32 [packed_length(n, bits), cols]."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    n, cols = codes.shape
    if n and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits: [{int(codes.min())}, {int(codes.max())}]")
    runs = -(-n // 32)
    c = torch.zeros(runs * 32, cols, dtype=torch.int32, device=codes.device)
    c[:n] = codes
    c = c.view(runs, 32, cols)
    words = torch.zeros(runs, bits, cols, dtype=torch.int32, device=codes.device)
    for i, word, offset, spill in _runs(bits):
        words[:, word] |= c[:, i] << offset  # int32 shifts wrap: the bits past 31 are dropped here...
        if spill:
            words[:, word + 1] |= c[:, i] >> (bits - spill)  # ...and written to the next word
    return words.view(runs * bits, cols)


def unpack_rows(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_rows`: int32 [packed_length(n, bits), cols] → uint8 [n, cols]."""
    words_n, cols = packed.shape
    if words_n % bits or words_n // bits * 32 < n:
        raise ValueError(f"{words_n} packed words cannot hold {n} codes of {bits} bits")
    runs = words_n // bits
    w = packed.view(runs, bits, cols)
    out = torch.empty(runs, 32, cols, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    for i, word, offset, spill in _runs(bits):
        # ``>>`` is arithmetic on int32, but the mask keeps only bits that lay inside the word.
        value = (w[:, word] >> offset) & mask
        if spill:
            value = (value & ((1 << (bits - spill)) - 1)) | ((w[:, word + 1] & ((1 << spill) - 1)) << (bits - spill))
        out[:, i] = value
    return out.view(runs * 32, cols)[:n]


def pack_cols(codes: Tensor, bits: int) -> Tensor:
    """``codes`` [rows, n] → int32 [rows, packed_length(n, bits)] (packed along dim 1: ``qzeros``)."""
    return pack_rows(codes.T, bits).T.contiguous()


def unpack_cols(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_cols`: → uint8 [rows, n]."""
    return unpack_rows(packed.T, bits, n).T.contiguous()
