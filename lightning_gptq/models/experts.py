"""Mixture-of-experts banks as one ``nn.Linear`` per expert projection, so GPTQ can quantize them.

transformers 5 keeps a MoE block's experts as one module holding 3-D tensors (``gate_up_proj``
``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, ...). GPTQ needs
each expert's projections as linears that see only the tokens routed to that expert, so that each gets
the Hessian of its own inputs. ``unfuse_experts`` replaces every such bank with ``ExpertBank``: the same
call and result, one ``ExpertMLP`` (``gate_proj``, ``up_proj``, ``down_proj``) per expert, checked on a
random routing against the bank it replaces before it is kept. Checkpoints then name the layers
``...experts.<e>.gate_proj`` (the per-expert layout GPTQ MoE checkpoints use).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from lightning_gptq.models.adapters import UnsupportedArchitectureError

__all__ = ["ClampedSwiGLUExpert", "ExpertBank", "ExpertMLP", "fused_expert_banks", "routed_layers", "unfuse_experts"]


class ExpertMLP(nn.Module):
    """One expert: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, ``x`` ``[tokens, hidden]``."""

    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module, *, bias: bool = False, dtype=None,
                 device=None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias, dtype=dtype, device=device)
        self.act_fn = act_fn

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ClampedSwiGLUExpert(ExpertMLP):
    """GPT-OSS's expert (with biases): ``down_proj((u + 1) · g · σ(α·g))``, ``g`` clamped above at ``limit``, ``u``
    clamped to ``±limit``. GPT-OSS interleaves its fused projection's outputs (gate, up, gate, up, ...); as in the
    per-expert files GPTQModel (Defuser) writes and vLLM reads, ``gate_proj`` holds the first half of those outputs
    and ``up_proj`` the second, in that interleaved order, so ``g`` and ``u`` are the even and odd outputs of both."""

    def __init__(self, hidden: int, intermediate: int, alpha: float, limit: float, *, dtype=None, device=None) -> None:
        super().__init__(hidden, intermediate, nn.Identity(), bias=True, dtype=dtype, device=device)
        self.alpha, self.limit = float(alpha), float(limit)

    def forward(self, x: Tensor) -> Tensor:
        fused = torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)
        gate = fused[..., 0::2].clamp(max=self.limit)
        up = fused[..., 1::2].clamp(min=-self.limit, max=self.limit)
        return self.down_proj((up + 1) * (gate * torch.sigmoid(gate * self.alpha)))


class ExpertBank(nn.ModuleList):
    """``E`` ``ExpertMLP``s called as transformers' fused banks are: ``(hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]``, each token the weighted sum of its chosen experts' outputs. Experts run
    in index order on their tokens in (slot, token) order, as the fused banks do. Under ``torch.compile`` the
    bank is one opaque operator (``lightning_gptq::expert_bank``), so a compiled decode step stays one graph
    around it: which experts run depends on the routing, which a graph cannot hold."""

    def __init__(self, experts=None) -> None:
        super().__init__(experts)
        _BANKS[id(self)] = self

    def __setstate__(self, state) -> None:  # a copy (deepcopy, pickle) is a bank of its own
        super().__setstate__(state)
        _BANKS[id(self)] = self

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return expert_bank(hidden_states, top_k_index, top_k_weights, id(self))
        return self.mix(hidden_states, top_k_index, top_k_weights)

    def mix(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """The bank's output, eagerly (``forward`` without the compiled-graph operator)."""
        out = torch.zeros_like(hidden_states)
        chosen = top_k_index.t()  # [k, T]
        # only the experts some token chose (a decode step: k of them, not all E); the others' linears see
        # nothing, and GPTQ rounds an expert that saw nothing to nearest
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < len(self):
                continue  # an index some routers use for "no expert"
            slot, token = torch.where(chosen == e)
            y = self[e](hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    @classmethod
    def from_fused(cls, bank: nn.Module) -> "ExpertBank":
        """The experts of ``bank`` (a layout ``_layout`` names) as linears holding copies of its weights."""
        layout, down = _layout(bank), bank.down_proj
        # built on meta, then allocated uninitialised: the weights are copied in, so a random init would be wasted
        unfused = cls([_new_expert(bank, layout) for _ in range(down.shape[0])]).to_empty(device=down.device)
        if down.device.type != "meta":
            with torch.no_grad():
                for e, expert in enumerate(unfused):
                    for name, tensor in _expert_weights(bank, layout, e).items():
                        expert.get_parameter(name).copy_(tensor)
        return unfused


#: the banks a compiled graph calls, by ``id``: a graph holds the operator and an integer, not the module
_BANKS: weakref.WeakValueDictionary[int, ExpertBank] = weakref.WeakValueDictionary()


# cudagraph_unsafe: the routing is read on the host (which experts run), which a captured CUDA graph cannot
# replay; inductor keeps the operator outside the graphs it captures (StaticDecoder's reduce-overhead on CUDA)
@torch.library.custom_op("lightning_gptq::expert_bank", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def expert_bank(hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor, bank: int) -> Tensor:
    """``ExpertBank.mix`` of the bank whose ``id`` is ``bank``: ``[T, H]``."""
    module = _BANKS.get(bank)
    if module is None:
        raise RuntimeError("lightning_gptq::expert_bank: the expert bank this compiled graph was traced with is gone; "
                           "compile again")
    return module.mix(hidden_states, top_k_index, top_k_weights)


@expert_bank.register_fake
def _(hidden_states, top_k_index, top_k_weights, bank):
    return torch.empty_like(hidden_states)


def _new_expert(bank: nn.Module, layout: str) -> ExpertMLP:
    if layout == "stacked":  # down_proj [E, H, I]
        _, hidden, intermediate = bank.down_proj.shape
        return ExpertMLP(hidden, intermediate, bank.act_fn, dtype=bank.down_proj.dtype, device="meta")
    _, intermediate, hidden = bank.down_proj.shape  # "gpt_oss": down_proj [E, I, H]
    return ClampedSwiGLUExpert(hidden, intermediate, bank.alpha, bank.limit, dtype=bank.down_proj.dtype, device="meta")


def _expert_weights(bank: nn.Module, layout: str, e: int) -> dict[str, Tensor]:
    """Expert ``e``'s tensors of ``bank``, named as in ``ExpertMLP``."""
    gate_up, down = bank.gate_up_proj[e], bank.down_proj[e]
    if layout == "stacked":  # gate_up [2I, H]: gate rows, then up rows
        intermediate = down.shape[1]
        return {"gate_proj.weight": gate_up[:intermediate], "up_proj.weight": gate_up[intermediate:],
                "down_proj.weight": down}
    # "gpt_oss": gate_up [H, 2I] (x @ W), gate and up columns interleaved; split into halves, not into gate and up
    # (ClampedSwiGLUExpert)
    bias, intermediate = bank.gate_up_proj_bias[e], down.shape[0]
    return {"gate_proj.weight": gate_up[:, :intermediate].t(), "gate_proj.bias": bias[:intermediate],
            "up_proj.weight": gate_up[:, intermediate:].t(), "up_proj.bias": bias[intermediate:],
            "down_proj.weight": down.t(), "down_proj.bias": bank.down_proj_bias[e]}


def _layout(module: nn.Module) -> str | None:
    """``"stacked"`` (Mixtral, Qwen-MoE, OLMoE, DeepSeek: no biases, ``act_fn``), ``"gpt_oss"`` (transposed,
    interleaved gate/up, biases, clamped SwiGLU), or None: not an expert bank this module can split."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, Tensor) and isinstance(down, Tensor) and gate_up.ndim == 3 and down.ndim == 3):
        return None
    biases = [getattr(module, f"{n}_bias", None) for n in ("gate_up_proj", "down_proj")]
    experts = down.shape[0]
    if not any(isinstance(b, Tensor) for b in biases) and hasattr(module, "act_fn") \
            and tuple(gate_up.shape) == (experts, 2 * down.shape[2], down.shape[1]):
        return "stacked"
    intermediate, hidden = down.shape[1:]
    if all(isinstance(b, Tensor) for b in biases) and hasattr(module, "alpha") and hasattr(module, "limit") \
            and tuple(gate_up.shape) == (experts, hidden, 2 * intermediate) \
            and tuple(biases[0].shape) == (experts, 2 * intermediate) and tuple(biases[1].shape) == (experts, hidden):
        return "gpt_oss"
    return None


def routed_layers(module: nn.Module) -> set[str]:
    """Names (relative to ``module``) of the modules inside its ``ExpertBank``s (the experts' linears among them):
    each reads only the tokens routed to its expert."""
    banks = [name for name, m in module.named_modules() if isinstance(m, ExpertBank)]
    return {name for name, _ in module.named_modules() if any(name.startswith(bank + ".") for bank in banks)}


def fused_expert_banks(model: nn.Module) -> list[str]:
    """Names of the modules ``unfuse_experts`` would replace."""
    return [name for name, module in model.named_modules() if _layout(module) is not None]


def _check(bank: nn.Module, unfused: ExpertBank, name: str) -> None:
    experts, hidden = len(unfused), unfused[0].down_proj.out_features
    generator = torch.Generator().manual_seed(0)
    tokens, k = 4 * experts, min(2, experts)
    x = torch.randn(tokens, hidden, generator=generator).to(bank.down_proj)
    index = torch.stack([torch.randperm(experts, generator=generator)[:k] for _ in range(tokens)]).to(x.device)
    weights = torch.rand(tokens, k, generator=generator).to(x)
    with torch.no_grad():
        expected, got = bank(x, index, weights), unfused(x, index, weights)
    difference = float((got.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30))
    tolerance = 1e-5 if x.dtype.itemsize >= 4 else 2e-2
    if not difference <= tolerance:
        raise UnsupportedArchitectureError(
            f"{name} ({type(bank).__name__}): its experts, split into linears, do not give its output (relative "
            f"difference {difference:.2e}); this expert layout is not supported")


def unfuse_experts(model: nn.Module, *, check: bool = True) -> list[str]:
    """Replace every fused expert bank of ``model`` by an ``ExpertBank`` (in place; on the meta device too, where
    nothing is copied or checked); returns the replaced modules' names. ``check``: prove each on a random routing."""
    names = fused_expert_banks(model)
    for name in names:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        bank = getattr(parent, attribute)
        unfused = ExpertBank.from_fused(bank)
        if check and bank.down_proj.device.type != "meta":
            _check(bank, unfused, name)
        setattr(parent, attribute, unfused)
    return names
