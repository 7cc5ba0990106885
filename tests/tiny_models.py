"""Tiny random-init causal LMs of every supported architecture, built from configs (no downloads)."""

import torch
import transformers as tf

VOCAB = 96
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_LLAMA_LIKE = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, **IDS,
)
# seq 16 > sliding window 4, so sliding and global layers really differ.
SLIDING = dict(sliding_window=4)


def _build(model_class, config):
    torch.manual_seed(0)
    return model_class(config).eval()


FACTORIES = {
    "opt": lambda **kw: _build(tf.OPTForCausalLM, tf.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32, **IDS, **kw)),
    # OPT-350m layout: post-norm, project_in / project_out around the blocks.
    "opt-project": lambda **kw: _build(tf.OPTForCausalLM, tf.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=16, do_layer_norm_before=False, **IDS, **kw)),
    "bloom": lambda **kw: _build(tf.BloomForCausalLM, tf.BloomConfig(
        vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, **IDS, **kw)),
    "llama": lambda **kw: _build(tf.LlamaForCausalLM, tf.LlamaConfig(**{**_LLAMA_LIKE, **kw})),
    "mistral": lambda **kw: _build(tf.MistralForCausalLM, tf.MistralConfig(**_LLAMA_LIKE, **SLIDING, **kw)),
    "qwen2": lambda **kw: _build(tf.Qwen2ForCausalLM, tf.Qwen2Config(
        **_LLAMA_LIKE, use_sliding_window=True, max_window_layers=1, **SLIDING, **kw)),
    "gpt2": lambda **kw: _build(tf.GPT2LMHeadModel, tf.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, **IDS, **kw)),
    "gpt_neox": lambda **kw: _build(tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        rotary_pct=0.25, max_position_embeddings=64, **IDS, **kw)),
    "gemma": lambda **kw: _build(tf.GemmaForCausalLM, tf.GemmaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64, **IDS, **kw)),
    "gemma3": lambda **kw: _build(tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64, **SLIDING,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        final_logit_softcapping=30.0, **IDS, **kw)),
    # q/k norms per head
    "qwen3": lambda **kw: _build(tf.Qwen3ForCausalLM, tf.Qwen3Config(**{**_LLAMA_LIKE, **kw})),
    # norms after attention and MLP (OLMo-2)
    "olmo2": lambda **kw: _build(tf.Olmo2ForCausalLM, tf.Olmo2Config(**{**_LLAMA_LIKE, **kw})),
    # joined qkv_proj and gate_up_proj; o_proj registered before qkv_proj (groups follow execution)
    "phi3": lambda **kw: _build(tf.Phi3ForCausalLM, tf.Phi3Config(**{**_LLAMA_LIKE, **kw})),
    # scales outside the blocks: embeddings x2, logits / 4 (and residual, attention multipliers)
    "granite": lambda **kw: _build(tf.GraniteForCausalLM, tf.GraniteConfig(**{
        **_LLAMA_LIKE, "embedding_multiplier": 2.0, "logits_scaling": 4.0, "residual_multiplier": 0.5,
        "attention_multiplier": 0.3, **kw})),
    # attention and MLP in parallel from one LayerNorm; logits x 0.25
    "cohere": lambda **kw: _build(tf.CohereForCausalLM, tf.CohereConfig(**{**_LLAMA_LIKE, "logit_scale": 0.25, **kw})),
    "phi": lambda **kw: _build(tf.PhiForCausalLM, tf.PhiConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, **IDS, **kw)),
    "falcon": lambda **kw: _build(tf.FalconForCausalLM, tf.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **IDS, **kw)),
    "stablelm": lambda **kw: _build(tf.StableLmForCausalLM, tf.StableLmConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **IDS, **kw)),
}

