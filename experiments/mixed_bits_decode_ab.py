"""Decode of two saved SmolLM2 folders side by side (fused step, int8 LM head, alternating rounds): e.g. 4-bit
everywhere against 8-bit down_proj (``gptq.dynamic``), to price a per-layer rule in decode time.

    python experiments/mixed_bits_decode_ab.py runs/rtn4/model runs/rtn4d8/model --rounds 8
"""
import argparse

import torch
from decode_ab import compare, load

from lightning_gptq.models.decode import StaticDecoder

p = argparse.ArgumentParser()
p.add_argument("a")
p.add_argument("b")
p.add_argument("--rounds", type=int, default=8)
args = p.parse_args()
torch.set_grad_enabled(False)
compare({"a": StaticDecoder(load(args.a), 200, fused=True), "b": StaticDecoder(load(args.b), 200, fused=True)},
        args.rounds)
