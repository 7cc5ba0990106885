"""The fused decode step with the int8 layer kernels computing one output tile at a time against two at once
(``cpu_gemm`` ``set_tile_streams``; experiments/tile_streams_ab.py times the kernels alone): one saved 4-bit SmolLM2,
int8 LM head, one decoder, alternating rounds.

    python experiments/tile_streams_step_ab.py runs/rtn4/model --rounds 8
"""

from decode_ab import load, parse_args, run

from lightning_gptq.kernels import cpu_gemm
from lightning_gptq.models.decode import StaticDecoder

args = parse_args()
model = load(args.folder)
decoder = StaticDecoder(model, 200, fused=True)
ext = cpu_gemm._load()
run(decoder)
times, tokens = {1: [], 2: []}, {}
for _ in range(args.rounds):
    for streams in (1, 2):
        ext.set_tile_streams(streams)
        ms, tokens[streams] = run(decoder)
        times[streams].append(ms)
ext.set_tile_streams(2)
for s, ms in times.items():
    print(f"{s} tile(s) at once: best {min(ms):.2f}, median {sorted(ms)[len(ms) // 2]:.2f} ms/token")
ratios = sorted(a / b for a, b in zip(times[1], times[2]))
print(f"one tile / two tiles per round: median {ratios[len(ratios) // 2]:.3f} (min {ratios[0]:.3f}, max {ratios[-1]:.3f}); "
      f"greedy tokens equal: {tokens[1] == tokens[2]}")