# Mixture-of-experts models: transformers keeps each block's experts as one bank of 3-D tensors, which
# lightning_gptq.models.unfuse_experts splits into a linear per expert projection.
_MOE = dict(num_experts_per_tok=2)
MOE_FACTORIES = {
    "mixtral": lambda **kw: _build(tf.MixtralForCausalLM, tf.MixtralConfig(
        **{**_LLAMA_LIKE, **_MOE, "num_local_experts": 4, **kw})),
    "qwen3_moe": lambda **kw: _build(tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig(
        **{**_LLAMA_LIKE, **_MOE, "num_experts": 4, "moe_intermediate_size": 32, **kw})),
    # a shared expert beside the routed ones, and its gate
    "qwen2_moe": lambda **kw: _build(tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig(
        **{**_LLAMA_LIKE, **_MOE, "num_experts": 8, "moe_intermediate_size": 32,
           "shared_expert_intermediate_size": 48, **kw})),
    "olmoe": lambda **kw: _build(tf.OlmoeForCausalLM, tf.OlmoeConfig(**{**_LLAMA_LIKE, **_MOE, "num_experts": 4, **kw})),
    # latent attention, a dense first block, shared experts
    "deepseek_v3": lambda **kw: _build(tf.DeepseekV3ForCausalLM, tf.DeepseekV3Config(**{
        **_LLAMA_LIKE, **_MOE, "num_key_value_heads": 4, "n_routed_experts": 4, "moe_intermediate_size": 32,
        "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "q_lora_rank": None, "kv_lora_rank": 16,
        "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8, "rope_parameters": None, **kw})),
    # transposed banks, gate/up interleaved, biases, clamped SwiGLU; attention sinks, sliding layers
    "gpt_oss": lambda **kw: _build(tf.GptOssForCausalLM, tf.GptOssConfig(**{
        **_LLAMA_LIKE, **_MOE, "num_local_experts": 4, "head_dim": 8, **SLIDING,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"], **kw})),
}

ATTENTION_GROUPS_LLAMA = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]
OPT_GROUPS = [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]]
EXPECTED_GROUPS = {
    "opt": OPT_GROUPS,
    "opt-project": OPT_GROUPS,
    "bloom": [["self_attention.query_key_value"], ["self_attention.dense"], ["mlp.dense_h_to_4h"], ["mlp.dense_4h_to_h"]],
    "llama": ATTENTION_GROUPS_LLAMA,
    "mistral": ATTENTION_GROUPS_LLAMA,
    "qwen2": ATTENTION_GROUPS_LLAMA,
    "gpt2": [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
    "gpt_neox": [["attention.query_key_value"], ["attention.dense"], ["mlp.dense_h_to_4h"], ["mlp.dense_4h_to_h"]],
    "gemma": ATTENTION_GROUPS_LLAMA,
    "gemma3": ATTENTION_GROUPS_LLAMA,
    "qwen3": ATTENTION_GROUPS_LLAMA,
    "olmo2": ATTENTION_GROUPS_LLAMA,
    "phi3": [["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"], ["mlp.down_proj"]],
    "granite": ATTENTION_GROUPS_LLAMA,
    "cohere": ATTENTION_GROUPS_LLAMA,
    "phi": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.dense"], ["mlp.fc1"], ["mlp.fc2"]],
    "falcon": [["self_attention.query_key_value"], ["self_attention.dense"], ["mlp.dense_h_to_4h"],
               ["mlp.dense_4h_to_h"]],
    "stablelm": ATTENTION_GROUPS_LLAMA,
}
# Class names of embedding_modules / final_modules, in order.
EXPECTED_STAGES = {
    "opt": (["Embedding", "OPTLearnedPositionalEmbedding"], ["LayerNorm", "Linear"]),
    "opt-project": (["Embedding", "OPTLearnedPositionalEmbedding", "Linear"], ["Linear", "Linear"]),
    "bloom": (["Embedding", "LayerNorm"], ["LayerNorm", "Linear"]),
    "llama": (["Embedding", "LlamaRotaryEmbedding"], ["LlamaRMSNorm", "Linear"]),
    "mistral": (["Embedding", "MistralRotaryEmbedding"], ["MistralRMSNorm", "Linear"]),
    "qwen2": (["Embedding", "Qwen2RotaryEmbedding"], ["Qwen2RMSNorm", "Linear"]),
    "gpt2": (["Embedding", "Embedding"], ["LayerNorm", "Linear"]),
    "gpt_neox": (["Embedding", "GPTNeoXRotaryEmbedding"], ["LayerNorm", "Linear"]),
    "gemma": (["GemmaTextScaledWordEmbedding", "GemmaRotaryEmbedding"], ["GemmaRMSNorm", "Linear"]),
    "gemma3": (["Gemma3TextScaledWordEmbedding", "Gemma3RotaryEmbedding"], ["Gemma3RMSNorm", "Linear"]),
    "qwen3": (["Embedding", "Qwen3RotaryEmbedding"], ["Qwen3RMSNorm", "Linear"]),
    "olmo2": (["Embedding", "Olmo2RotaryEmbedding"], ["Olmo2RMSNorm", "Linear"]),
    "phi3": (["Embedding", "Phi3RotaryEmbedding"], ["Phi3RMSNorm", "Linear"]),
    "granite": (["Embedding", "GraniteRotaryEmbedding"], ["GraniteRMSNorm", "Linear"]),
    "cohere": (["Embedding", "CohereRotaryEmbedding"], ["CohereLayerNorm", "Linear"]),
    "phi": (["Embedding", "PhiRotaryEmbedding"], ["LayerNorm", "Linear"]),
    "falcon": (["Embedding", "FalconRotaryEmbedding"], ["LayerNorm", "Linear"]),
    "stablelm": (["Embedding", "StableLmRotaryEmbedding"], ["LayerNorm", "Linear"]),
}


def token_ids(n: int = 3, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seqlen), generator=generator)


def full_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits
