"""The fused decode step (``StaticDecoder(fused=True)``: one C++ call per LLaMA layer, nothing compiled) against the
compiled step (inductor, our operators, C++ attention): one saved 4-bit SmolLM2, int8 LM head, alternating rounds.

    python experiments/fused_decode_ab.py runs/rtn4/model --rounds 8
"""

from decode_ab import compare, load, parse_args

from lightning_gptq.models.decode import StaticDecoder

args = parse_args()
model = load(args.folder)
compare({"compiled": StaticDecoder(model, 200, compiled=True), "fused": StaticDecoder(model, 200, fused=True)},
        args.rounds)
