"""The compiled decode step with our one-call C++ attention (``attention="auto"``) against inductor's fusion of
transformers' eager attention (``attention="eager"``, the default before): one saved 4-bit SmolLM2, int8 LM head,
two compiled ``StaticDecoder``s in one process, timed in alternating rounds (this machine drifts within minutes).

    python experiments/decode_attention_ab.py runs/rtn4/model --rounds 8
"""

from decode_ab import compare, load, parse_args

from lightning_gptq.models.decode import StaticDecoder

args = parse_args()
model = load(args.folder)
decoders = {name: StaticDecoder(model, 200, compiled=True, attention=name) for name in ("eager", "auto")}
print({name: d.attention for name, d in decoders.items()})
compare(decoders, args.rounds)
