"""Decode of a MoE model, eager against the compiled step (the bank one opaque operator in the graph): a random
Qwen3-MoE of OLMoE-like proportions (8 blocks, hidden 1024, 32 experts of 512, top-4), 4-bit g128 round to
nearest on ``cpu-packed`` (codes as a GPTQ run writes them; speed does not depend on how they were chosen).
``measure_latency(decode="auto")`` times both in one run.

    python experiments/moe_decode.py
"""

import torch
import transformers as tf

from lightning_gptq import QuantConfig, quantize
from lightning_gptq.models import unfuse_experts
from lightning_gptq.models.latency import measure_latency


def main(blocks: int = 8, hidden: int = 1024, experts: int = 32, inter: int = 512, k: int = 4) -> None:
    torch.manual_seed(0)
    config = tf.Qwen3MoeConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=2 * inter,
                               moe_intermediate_size=inter, num_hidden_layers=blocks, num_attention_heads=16,
                               num_key_value_heads=4, head_dim=64, num_experts=experts, num_experts_per_tok=k,
                               tie_word_embeddings=True)
    model = tf.Qwen3MoeForCausalLM(config).eval()
    unfuse_experts(model)
    windows = torch.randint(0, 32000, (2, 64))
    quantize(model, windows, QuantConfig(bits=4, group_size=128), method="rtn", backend="cpu-packed",
             accelerator="cpu")
    for run in range(2):
        result = measure_latency(model, prompt_tokens=64, decode_tokens=32, repeats=3, decode="auto")
        print(f"run {run + 1}: eager {result.eager_decode_ms_per_token:.2f} ms/token, compiled "
              f"{result.compiled_decode_ms_per_token:.2f} ms/token ({result.eager_decode_ms_per_token / result.compiled_decode_ms_per_token:.2f}x), "
              f"compile {result.compile_s:.1f} s, {result.threads} threads")


if __name__ == "__main__":
    main()
