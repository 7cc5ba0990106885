"""Running estimate of a linear layer's Hessian ``H = 2/n · Σ x xᵀ`` from its input activations."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class HessianAccumulator:
    """Accumulates ``H`` [in_features, in_features] in fp32 as the reference GPTQ code does.

    ``n`` counts samples the way the reference does: a ``[batch, seq, in]`` input adds ``batch``
    samples, a 2-D ``[tokens, in]`` input adds one. ``H`` is kept as the running mean
    ``2/n · Σ XᵢXᵢᵀ`` (old ``H`` scaled by ``n/(n+b)``, plus ``2/(n+b) · XbXbᵀ``), so its numbers match
    the reference's exactly; the solver is invariant to the overall scale.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.in_features = in_features
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    @torch.no_grad()
    def add(self, x: Tensor, token_weights: Tensor | None = None) -> None:
        """Add activations ``x`` [..., in_features] (any float dtype).

        ``token_weights`` (optional, >= 0): how much each token counts, broadcast against
        ``x.shape[:-1]`` (``[seq]`` weighs positions of a ``[batch, seq, in]`` input); token ``t``
        adds ``w_t · x_t x_tᵀ`` instead of ``x_t x_tᵀ``. Weights do not change the sample count ``n``.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected activations [..., {self.in_features}], got {tuple(x.shape)}")
        batch = x.shape[0] if x.dim() > 2 else 1
        if token_weights is not None:
            w = torch.as_tensor(token_weights, dtype=torch.float32, device=x.device)
            if bool((w < 0).any()):
                raise ValueError("token_weights must be >= 0")
            x = x.to(torch.float32) * w.sqrt().broadcast_to(x.shape[:-1]).unsqueeze(-1)
        x = x.reshape(-1, self.in_features).to(device=self.hessian.device, dtype=torch.float32)
        total = self.nsamples + batch
        self.hessian.mul_(self.nsamples / total)
        x = x * math.sqrt(2.0 / total)
        self.hessian.addmm_(x.T, x)
        self.nsamples = total

    def merge_(self, other: "HessianAccumulator") -> "HessianAccumulator":
        """Fold ``other`` (e.g. another rank's accumulator) into this one; returns self."""
        if other.in_features != self.in_features:
            raise ValueError(f"cannot merge Hessians of width {other.in_features} into {self.in_features}")
        total = self.nsamples + other.nsamples
        if total == 0:
            return self
        h = other.hessian.to(self.hessian.device)
        self.hessian.mul_(self.nsamples / total).add_(h, alpha=other.nsamples / total)
        self.nsamples = total
        return self

    def state_dict(self) -> dict:
        return {"hessian": self.hessian, "nsamples": self.nsamples}

    def load_state_dict(self, state: dict) -> None:
        h = state["hessian"]
        if tuple(h.shape) != (self.in_features, self.in_features):
            raise ValueError(f"Hessian state has shape {tuple(h.shape)}, expected {(self.in_features,) * 2}")
        self.hessian = h.to(dtype=torch.float32, device=self.hessian.device).clone()
        self.nsamples = int(state["nsamples"])
