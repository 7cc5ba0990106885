"""The compiled decode step with inductor's generated kernels on one thread (``cpp.threads=1``: no OpenMP fork and
join around each small elementwise kernel; our C++ operators keep torch's threads) against the default (all
threads), two compiled ``StaticDecoder``s of one saved 4-bit SmolLM2 (int8 head) in alternating rounds.

    python experiments/inductor_threads_ab.py runs/rtn4/model --rounds 8
"""

import torch
from decode_ab import compare, load, parse_args

from lightning_gptq.models.decode import StaticDecoder

args = parse_args()
model = load(args.folder)
compare({threads: StaticDecoder(model, 200, compiled=True) for threads in ("all", "one")}, args.rounds,
        lambda name: torch._inductor.config.patch({"cpp.threads": 1 if name == "one" else -1}))
