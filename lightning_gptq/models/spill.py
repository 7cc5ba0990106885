"""Tensors kept in files instead of memory: the activation cache of a model too big for it.

Each tensor's storage is a file mapped shared and unlinked at once, so the kernel writes its pages
back to disk and drops them when memory runs short (no swap needed), reads them back on use, and
frees the disk space when the tensor is freed: nothing is left behind, even by a killed run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor


class SpillFolder:
    """``put(t)`` returns a copy of CPU tensor ``t`` whose storage is a file in ``folder``."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def put(self, tensor: Tensor) -> Tensor:
        if tensor.numel() == 0:
            return tensor.detach().cpu().clone()
        fd, path = tempfile.mkstemp(dir=self.folder, prefix="activations-", suffix=".bin")
        try:
            os.ftruncate(fd, tensor.numel() * tensor.element_size())
        finally:
            os.close(fd)
        try:
            stored = torch.from_file(path, shared=True, size=tensor.numel(), dtype=tensor.dtype)
        finally:
            os.unlink(path)  # the mapping keeps the pages; the space goes with the tensor
        return stored.view(tensor.shape).copy_(tensor)


def is_spilled(tensor: Tensor) -> bool:
    """Whether ``tensor``'s storage is a mapped file (made by :meth:`SpillFolder.put`)."""
    return bool(getattr(tensor.untyped_storage(), "filename", None))
