"""Does rotating SmolLM2's residual stream (QuaRot/SpinQuant-style, weight-only) help 4-bit GPTQ here?

Writes a Hugging Face folder of the fp32 model with its residual stream turned by a seeded orthogonal ``Q``
(Haar-random, fp64): ``E ← E·Q`` (embeddings), q/k/v/gate/up ``W ← W·diag(w_norm)·Q`` (the RMSNorm weight folded
first, as ``diag(w)`` does not commute with ``Q``), o/down ``W ← Qᵀ·W``, the LM head ``W·diag(w_final)·Q`` (so the
head is untied from the embedding). RMSNorm is rotation-invariant, so logits equal the original's up to rounding;
the script checks that on 256 random tokens. ``--keep-massive X`` leaves out of the rotation every channel whose RMS
over non-first tokens at some block's input exceeds ``X`` × that block's median channel (their norm weights stay in
the norms): folding a norm weight that damps a massive channel exposes that channel to the weights' rounding.

Then score the folder with the choosing texts (never a reported set), e.g.

    python experiments/rotation_study.py runs/rotated                    # whole stream rotated
    python experiments/rotation_study.py runs/rotated-part --keep-massive 8   # or --keep 507,247,308,17
    python scripts/quality_table.py --rows ours-4 rtn-4 --eval choose --quick --tag rot -- \\
        --model.model=runs/rotated --model.gguf_file=null
"""

from __future__ import annotations

import argparse

import torch

from lightning_gptq.models import load_causal_lm


def massive_channels(model, tokenizer, text: str, ratio: float, tokens: int = 512) -> list[int]:
    """Channels whose RMS over positions 1.. at some block's input exceeds ``ratio`` × that block's median."""
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    found: set[int] = set()

    def hook(module, args):
        rms = args[0][0, 1:].double().pow(2).mean(0).sqrt()
        found.update(torch.nonzero(rms > ratio * rms.median()).flatten().tolist())

    handles = [layer.input_layernorm.register_forward_pre_hook(hook) for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return sorted(found)


def rotation(d: int, keep: list[int], seed: int) -> torch.Tensor:
    """[d, d] orthogonal, fp64: identity on ``keep``, Haar-random on the other channels."""
    rest = torch.tensor([c for c in range(d) if c not in set(keep)])
    q, r = torch.linalg.qr(torch.randn(len(rest), len(rest), generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    full = torch.eye(d, dtype=torch.float64)
    full[rest[:, None], rest[None, :]] = q * torch.sign(torch.diagonal(r))
    return full


@torch.no_grad()
def rotate(model, q: torch.Tensor, keep: list[int]) -> None:
    """Turn a LLaMA-layout model's residual stream by ``q`` in place (see the module docstring)."""
    kept = torch.zeros(q.shape[0], dtype=torch.bool)
    kept[keep] = True

    def fold(norm) -> torch.Tensor:  # the norm's weights on rotated channels move into the readers; 1 stays
        w = torch.where(kept, 1.0, norm.weight.double())
        norm.weight[~kept] = 1.0
        return w

    def reads(linear, w):
        linear.weight.copy_((linear.weight.double() * w) @ q)

    def writes(linear):
        linear.weight.copy_(q.T @ linear.weight.double())
        if linear.bias is not None:
            linear.bias.copy_(linear.bias.double() @ q)

    inner = model.model
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        w = fold(layer.input_layernorm)
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj):
            reads(linear, w)
        writes(attn.o_proj)
        w = fold(layer.post_attention_layernorm)
        for linear in (mlp.gate_proj, mlp.up_proj):
            reads(linear, w)
        writes(mlp.down_proj)
    head = (model.lm_head.weight.double() * fold(inner.norm)) @ q
    inner.embed_tokens.weight = torch.nn.Parameter((inner.embed_tokens.weight.double() @ q).float())
    model.lm_head.weight = torch.nn.Parameter(head.float())
    model.config.tie_word_embeddings = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--model", default="../shared/models")
    parser.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-massive", type=float, default=None, help="leave channels above this RMS ratio unrotated")
    parser.add_argument("--keep", default=None, help="channels to leave unrotated, e.g. 507,247,308,17")
    parser.add_argument("--text", default="../shared/data/calibration/brown.txt", help="finds massive channels")
    args = parser.parse_args()
    model, tokenizer = load_causal_lm(args.model, gguf_file=args.gguf_file)
    keep = [] if args.keep_massive is None else massive_channels(
        model, tokenizer, open(args.text).read()[:20000], args.keep_massive)
    keep = sorted({*keep, *(int(c) for c in args.keep.split(","))} if args.keep else keep)
    print(f"channels left unrotated: {keep}")
    ids = torch.randint(0, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    rotate(model, rotation(model.config.hidden_size, keep, args.seed), keep)
    with torch.no_grad():
        after = model(ids).logits
    print(f"max |logit change| {(after - before).abs().max().item():.2e} (largest logit {before.abs().max().item():.1f})")
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
