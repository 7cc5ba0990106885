"""A linear layer's Hessian ``H = 2/n · Σᵢ XᵢᵀXᵢ`` from its input activations, independent of batching."""

from __future__ import annotations

import torch
from torch import Tensor

from .linalg import fp32_matmuls


class HessianAccumulator:
    """Accumulates ``H = 2/n · Σᵢ XᵢᵀXᵢ`` [in_features, in_features] over samples ``Xᵢ`` [tokens, in].

    ``n`` counts samples as the reference does: a ``[batch, seq, in]`` input adds ``batch``, a 2-D
    ``[tokens, in]`` input adds one. Each sample's product ``XᵢᵀXᵢ`` is computed alone in fp32 (a
    matmul of the same shape whichever batch or process the sample arrives in, hence the same bits)
    and the products are summed in fp64. fp32 numbers summed in fp64 are exact while a sum spans
    fewer than ~2^29 of its terms' ulps, so the order of the samples, how they were batched and how
    they were split over processes do not change ``H`` (a DDP run solves the single-process
    Hessian). The reference's fp32 running mean differs from this sum by rounding only.

    The product is computed on the lower block triangle of ``tiles × tiles`` tiles and mirrored
    (``XᵢᵀXᵢ`` is symmetric): 1/2 + 1/(2·tiles) of a full product's multiply-adds.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None, tiles: int | None = None,
                 dtype: torch.dtype = torch.float32):
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"a Hessian's products are float32 or float64, got {dtype}")
        self.in_features = in_features
        self.dtype = dtype
        self.total: Tensor | None = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.nsamples = 0
        # Measured on 2048-token samples (2 cores): 3 tiles at 576 columns and 6 at 1536 take 0.72x and
        # 0.66x the time of one fp32 addmm; tiles narrower than ~192 columns lose the matmul's rate.
        self.tiles = tiles if tiles is not None else max(1, min(6, in_features // 192))
        self._edges = [round(i * in_features / self.tiles) for i in range(self.tiles + 1)]

    @torch.no_grad()
    @fp32_matmuls()
    def add(self, x: Tensor, token_weights: Tensor | None = None) -> None:
        """Add activations ``x`` [..., in_features] (any float dtype).

        ``token_weights`` (optional, >= 0): how much each token counts, broadcast against
        ``x.shape[:-1]`` (``[seq]`` weighs positions of a ``[batch, seq, in]`` input); token ``t``
        adds ``w_t · x_t x_tᵀ`` instead of ``x_t x_tᵀ``. Weights do not change the sample count ``n``.
        """
        if self.total is None:
            raise RuntimeError("this HessianAccumulator was released (its Hessian went to a solve)")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected activations [..., {self.in_features}], got {tuple(x.shape)}")
        x = x.to(device=self.total.device, dtype=self.dtype)
        if token_weights is not None:
            w = torch.as_tensor(token_weights, dtype=self.dtype, device=x.device)
            if bool((w < 0).any()):
                raise ValueError("token_weights must be >= 0")
            x = x * w.sqrt().broadcast_to(x.shape[:-1]).unsqueeze(-1)
        samples = x.reshape(x.shape[0], -1, self.in_features) if x.dim() > 2 else x.reshape(1, -1, self.in_features)
        for sample in samples:
            self._add_product(sample)
        self.nsamples += samples.shape[0]

    def _add_product(self, x: Tensor) -> None:
        """``total += xᵀx`` for one sample ``x`` [tokens, in]: the lower tiles in ``dtype``, summed in fp64."""
        e = self._edges
        for i in range(self.tiles):
            rows = x[:, e[i]: e[i + 1]].T
            self.total[e[i]: e[i + 1], : e[i + 1]] += rows @ x[:, : e[i + 1]]

    @property
    def hessian(self) -> Tensor:
        """``2/n · Σ XᵢXᵢᵀ`` in ``dtype`` (a solve runs in it), the upper tiles mirrored from the lower ones
        (a new tensor each call; a solve may overwrite it). Temporaries: one tile at a time."""
        if self.total is None:
            raise RuntimeError("this HessianAccumulator was released (its Hessian went to a solve)")
        if self.nsamples == 0:  # (a solve on it would zero the whole weight)
            raise RuntimeError("this HessianAccumulator has no samples: add() the layer's inputs first")
        scale, e = 2.0 / self.nsamples, self._edges
        h = torch.empty(self.in_features, self.in_features, dtype=self.dtype, device=self.total.device)
        for i in range(self.tiles):
            for j in range(i + 1):
                tile = (self.total[e[i]: e[i + 1], e[j]: e[j + 1]] * scale).to(self.dtype)
                h[e[i]: e[i + 1], e[j]: e[j + 1]] = tile
                if j < i:
                    h[e[j]: e[j + 1], e[i]: e[i + 1]] = tile.T
        return h

    def release(self) -> None:
        """Free the sum (its Hessian was handed to the solve)."""
        self.total = None

    def add_scaled_(self, other: "HessianAccumulator", alpha: float) -> "HessianAccumulator":
        """``Σ += alpha · other's Σ`` (its samples are not counted again); returns self."""
        self._check(other)
        self.total.add_(other.total.to(self.total.device), alpha=alpha)
        return self

    def merge_(self, other: "HessianAccumulator") -> "HessianAccumulator":
        """Fold ``other`` (e.g. another rank's accumulator) into this one; returns self."""
        self._check(other)
        self.total.add_(other.total.to(self.total.device))
        self.nsamples += other.nsamples
        return self

    def _check(self, other: "HessianAccumulator") -> None:
        if other.in_features != self.in_features or other.tiles != self.tiles or other.dtype != self.dtype:
            raise ValueError(f"cannot merge Hessians of width {other.in_features} ({other.tiles} tiles, {other.dtype} "
                             f"products) into {self.in_features} ({self.tiles} tiles, {self.dtype} products)")

    def state_dict(self) -> dict:
        return {"total": self.total, "nsamples": self.nsamples, "tiles": self.tiles, "dtype": str(self.dtype)}

    def load_state_dict(self, state: dict) -> None:
        total = state["total"]
        if tuple(total.shape) != (self.in_features, self.in_features):
            raise ValueError(f"Hessian state has shape {tuple(total.shape)}, expected {(self.in_features,) * 2}")
        if int(state.get("tiles", self.tiles)) != self.tiles:
            raise ValueError(f"Hessian state was summed on {state['tiles']} tiles, expected {self.tiles}")
        if state.get("dtype", str(torch.float32)) != str(self.dtype):
            raise ValueError(f"Hessian state holds {state['dtype']} products, expected {self.dtype}")
        self.total = total.to(dtype=torch.float64, device=self.total.device if self.total is not None else None).clone()
        self.nsamples = int(state["nsamples"])


