"""Decode with q/k/v and gate/up as one kernel call each (``share_inputs``) against separate calls: two copies
of a saved 4-bit SmolLM2 in one process, int8 LM head, each through a compiled ``StaticDecoder``, timed in
alternating rounds (this machine's speed drifts by tens of percent within minutes).

    python experiments/shared_inputs_ab.py runs/rtn4/model --rounds 8
"""

from decode_ab import compare, load, parse_args

import lightning_gptq.models.decode as decode

args = parse_args()
share = decode.share_inputs
decoders = {}
for name in ("separate", "shared"):
    model = load(args.folder)
    decode.share_inputs = share if name == "shared" else (lambda model: 0)
    decoders[name] = decode.StaticDecoder(model, 200, compiled=True)
decode.share_inputs = share
compare(decoders, args.rounds)
