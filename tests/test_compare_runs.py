"""Layer digests in the run summary, and scripts/compare_runs.py reading where two runs parted."""

import importlib.util
import io
import json
from pathlib import Path

from lightning import Trainer
from tiny_lm import CALIBRATION_TEXT, tiny_model_dir

from lightning_gptq.lightning import CalibrationDataModule, GPTQCallback, GPTQModule, HessianCapture
from lightning_gptq.quant import QuantConfig

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "scripts" / "compare_runs.py")
cr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cr)


def record(name, block, h, c, s):
    return {"name": name, "block": block, "hessian_sha256": h, "codes_sha256": c, "scales_sha256": s}


def summary(layers, **extra):
    return {"tool": {"cpu": "X", "cpu_capability": "AVX2", "threads": 2}, "layers": layers, **extra}


def run(a, b):
    out = io.StringIO()
    return cr.compare(a, b, out), out.getvalue()


def test_compare_names_where_the_streams_and_the_solves_parted():
    base = [record("l.0.q", 0, "h0", "c0", "s0"), record("l.0.o", 0, "h1", "c1", "s1"), record("l.1.q", 1, "h2", "c2", "s2")]
    assert run(summary(base), summary(base))[0] == 0
    # the same Hessians, other codes at l.0.o: the solve differed there
    solve = [base[0], record("l.0.o", 0, "h1", "X", "s1"), record("l.1.q", 1, "H", "X", "S")]
    status, text = run(summary(base), summary(solve))
    assert status == 1 and "first layer whose codes differ: l.0.o" in text and "the solve itself" in text
    assert "first layer whose Hessian differs: l.1.q" in text and "0:1/2 1:1/1" in text
    # inputs parted at l.0.o, codes only later; scales first
    stream = [base[0], record("l.0.o", 0, "H", "c1", "S"), record("l.1.q", 1, "H", "X", "S")]
    status, text = run(summary(base), summary(stream))
    assert status == 1 and "first layer whose codes differ: l.1.q" in text and "parted at l.0.o" in text
    assert "first layer whose scales differ: l.0.o" in text
    # scales only: codes agree (exit 0), the scales line says where
    status, text = run(summary(base), summary([base[0], base[1], record("l.1.q", 1, "H", "c2", "S")]))
    assert status == 0 and "scales differ: l.1.q" in text and "codes, zero points and column order agree" in text
    assert run(summary(base), summary(base[:2]))[0] == 2  # other layers
    old = [{k: v for k, v in r.items() if not k.endswith("sha256")} for r in base]
    assert run(summary(base), summary(old))[0] == 2  # written before digests existed
    status, text = run(summary(base, quant={"bits": 4}), summary(base, quant={"bits": 3}))
    assert "settings differ: quant" in text
    # measured sink weights are results, not settings: where they parted, and by how much
    weights = {"sink_weight": "attention", "block_weights": {"0": 5.0, "1": 90.0, "2": 300.0}}
    other = {"sink_weight": "attention", "block_weights": {"0": 5.0, "1": 90.0 * (1 + 1e-8), "2": 301.0}}
    status, text = run(summary(base, hessian=weights), summary(base, hessian=other))
    assert "settings differ" not in text and "sink weights differ from block 1 on (2 of 3 blocks, up to 3.3e-03" in text


def _fit(root, model_dir, seed):
    module = GPTQModule(str(model_dir), eval_after=False, latency=False, output_dir=str(root))
    dm = CalibrationDataModule(str(CALIBRATION_TEXT), nsamples=4, seqlen=20, seed=seed, eval_datasets=[], eval_seqlen=32)
    trainer = Trainer(callbacks=[HessianCapture(), GPTQCallback(QuantConfig(bits=4, group_size=16))], logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=root)
    trainer.fit(module, dm)
    return json.loads((root / "summary.json").read_text())


def test_two_fits_agree_digest_for_digest_and_another_seed_parts_at_the_first_layer(tmp_path, capsys):
    model_dir = tiny_model_dir(tmp_path, "llama")
    a, b, c = (_fit(tmp_path / name, model_dir, seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert all(len(r["hessian_sha256"]) == 16 and len(r["codes_sha256"]) == 16 for r in a["layers"])
    assert a["tool"]["cpu"] and a["tool"]["cpu_capability"]
    assert cr.main([str(tmp_path / "a"), str(tmp_path / "b" / "summary.json")]) == 0
    assert cr.main([str(tmp_path / "a"), str(tmp_path / "c")]) == 1
    text = capsys.readouterr().out
    first = a["layers"][0]["name"]
    assert f"first layer whose Hessian differs: {first}" in text and "settings differ: calibration" in text
    assert [r["hessian_sha256"] for r in a["layers"]] == [r["hessian_sha256"] for r in b["layers"]]
    assert a["layers"][0]["hessian_sha256"] != c["layers"][0]["hessian_sha256"]


def test_digest_reads_big_tensors_in_chunks_and_tells_dtype_and_shape_apart():
    import torch

    from lightning_gptq.lightning.callbacks import digest

    t = torch.randn(300, 301, dtype=torch.float64)
    assert digest(t) == digest(t, chunk_bytes=1000) == digest(t.T.contiguous().T) and len(digest(t)) == 16
    u = t.clone()
    u[150, 7] = torch.nextafter(u[150, 7], torch.tensor(float("inf"), dtype=torch.float64))  # one ulp
    assert digest(u) != digest(t)
    assert digest(t.float()) != digest(t) and digest(t.reshape(301, 300)) != digest(t)
