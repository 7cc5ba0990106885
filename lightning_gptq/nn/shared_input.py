"""Quantized layers that read the same input (q/k/v, gate/up) computed by one kernel call.

At one input row (decoding) a small layer's call is mostly fixed cost and a ramp-up of its memory
stream, paid once per layer. :func:`join_shared_inputs` gathers the ``cpu-packed`` layers that sit
under one parent module and could be computed together (same input width, bits, kernel group and
input column order) into a :class:`SharedInput`: their codes, scales, zeros and biases are
concatenated once and each layer's code, scale and zero buffers become views of the joined ones (still
one copy; biases, small, are copied).

Which of them really read the same tensor is learned from the calls, not assumed from names: a layer
called with the very tensor (same object, not modified in place since: its version counter) that
the previous member call read is recorded as a reader of it. Once a forward pass has shown two or
more readers, the first of them to be called with a new tensor computes all of their outputs in one
call and the others take theirs. The output projection (``o_proj``), which reads another tensor,
is never among them; a reader that stops being called is dropped after one unused output.
Under ``torch.inference_mode`` tensors carry no version counter, so there the same object is taken to
hold the same values (no model changes a layer's input in place between its readers). A joined call
computes exactly what the layers compute one by one (each output column depends
only on its own tile), with the kernel every reader would have used, and only where that kernel is
one of the C++ matmul kernels (few rows); everything else goes through the layers' own path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_gptq.kernels import cpu_gemm

from .cpu_packed import DIGITS, CpuPackedQuantLinear


class SharedInput:
    """Layers (in registration order) whose kernel tensors are views of joined ones."""

    def __init__(self, layers: list[CpuPackedQuantLinear]):
        first = layers[0]
        hot = [layer.__dict__["_hot"] for layer in layers]
        self.layers = layers
        self.index = {id(layer): i for i, layer in enumerate(layers)}
        self.perm = hot[0]["k_perm"]
        qweight = torch.cat([h["k_qweight"] for h in hot])  # tiles follow each other
        scales = torch.cat([h["k_scales"] for h in hot], dim=1)
        zeros = torch.cat([h["k_zeros"] for h in hot], dim=1)
        has_bias = any(h["bias"] is not None for h in hot)
        bias = torch.zeros(scales.shape[1], dtype=torch.float32) if has_bias else None
        self.columns, tile, column = [], 0, 0  # each layer's first output column and tile in the joined tensors
        for layer, h in zip(layers, hot):
            tiles = h["k_qweight"].shape[0]
            self.columns.append(column)
            if bias is not None and h["bias"] is not None:
                bias[column: column + layer.out_features] = h["bias"]
            views = {"k_qweight": qweight[tile: tile + tiles], "k_scales": scales[:, column: column + layer.n_pad],
                     "k_zeros": zeros[:, column: column + layer.n_pad]}
            for name, view in views.items():
                layer._buffers[name] = view
            layer._cache_tensors()
            tile, column = tile + tiles, column + layer.n_pad
        self.joined = (qweight, scales, zeros, bias)
        self.bits, self.k_group = first.bits, first.k_group
        self.ptrs = [layer.__dict__["_hot"]["k_qweight"].data_ptr() for layer in layers]
        self.readers: list[int] = []  # layer indices seen reading the current tensor, in call order
        self.shared: list[int] = []  # learned: the readers of one tensor in the last pass that showed two or more
        self.x: Tensor | None = None
        self.version = -1
        self.pending: dict[int, Tensor] = {}

    def intact(self) -> bool:
        """False once any layer's buffers were replaced (loaded, moved, converted): then each computes alone."""
        return all(layer.__dict__["_hot"]["k_qweight"].data_ptr() == ptr for layer, ptr in zip(self.layers, self.ptrs))

    def forward(self, layer: CpuPackedQuantLinear, x: Tensor) -> Tensor:
        i = self.index[id(layer)]
        if x is self.x and self.version == _version(x):
            y = self.pending.pop(i, None)
            if y is not None:
                self.readers.append(i)
                return y
            if i not in self.readers:
                self.readers.append(i)
            return layer.compute_alone(x)
        # a new tensor: what the last one taught
        if len(self.readers) >= 2:
            self.shared = sorted(self.readers)
        elif self.pending:  # outputs computed for readers that did not come: forget them
            self.shared = []
        self.x, self.version, self.readers, self.pending = x, _version(x), [i], {}
        if i in self.shared and self.intact():
            y = self._compute_shared(i, x)
            if y is not None:
                return y
        return layer.compute_alone(x)

    def _compute_shared(self, caller: int, x: Tensor) -> Tensor | None:
        rows = x.numel() // self.layers[caller].in_features
        kernels = {self.layers[i].kernel_for(rows) for i in self.shared}
        kernel = kernels.pop()
        if kernels or kernel not in DIGITS or x.dtype != torch.float32:
            return None
        lo, hi = self.shared[0], self.shared[-1]  # one run of tiles (a layer between readers is computed too)
        first, last = self.layers[lo], self.layers[hi]
        start, stop = self.columns[lo], self.columns[hi] + last.n_pad
        qweight, scales, zeros, bias = self.joined
        tiles = slice(start // cpu_gemm.TILE_N, stop // cpu_gemm.TILE_N)
        y = cpu_gemm.matmul(x, self.perm, qweight[tiles], scales[:, start:stop], zeros[:, start:stop],
                            None if bias is None else bias[start:stop], self.bits, self.k_group,
                            self.columns[hi] - start + last.out_features, DIGITS[kernel])
        outputs = {}
        for i in self.shared:
            column = self.columns[i] - start
            out = y[..., column: column + self.layers[i].out_features]
            outputs[i] = out if out.is_contiguous() else out.contiguous()
        self.pending = {i: out for i, out in outputs.items() if i != caller}
        return outputs[caller]


def _version(x: Tensor) -> int:
    return -2 if x.is_inference() else x._version  # inference tensors have no version counter


def _key(layer: CpuPackedQuantLinear):
    hot = layer.__dict__["_hot"]
    perm = hot["k_perm"]
    return (layer.in_features, layer.bits, layer.k_group, layer.k_pad, hot["k_scales"].shape[0],
            None if perm is None else tuple(perm.tolist()), hot["k_qweight"].device, bool(layer.__dict__["_fp32_bias"]))


@torch.no_grad()
def join_shared_inputs(model: nn.Module) -> int:
    """Join the ``cpu-packed`` layers under each parent module that could be computed together (see the
    module docstring); returns how many groups were formed. Layers already joined and intact are kept."""
    joined = 0
    for parent in model.modules():
        layers = [m for m in parent.children() if isinstance(m, CpuPackedQuantLinear) and m.__dict__.get("_hot")]
        by_key: dict = {}
        for layer in layers:
            by_key.setdefault(_key(layer), []).append(layer)
        for members in by_key.values():
            if len(members) < 2 or not members[0].__dict__["_fp32_bias"] or members[0].__dict__["_hot"]["k_qweight"].device.type != "cpu":
                continue
            current = members[0].__dict__.get("_shared")
            if current is not None and current.layers == members and current.intact():
                continue
            group = SharedInput(members)
            for layer in members:
                layer.__dict__["_shared"] = group
            joined += 1
    return joined


def separate_shared_inputs(model: nn.Module) -> int:
    """Undo :func:`join_shared_inputs`: every layer computes alone again (its buffers stay views of the joined
    tensors, still one copy); returns how many layers were separated."""
    layers = [m for m in model.modules() if isinstance(m, CpuPackedQuantLinear) and m.__dict__.get("_shared")]
    for layer in layers:
        layer.__dict__["_shared"] = None
    return len(layers)
