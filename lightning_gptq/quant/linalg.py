"""Dense factorisations written as recursive 2×2 block steps, so that almost all of their work is
matrix multiplication (LAPACK's potrf/trsm run at a fraction of matmul speed on small CPUs).

They work in place on one triangle (diagonal included) and never write the other, so a symmetric
input stays recoverable from that other triangle; temporaries stay below half the matrix. A
5632-wide fp32 Hessian is 121 MB, and the solve of a large layer sets a streamed run's peak memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

BASE = 256  # below this size LAPACK's own routine is as fast as recursing further
CHUNK = 256  # rows per step of the in-place copies (temporaries of CHUNK × n)


def _copy_lower_(dst: Tensor, src: Tensor) -> None:
    """``dst``'s lower triangle (diagonal included) := ``src``'s; ``dst``'s strict upper unchanged."""
    n = dst.shape[0]
    for r0 in range(0, n, CHUNK):
        r1 = min(r0 + CHUNK, n)
        dst[r0:r1, :r0] = src[r0:r1, :r0]
        dst[r0:r1, r0:r1] = src[r0:r1, r0:r1].tril() + dst[r0:r1, r0:r1].triu(1)


def mirror_upper_(A: Tensor) -> None:
    """``A``'s strict lower triangle := the transpose of its strict upper (a symmetric ``A`` again)."""
    n = A.shape[0]
    for r0 in range(0, n, CHUNK):
        r1 = min(r0 + CHUNK, n)
        A[r0:r1, :r0] = A[:r0, r0:r1].T
        block = A[r0:r1, r0:r1]
        block.copy_(block.triu() + block.triu(1).T)


def flip_(A: Tensor) -> None:
    """``A := JAJ`` in place (rows and columns in reverse order), ``A`` [n, n]."""
    n = A.shape[0]
    half = n // 2
    for r0 in range(0, half, CHUNK):
        r1 = min(r0 + CHUNK, half)
        top = A[r0:r1].flip(0, 1)
        A[r0:r1] = A[n - r1 : n - r0].flip(0, 1)
        A[n - r1 : n - r0] = top
    if n % 2:
        A[half] = A[half].flip(0)


def permute_symmetric_(A: Tensor, perm: Tensor) -> None:
    """``A := A[perm][:, perm]`` in place, ``A`` [n, n]: rows along the permutation's cycles (one row
    of temporary), then columns a chunk of rows at a time."""
    order = perm.tolist()
    seen = [False] * len(order)
    for start in range(len(order)):
        if seen[start] or order[start] == start:
            continue
        first, i = A[start].clone(), start
        while True:
            seen[i] = True
            source = order[i]
            if source == start:
                A[i] = first
                break
            A[i] = A[source]
            i = source
    for r0 in range(0, A.shape[0], CHUNK):
        A[r0 : r0 + CHUNK] = A[r0 : r0 + CHUNK].index_select(1, perm)


_PER_BACKEND = hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision")  # torch >= 2.9


@contextmanager
def fp32_matmuls() -> Iterator[None]:
    """fp32 matmuls computed in fp32 inside this block, whatever the process asked for: after
    ``torch.set_float32_matmul_precision("high" | "medium")`` (a common line in GPU training scripts)
    CUDA multiplies fp32 in TF32 and oneDNN in bf16 (measured on an AMX Xeon: a 512×2048×512 product off
    by 0.5 at "medium"), which would round Hessians and the solve to 8–10 mantissa bits. Process-wide
    while it lasts (torch has no per-thread setting); restored after. Usable as a decorator."""
    if not _PER_BACKEND:
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)
        return
    # The legacy setting is kept in step: torch refuses to read it ("a mix of the legacy and new APIs") while it
    # says TF32 and the new one says IEEE, and Inductor, Lightning and user code still read it.
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    legacy, previous = torch.get_float32_matmul_precision(), [b.fp32_precision for b in backends]
    torch.set_float32_matmul_precision("highest")
    for b in backends:
        b.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(legacy)
        for b, value in zip(backends, previous):
            b.fp32_precision = value


@contextmanager
def one_thread() -> Iterator[None]:
    """LAPACK's CPU factorisations round differently with the number of threads (measured: SmolLM2's
    Hessians factor to other bits on 1 and 2 threads); the small base cases run on one, so a solve
    gives the same bits on any core count and in every DDP process. The large products stay threaded
    (matmuls split rows and columns among threads, not the summed dimension)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cholesky_lower_(A: Tensor) -> bool:
    """In place: the lower triangle of a symmetric ``A`` [n, n] becomes ``L`` with ``A = LLᵀ``; the
    strict upper triangle is not touched. False when ``A`` is not positive definite (the lower
    triangle is then garbage)."""
    n = A.shape[0]
    if n <= BASE:
        with one_thread():
            L, info = torch.linalg.cholesky_ex(A)
        if info.item() != 0:
            return False
        _copy_lower_(A, L)
        return True
    h = n // 2
    if not cholesky_lower_(A[:h, :h]):
        return False
    A[h:, :h] = torch.linalg.solve_triangular(A[:h, :h], A[h:, :h].T, upper=False).T  # A21 · L11⁻ᵀ
    L21 = A[h:, :h]
    S = torch.addmm(A[h:, h:], L21, L21.T, alpha=-1)  # Schur complement (A22's upper is intact)
    if not cholesky_lower_(S):
        return False
    _copy_lower_(A[h:, h:], S)
    return True


def inverse_upper_(R: Tensor) -> None:
    """In place: the upper triangle of an invertible upper-triangular ``R`` [n, n] (read from there)
    becomes ``R⁻¹``'s; the strict lower triangle is not touched."""
    n = R.shape[0]
    if n <= BASE:
        with one_thread():
            inverse = torch.linalg.solve_triangular(R, torch.eye(n, dtype=R.dtype, device=R.device), upper=True)
        _copy_lower_(R.T, inverse.T)
        return
    h = n // 2
    inverse_upper_(R[:h, :h])
    inverse_upper_(R[h:, h:])
    R[:h, h:] = -(R[:h, :h].triu() @ R[:h, h:]) @ R[h:, h:].triu()
