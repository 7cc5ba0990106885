"""Write SmolLM2 checkpoints that vLLM's rules (lightning_gptq/checkpoint/serving.py) say it serves or refuses, then
let scripts/check_vllm.py load each in vLLM: does every prediction hold?

Round to nearest (the rules concern the layout, not the solve), one folder per case under ``--out``:

    HF_HUB_OFFLINE=1 python experiments/vllm_rules.py --out /tmp/vllm-rules \\
        --vllm-python /path/to/vllm-venv/bin/python
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

import lightning_gptq as lg

SYM64 = dict(bits=4, group_size=64, sym=True)
CASES = {  # name: (QuantConfig settings, dynamic rules)
    "sym-g64": (SYM64, None),
    "asym-g64": (dict(SYM64, sym=False), None),
    "sym-g128": (dict(SYM64, group_size=128), None),                      # 576 = 4.5 groups
    "sym3-g64": (dict(SYM64, bits=3), None),
    "sym8-g64": (dict(SYM64, bits=8), None),                             # served on GPUs, not by the CPU kernel
    "mlp-g32": (SYM64, {r"+:.*\.mlp\.": {"group_size": 32}}),            # gate/up alike
    "q-g32": (SYM64, {r"+:.*\.q_proj$": {"group_size": 32}}),            # one part of qkv_proj
    "qkv-g32-parts": (SYM64, {r"+:.*\.(q|k|v)_proj$": {"group_size": 32}}),  # parts alike, fused name not matched
    "qkv-g32-fused": (SYM64, {r"+:.*\.self_attn\.(q|k|v|qkv)_proj$": {"group_size": 32}}),
    "o-dense": (SYM64, {r"-:.*\.o_proj$": {}}),
    "up-dense": (SYM64, {r"-:.*\.up_proj$": {}}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--vllm-python", required=True)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--windows", type=int, default=2)
    args = parser.parse_args()
    windows = torch.randint(3, 1000, (2, 64), generator=torch.Generator().manual_seed(0))  # unused by round to nearest
    folders = []
    for name in args.cases:
        settings, rules = CASES[name]
        folder = Path(args.out) / name
        if not (folder / "model" / "config.json").is_file():
            lg.quantize("../shared/models", windows, lg.QuantConfig(**settings), method="rtn", dynamic=rules,
                        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", output_dir=folder, accelerator="cpu")
        folders.append(str(folder / "model"))
    check = [sys.executable, str(Path(__file__).parents[1] / "scripts" / "check_vllm.py"), *folders,
             "--vllm-python", args.vllm_python, "--windows", str(args.windows), "--decode-tokens", "0"]
    sys.exit(subprocess.run(check).returncode)


if __name__ == "__main__":
    main()
