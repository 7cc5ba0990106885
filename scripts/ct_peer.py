"""compressed-tensors' own side of our checks (run under a Python that has it and transformers, e.g. vLLM's).

``write <folder>``: a compressed-tensors folder written by compressed-tensors itself.

For a tiny random LLaMA: every linear but the head gets random codes, zero points, power-of-two scales and (for
act-order) a shuffled ``g_idx``; compressed-tensors' own ``PackedQuantizationCompressor`` packs the weight those
mean, its ``QuantizationConfig`` writes the config block, and its ``decompress`` gives the dense weight each layer
must read back as (saved beside the folder, ``<folder>.expected.safetensors``). tests/test_compressed_tensors_peer.py
compares our reader with it.

``logits <folder> <ids.json> <out.safetensors>``: transformers' ``from_pretrained`` loads a compressed-tensors
folder (its compressed-tensors integration decompresses it) and saves its fp32 logits on the given token windows.

    <python with compressed-tensors> scripts/ct_peer.py write <folder>
    <python with compressed-tensors> scripts/ct_peer.py logits <folder> <ids.json> <out.safetensors>
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
import transformers as tf
from compressed_tensors import __version__ as ct_version
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from safetensors.torch import save_file

SCHEMES = {  # config group -> (targets, weights): a pattern group beside a class-name group, act-order groups
    "group_0": (["Linear"], dict(num_bits=4, symmetric=False, strategy="group", group_size=16, actorder="group")),
    "group_1": (["re:.*down_proj$"], dict(num_bits=8, symmetric=True, strategy="channel")),
    "group_2": (["re:.*self_attn.v_proj$"], dict(num_bits=4, symmetric=True, strategy="group", group_size=16)),
}
IGNORE = ["lm_head", "re:.*layers.1.self_attn.o_proj$"]


def scheme_of(name: str) -> str | None:
    """compressed-tensors' precedence for these targets: patterns before the class name; ignore first."""
    if name == "lm_head" or name.endswith("layers.1.self_attn.o_proj"):
        return None
    for group in ("group_1", "group_2"):
        if re.match(SCHEMES[group][0][0][3:], name):
            return group
    return "group_0"


def main(folder: Path) -> None:
    config = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    schemes = {g: QuantizationScheme(targets=t, weights=QuantizationArgs(**w)) for g, (t, w) in SCHEMES.items()}
    state, expected = {}, {}
    gen = torch.Generator().manual_seed(1)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for key, tensor in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        group = scheme_of(owner) if owner in linears else None
        if group is None:
            state[key] = tensor
            continue
        args = schemes[group].weights
        out, cols = tensor.shape
        bits, sym = args.num_bits, args.symmetric
        width = args.group_size if args.strategy == "group" else cols
        n_groups = cols // width
        low, high = -(1 << (bits - 1)), 1 << (bits - 1)
        q = torch.randint(low, high, (out, cols), generator=gen)
        z = torch.zeros(out, n_groups, dtype=torch.int64) if sym else torch.randint(low, high, (out, n_groups), generator=gen)
        s = (2.0 ** -torch.randint(4, 9, (out, n_groups), generator=gen)).to(torch.bfloat16)  # exact in every dtype
        g_idx = torch.arange(cols) // width
        if args.actorder == "group":
            g_idx = g_idx[torch.randperm(cols, generator=gen)]
        weight = ((q - z[:, g_idx]) * s.float()[:, g_idx]).to(torch.bfloat16)
        params = {"weight": weight, "weight_scale": s, "weight_zero_point": z.to(torch.int8)}
        if args.actorder == "group":
            params["weight_g_idx"] = g_idx.to(torch.int32)
        packed = PackedQuantizationCompressor.compress(params, schemes[group])
        expected[owner] = PackedQuantizationCompressor.decompress(packed, schemes[group])["weight"].float()
        state.update({f"{owner}.{k}": v for k, v in packed.items()})
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in expected.items()}, str(folder.parent / f"{folder.name}.expected.safetensors"))
    block = QuantizationConfig(config_groups=schemes, format="pack-quantized", quantization_status="compressed",
                               ignore=IGNORE).model_dump(mode="json")
    config_dict = {**model.config.to_dict(), "quantization_config": block}
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2, default=str))
    print(json.dumps({"compressed_tensors": ct_version, "layers": len(expected), "folder": str(folder)}))


def logits(folder: Path, ids: Path, out: Path) -> None:
    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    windows = torch.tensor(json.loads(ids.read_text()))
    with torch.no_grad():
        result = model(windows).logits.float()
    save_file({"logits": result.contiguous()}, str(out))
    print(json.dumps({"transformers": tf.__version__, "compressed_tensors": ct_version, "shape": list(result.shape)}))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        main(Path(sys.argv[2]))
    elif sys.argv[1] == "logits":
        logits(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        raise SystemExit(__doc__)
