"""The same codes on another CPU: `calibration_dtype: float64` against the fp32 stream (slow: minutes).

Another CPU is stood in for by this one with PyTorch, MKL and oneDNN held to a smaller instruction set
(AVX2 on an AVX-512 machine, SSE4.2 on an AVX2 one): their kernels then sum in other orders, as
another machine's would. SmolLM2 (30 blocks: deep enough for GPTQ's cascade), 16 × 512 windows, the
shipped config. The fp32 pair must differ (else this machine cannot stand in, and the test says so);
the fp64 pair must give bit-equal codes, zero points and column order in every layer.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_lm import SMOLLM2_GGUF

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason=f"needs the shared model at {SMOLLM2_GGUF}"),
]


def smaller_isa() -> dict[str, str] | None:
    native = torch.backends.cpu.get_cpu_capability()
    if native.startswith("AVX512"):
        return {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    if native == "AVX2":
        return {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"}
    return None


def fit(out: Path, env: dict, *extra: str) -> dict:
    command = [sys.executable, "-m", "lightning_gptq", "fit", "--config=configs/smollm2-135m.yaml",
               f"--model.model={SMOLLM2_GGUF.parent}", "--data.nsamples=16", "--data.seqlen=512",
               "--model.eval_after=false", "--model.latency=false", f"--model.output_dir={out}",
               f"--trainer.default_root_dir={out}-root", "--trainer.logger=false",
               "--trainer.enable_progress_bar=false", "--resume.every_n_blocks=0", *extra]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def integer_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(folder / "model" / "model.safetensors")
    return {n: t for n, t in tensors.items() if n.endswith((".qweight", ".qzeros", ".g_idx"))}


def test_fp64_calibration_gives_the_same_codes_under_another_instruction_set(tmp_path):
    capped = smaller_isa()
    if capped is None:
        pytest.skip(f"no smaller instruction set to stand in for another CPU below {torch.backends.cpu.get_cpu_capability()}")
    runs = {(dtype, isa): fit(tmp_path / f"{dtype}-{isa}", env, *([f"--model.calibration_dtype={dtype}"] if dtype else []))
            for dtype in (None, "float64") for isa, env in (("native", {}), ("capped", capped))}
    assert runs[(None, "capped")]["tool"]["cpu_capability"] != runs[(None, "native")]["tool"]["cpu_capability"]
    fp32 = [(a["name"], a["codes_sha256"] == b["codes_sha256"])
            for a, b in zip(runs[(None, "native")]["layers"], runs[(None, "capped")]["layers"])]
    if all(same for _, same in fp32):
        pytest.skip("the fp32 stream gave the same codes under both instruction sets here, so this machine cannot "
                    "stand in for another CPU")
    a, b = runs[("float64", "native")]["layers"], runs[("float64", "capped")]["layers"]
    differ = [x["name"] for x, y in zip(a, b) if x["codes_sha256"] != y["codes_sha256"]]
    assert not differ, f"fp64 codes differ in {len(differ)} layers, from {differ[0]}"
    x, y = integer_tensors(tmp_path / "float64-native"), integer_tensors(tmp_path / "float64-capped")
    assert x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)
    print(f"fp32: codes differ from {next(n for n, same in fp32 if not same)} on; fp64: bit-equal in {len(a)} layers")
