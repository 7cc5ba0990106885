"""Write a random-init LLaMA-shaped model (default about 1.2 B parameters, TinyLlama's block shape) as
sharded safetensors, with SmolLM2's tokenizer, for the streaming (bigger than memory) measurements:
no real model that large is available offline here.

    python scripts/make_synthetic_llama.py --out /tmp/llama-1b            # 22 blocks, ~4.7 GB fp32
    python scripts/make_synthetic_llama.py --out /tmp/llama-1b-slice --layers 2
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--shard", default="1GB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default="../shared/models",
                        help="model (hub id, folder or .gguf) whose tokenizer the synthetic model gets")
    parser.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf",
                        help="GGUF file name inside --tokenizer's folder (empty: none)")
    args = parser.parse_args()

    import transformers as tf

    from lightning_gptq.models import load_causal_lm

    _, tokenizer = load_causal_lm(args.tokenizer, gguf_file=args.gguf_file or None)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
                            num_hidden_layers=args.layers, num_attention_heads=args.heads,
                            num_key_value_heads=args.kv_heads, max_position_embeddings=4096, tie_word_embeddings=False,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = tf.LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(args.out, max_shard_size=args.shard)
    tokenizer.save_pretrained(args.out)
    print(f"{args.out}: {params / 1e9:.3f} B parameters, {params * 4 / 2**30:.2f} GiB in fp32, "
          f"{args.layers} blocks ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
