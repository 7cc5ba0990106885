"""Shared plumbing for backends that convert the checkpoint layout into a kernel's own, once.

At ``post_init`` the codes are unpacked, act-order columns are sorted so every group is one
contiguous run (the input is permuted the same way on each call), and the subclass packs them its
way with the input dimension zero-padded to ``k_pad`` and the output dimension to ``n_pad``; the
checkpoint ``qweight`` is then dropped, so a layer holds one copy of its codes. ``state_dict``
rebuilds ``qweight`` from the kernel layout, so what is saved is the ecosystem's layout, unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gptq.kernels.packing import pack_rows, unpack_rows

from .quant_linear import QuantLinear


class ConvertedQuantLinear(QuantLinear):
    """Subclasses set ``k_pad``/``n_pad`` and their kernel buffers in :meth:`convert`, give the codes back
    in :meth:`kernel_codes`, and compute ``[m, k_pad] → [m, ≥ out]`` in :meth:`compute`."""

    def convert(self, codes: Tensor) -> None:
        """``codes`` int32 [out, in], columns in kernel order (groups contiguous)."""
        raise NotImplementedError

    def kernel_codes(self) -> Tensor:
        """The codes [≥ out, ≥ in] back from the kernel layout, columns in kernel order."""
        raise NotImplementedError

    def compute(self, kernel: str, rows: Tensor, hot: dict[str, Tensor]) -> Tensor:
        """``rows`` [m, k_pad] → [m, ≥ out]; ``hot``: this layer's buffers by name."""
        raise NotImplementedError

    # -- conversion -------------------------------------------------------------------------------
    def post_init(self) -> None:
        if self.qweight is None:  # already converted
            return
        width = self.group_size if self.group_size > 0 else self.in_features
        perm = None
        if self.contiguous_group_size() is None:
            perm = torch.argsort(self.g_idx.long(), stable=True)
            if not torch.equal(self.g_idx.long()[perm], torch.arange(self.in_features, device=perm.device) // width):
                raise ValueError(f"{self.backend}: g_idx does not form groups of {width} columns; use backend='torch'")
        codes = unpack_rows(self.qweight, self.bits, self.in_features).T.to(torch.int32)  # [out, in]
        self.register_buffer("k_perm", perm, persistent=False)
        self.convert(codes if perm is None else codes[:, perm])
        self.qweight = None  # one copy: the kernel layout
        self._cache_tensors()

    def _cache_tensors(self) -> None:
        """Plain attributes for the buffers the hot path reads: ``nn.Module`` buffer lookups cost about a
        microsecond each, which matters on small layers at batch 1. Refreshed whenever buffers move."""
        self.__dict__["_hot"] = {name: getattr(self, name) for name in self._buffers}

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        if "_hot" in self.__dict__:
            self._cache_tensors()
        return result

    def packed_tensors(self) -> dict[str, Tensor]:
        codes = self.kernel_codes()[: self.out_features, : self.in_features]
        if self.k_perm is not None:
            codes = codes[:, torch.argsort(self.k_perm)]
        return {"qweight": pack_rows(codes.T, self.bits), "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "qweight"] = self.packed_tensors()["qweight"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "qweight"
        if key in state_dict:  # back to the checkpoint layout, then convert again
            self.qweight = torch.empty_like(state_dict[key], device=self.scales.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def kernel_group_rows(self, values: Tensor, n_kernel_groups: int, kernel_group: int) -> Tensor:
        """Rows of a per-group tensor ``values`` [n_groups, out] for each kernel group of ``kernel_group``
        sorted columns (each lies inside one GPTQ group), zero-padded to ``n_pad`` columns."""
        width = self.group_size if self.group_size > 0 else self.in_features
        src = torch.clamp(torch.arange(n_kernel_groups, device=values.device) * kernel_group // width, max=values.shape[0] - 1)
        return torch.nn.functional.pad(values[src], (0, self.n_pad - self.out_features))

    # -- compute ----------------------------------------------------------------------------------
    def run(self, kernel: str, x: Tensor) -> Tensor:
        hot = self.__dict__["_hot"]
        shape, dtype = x.shape, x.dtype
        rows = x.reshape(-1, self.in_features)
        if hot["k_perm"] is not None:
            rows = rows.index_select(1, hot["k_perm"])
        if self.k_pad != self.in_features:
            rows = torch.nn.functional.pad(rows, (0, self.k_pad - self.in_features))
        y = self.compute(kernel, rows, hot)
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]
        if hot["bias"] is not None:  # in the wider of the two dtypes (a kernel may return fp32), rounded once below
            y = torch.add(y, hot["bias"])
        return y.to(dtype).view(*shape[:-1], self.out_features)
