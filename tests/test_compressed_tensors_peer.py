"""Our compressed-tensors layout against compressed-tensors itself, both ways: a folder its own compressor packed and
its own ``QuantizationConfig`` described (scripts/ct_peer.py: three schemes by target precedence, act-order groups,
an ignored layer) reads back as exactly the dense weights its ``decompress`` gives; and transformers, through its
compressed-tensors integration, loads our export (per-layer grids, an ignored layer) to the logits we compute.

Needs a Python with compressed-tensors (vLLM's has it), named by ``LIGHTNING_GPTQ_VLLM_PYTHON``; a few seconds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lightning_gptq as lg
from lightning_gptq.checkpoint.compressed_tensors import save_compressed_tensors
from lightning_gptq.nn import QuantLinear
from tiny_models import FACTORIES

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = os.environ.get("LIGHTNING_GPTQ_VLLM_PYTHON")

pytestmark = pytest.mark.skipif(not PEER_PYTHON, reason="LIGHTNING_GPTQ_VLLM_PYTHON is not set (a Python with "
                                                        "compressed-tensors, e.g. vLLM's: see scripts/vllm_peer.py)")


def test_folder_written_by_compressed_tensors_reads_as_its_decompression(tmp_path):
    folder = tmp_path / "peer"
    run = subprocess.run([PEER_PYTHON, str(ROOT / "scripts" / "ct_peer.py"), "write", str(folder)], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    print(run.stdout.strip().splitlines()[-1], file=sys.stderr)
    expected = load_file(str(tmp_path / "peer.expected.safetensors"))
    model, _ = lg.load_quantized(folder, backend="torch")
    kinds = set()
    for name, weight in expected.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear), name
        assert torch.equal(layer.dequantize(), weight), name
        kinds.add((layer.bits, layer.group_size, layer.sym, layer.act_order))
    assert kinds == {(4, 16, False, True), (8, -1, True, False), (4, 16, True, False)}
    assert not isinstance(model.get_submodule("model.layers.1.self_attn.o_proj"), QuantLinear)  # ignored
    assert not isinstance(model.get_submodule("lm_head"), QuantLinear)


def test_transformers_with_compressed_tensors_loads_our_export_to_our_logits(tmp_path):
    windows = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    rules = {r"+:.*\.down_proj$": {"bits": 8, "sym": True}, r"-:.*\.o_proj$": {}}
    model = lg.quantize(FACTORIES["llama"](), windows, lg.QuantConfig(bits=4, group_size=16, sym=False, act_order=True,
                                                                       static_groups=True),
                        dynamic=rules, backend="torch", accelerator="cpu")
    folder = save_compressed_tensors(model, None, tmp_path / "ours")
    (tmp_path / "ids.json").write_text(json.dumps(windows.tolist()))
    run = subprocess.run([PEER_PYTHON, str(ROOT / "scripts" / "ct_peer.py"), "logits", str(folder),
                          str(tmp_path / "ids.json"), str(tmp_path / "theirs.safetensors")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    print(run.stdout.strip().splitlines()[-1], file=sys.stderr)
    theirs = load_file(str(tmp_path / "theirs.safetensors"))["logits"]
    with torch.no_grad():
        ours = model(windows).logits
    assert ours.shape == theirs.shape
    gap = ((theirs - ours).norm() / ours.norm()).item()
    print(f"logits relative gap {gap:.2e}", file=sys.stderr)
    assert gap < 1e-5  # the same dense weights; fp32 summation order only