class MismatchAccumulator(HessianAccumulator):
    """Accumulates GPTAQ's input mismatch ``D = 2/n · Σᵢ (X_fp,ᵢ − Xᵢ)ᵀXᵢ`` [in, in] beside a layer's
    Hessian: ``Xᵢ`` [tokens, in] is the sample's input in the model being quantized, ``X_fp,ᵢ`` the
    full-precision model's input for the same tokens. Same sample count, fp32 products and fp64 sum
    as ``HessianAccumulator`` (order-, batch- and split-independent); ``D`` is not symmetric, so the
    product is computed whole (one tile)."""

    def __init__(self, in_features: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(in_features, device=device, tiles=1, dtype=dtype)

    @torch.no_grad()
    @fp32_matmuls()
    def add(self, x: Tensor, reference: Tensor | None = None, token_weights: Tensor | None = None) -> None:
        """Add ``x`` [..., in] and the full-precision ``reference`` of the same shape; ``token_weights``
        as in ``HessianAccumulator.add`` (token ``t`` adds ``w_t · (ref_t − x_t) x_tᵀ``)."""
        if self.total is None:
            raise RuntimeError("this MismatchAccumulator was released (its matrix went to a solve)")
        if reference is None or reference.shape != x.shape or x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs and full-precision inputs [..., {self.in_features}] of one shape, got "
                             f"{tuple(x.shape)} and {None if reference is None else tuple(reference.shape)}")
        x = x.to(device=self.total.device, dtype=self.dtype)
        delta = reference.to(device=x.device, dtype=self.dtype) - x
        if token_weights is not None:
            w = torch.as_tensor(token_weights, dtype=self.dtype, device=x.device)
            if bool((w < 0).any()):
                raise ValueError("token_weights must be >= 0")
            delta = delta * w.broadcast_to(x.shape[:-1]).unsqueeze(-1)
        if x.dim() <= 2:
            x, delta = x[None], delta[None]
        x, delta = x.reshape(x.shape[0], -1, self.in_features), delta.reshape(x.shape[0], -1, self.in_features)
        for sample, diff in zip(x, delta):
            self.total += diff.T @ sample
        self.nsamples += x.shape[0]

    @property
    def hessian(self) -> Tensor:
        raise AttributeError("a MismatchAccumulator holds D, not a Hessian: use .mismatch")

    @property
    def mismatch(self) -> Tensor:
        """``2/n · Σ (X_fp − X)ᵀX`` in ``dtype`` (a new tensor each call)."""
        if self.total is None:
            raise RuntimeError("this MismatchAccumulator was released (its matrix went to a solve)")
        return (self.total * (2.0 / max(self.nsamples, 1))).to(self.dtype)
