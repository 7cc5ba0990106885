"""A decode step of one C++ call per layer for LLaMA-family models on ``cpu-packed`` linears.

``lightning_gptq::llama_decode_layer`` runs a whole decoder layer for one new token (RMSNorm, the joined q/k/v
matmul, RoPE, the KV-cache write, grouped-query attention, o, RMSNorm, the joined gate/up matmul, SiLU gate, down,
residuals), so a step is the embedding, one call per layer, the final norm and the head: no graph to compile and
none of the dozen small kernels per layer that a compiled step runs between the matmuls. :func:`unavailable` says
why a model cannot take it (another architecture, linears on another backend, inputs not joined, ...)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: transformers model types whose decoder layer is exactly what the C++ layer computes (LLaMA's layout, RoPE on
#: half-split heads, SiLU-gated MLP, RMSNorm with a plain weight); others (Gemma's 1 + w norm, Qwen3's q/k norms,
#: Granite's multipliers, biases) would silently compute something else.
MODEL_TYPES = ("llama", "mistral", "qwen2")
#: RoPE variants whose angles depend on the position alone (``dynamic`` and ``longrope`` rescale with the length seen).
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def _layer_args(layer: nn.Module) -> tuple[list, list[int]] | str:
    """(the 20 tensors and 16 ints ``llama_decode_layer`` takes for this layer's linears) or why there are none."""
    from lightning_gptq.kernels import cpu_gemm
    from lightning_gptq.nn.cpu_packed import CpuPackedQuantLinear

    attn, mlp = layer.self_attn, layer.mlp
    groups = ((attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,))
    tensors, meta = [], []
    for members in groups:
        if any(type(m) is not CpuPackedQuantLinear for m in members):
            return "its linears are not all on cpu-packed"
        if len(members) > 1:
            shared = members[0].__dict__.get("_shared")
            if shared is None or any(m.__dict__.get("_shared") is not shared or m.__dict__.get("_shared_index") != i
                                     for i, m in enumerate(members)) or len(shared.bounds) != len(members):
                return "q/k/v or gate/up do not run as one kernel call (share_inputs could not join them)"
            perm, qweight, scales, zeros, bias, bits, group, n_out, kernel = shared.args
        else:
            (m,) = members
            kernel_name = m.kernel_for(1)
            if kernel_name not in cpu_gemm.KERNELS or m.bias is not None:
                return f"{kernel_name!r} at one row, or a bias, in a projection"
            perm, qweight, scales, zeros, bias, bits, group, n_out = m.__dict__["_matmul_args"]
            kernel = cpu_gemm.KERNELS[kernel_name]
        tensors += [perm, qweight, scales, zeros, bias]
        meta += [bits, group, n_out, kernel]
    return tensors, meta


def unavailable(model: nn.Module) -> str | None:
    """Why ``model`` cannot decode through :class:`FusedLlamaStep`, or None when it can (after ``share_inputs``)."""
    from lightning_gptq.kernels import cpu_gemm

    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in MODEL_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} is not one of {MODEL_TYPES}"
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:  # (before the kernel: a GPU run builds no C++)
        return f"needs an fp32 model on CPU, got {param.dtype} on {param.device.type}"
    reason = cpu_gemm.unavailable()
    if reason:
        return f"the C++ CPU kernel is unavailable: {reason}"
    if getattr(config, "hidden_act", None) not in ("silu", "swish"):
        return f"activation {getattr(config, 'hidden_act', None)!r} is not SiLU"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    rope = getattr(getattr(model.model, "rotary_emb", None), "rope_type", None)
    if rope not in STATIC_ROPE:
        return f"RoPE type {rope!r} (the step reads a table of positions made once: {STATIC_ROPE})"
    for index, layer in enumerate(model.model.layers):
        if getattr(layer.self_attn, "q_norm", None) is not None:
            return "q/k norms in attention"
        args = _layer_args(layer)
        if isinstance(args, str):
            return f"layer {index}: {args}"
    return None


class FusedLlamaStep:
    """``step(token, position, cache)`` → next-token logits [vocab], one ``llama_decode_layer`` call per layer,
    writing into a transformers ``StaticCache`` (already initialized by a prefill) of at most ``positions`` positions.
    Check :func:`unavailable` first."""

    def __init__(self, model: nn.Module, positions: int):
        reason = unavailable(model)
        if reason:
            raise ValueError(f"the fused decode step cannot run this model: {reason}")
        config = model.config
        self.model = model
        inner = model.model
        self.embed, self.head = inner.embed_tokens, model.get_output_embeddings()
        self.norm_weight, self.norm_eps = inner.norm.weight, float(inner.norm.variance_epsilon)
        # the model's own rotary module over every position at once: one row per step, read in C++
        cos, sin = inner.rotary_emb(self.norm_weight[None, None], torch.arange(positions)[None])
        self.cos, self.sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.layers = []
        for layer in inner.layers:
            tensors, meta = _layer_args(layer)
            self.layers.append((layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                                float(layer.input_layernorm.variance_epsilon), float(layer.self_attn.scaling),
                                tensors, meta, [heads, kv_heads, head_dim, config.intermediate_size]))

    @torch.no_grad()
    def __call__(self, token: Tensor, position: int, cache) -> Tensor:
        ops = torch.ops.lightning_gptq
        x = self.embed(token.reshape(1, 1))
        for (ln1, ln2, eps, scale, tensors, meta, dims), c in zip(self.layers, cache.layers):
            x = ops.llama_decode_layer(x, self.cos, self.sin, c.keys, c.values, c.cumulative_length, position, ln1, ln2,
                                       eps, scale, tensors, meta, dims)
        return self.head(ops.rms_norm(x, self.norm_weight, self.norm_eps))[0, -1]
