"""The compiled decode step with inductor's C++ wrapper (no Python between kernels) against its Python wrapper:
two compiled ``StaticDecoder``s of one saved 4-bit SmolLM2 (int8 head) in alternating rounds, first-compile times
printed (``TORCHINDUCTOR_CPP_WRAPPER_BUILD_SEPARATE=1`` builds the wrapper apart from the kernels).

    python experiments/cpp_wrapper_ab.py runs/rtn4/model --rounds 8
"""

from decode_ab import compare, load, parse_args

from lightning_gptq.models.decode import StaticDecoder

args = parse_args()
model = load(args.folder)
compare({name: StaticDecoder(model, 200, compiled=True, cpp_wrapper=name == "cpp") for name in ("python", "cpp")},
        args.rounds)
