"""GGUF export (``lightning_gptq.checkpoint.gguf_export``): each layer's blocks decode, by gguf-py's reference
decoder, to the layer's own weight with its scale and minimum rounded to fp16; a real model's exported file, read
back by transformers' GGUF reader, gives the quantized model's logits; what GGUF cannot hold exactly is refused."""

import os
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import lightning_gptq as lg
from lightning_gptq.checkpoint.gguf_export import GGUFExportError, encode_layer, gguf_type_for, save_gguf
from lightning_gptq.nn import LayerSpec, QuantLinear
from lightning_gptq.nn.timing import random_layer

from tiny_lm import SMOLLM2_GGUF

ROOT = Path(__file__).resolve().parents[1]


def layer_of(out_f, in_f, bits, group_size, sym, act_order=False, seed=0):
    return random_layer(QuantLinear, LayerSpec(in_f, out_f, bits, group_size, sym, act_order, False, "cpu", "float32"),
                        seed)


def expected_decode(layer: QuantLinear, kind: str) -> torch.Tensor:
    """The weight GGUF's ``kind`` holds for ``layer``: ``s·(q − z)`` with ``s`` (and, for Q4_1, ``−s·z``) in fp16."""
    width = layer.contiguous_group_size()
    s = layer.scales.T.repeat_interleave(width, dim=1)[:, : layer.in_features]
    z = layer.zero_points().T.repeat_interleave(width, dim=1)[:, : layer.in_features].float()
    q = layer.codes().float()
    d = s.half().float()
    if kind == "Q4_1":
        return d * q + (-s * z).half().float()
    return d * (q - z)


@pytest.mark.parametrize("bits, group_size, sym, kind", [
    (4, 128, False, "Q4_1"), (4, 32, True, "Q4_0"), (4, -1, True, "Q4_0"), (3, 64, False, "Q4_0"),
    (2, 32, False, "Q4_0"), (8, 128, True, "Q8_0"), (5, 64, False, "Q8_0"), (6, -1, True, "Q8_0"),
])
def test_blocks_decode_to_the_layer(bits, group_size, sym, kind):
    layer = layer_of(96, 256, bits, group_size, sym, seed=bits)  # asymmetric 2/3-bit codes: q − z within −8..7
    assert gguf_type_for(layer) == (kind, "")
    blocks = encode_layer(layer, kind)
    qtype = gguf.GGMLQuantizationType[kind]
    assert blocks.dtype == np.uint8 and blocks.shape == (96, 256 // 32 * gguf.GGML_QUANT_SIZES[qtype][1])
    got = torch.from_numpy(gguf.quants.dequantize(blocks, qtype))
    torch.testing.assert_close(got, expected_decode(layer, kind), rtol=0, atol=0)
    # and within fp16's rounding of the layer's fp32 weight
    step = layer.scales.T.repeat_interleave(layer.contiguous_group_size(), dim=1)[:, :256]
    assert float(((got - layer.dequantize()).abs() / step).max()) < 2 ** -10 * 2 ** bits * 2


def test_rows_are_written_in_the_order_asked():
    layer = layer_of(64, 128, 4, 32, False)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(1)).numpy()
    got = gguf.quants.dequantize(encode_layer(layer, "Q4_1", order), gguf.GGMLQuantizationType.Q4_1)
    np.testing.assert_array_equal(got, expected_decode(layer, "Q4_1").numpy()[order])


@pytest.mark.parametrize("bits, group_size, sym, act_order, words", [
    (4, 128, False, True, "act-order"), (4, 16, False, False, "not whole 32-column"),
    (8, 64, False, False, "beyond Q8_0"),
])
def test_layers_gguf_cannot_hold_are_named(bits, group_size, sym, act_order, words):
    layer = layer_of(32, 256, bits, group_size, sym, act_order)
    kind, why = gguf_type_for(layer)
    assert kind is None and words in why


def test_a_moe_model_is_refused_before_the_template_is_read(tmp_path):
    from tiny_models import MOE_FACTORIES, token_ids

    model = MOE_FACTORIES["mixtral"]()
    lg.quantize(model, token_ids(n=2, seqlen=8), lg.QuantConfig(bits=4, group_size=16), method="rtn", accelerator="cpu")
    template = tmp_path / "template.gguf"
    template.write_bytes(b"not read")
    with pytest.raises(GGUFExportError, match=r"MoE expert layers \(e.g. model.layers.0.mlp.experts.0.gate_proj\)"):
        save_gguf(model, tmp_path / "out.gguf", template)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["template.gguf"]


def test_scales_beyond_fp16_are_refused():
    layer = layer_of(32, 64, 4, 32, True)
    layer.scales.fill_(1e6)
    with pytest.raises(GGUFExportError, match="overflow fp16"):
        encode_layer(layer, "Q4_0")


# -- a real model: two blocks of SmolLM2 ---------------------------------------------------------------------------
needs_smollm2 = pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason=f"needs {SMOLLM2_GGUF} (../shared) as template")


def smollm2_blocks(path: Path, keep: list[int]) -> Path:
    """SmolLM2's GGUF with only the blocks ``keep`` (``scripts/make_gpu_bundle.py``'s truncation)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from make_gpu_bundle import truncate_gguf
    finally:
        sys.path.pop(0)
    truncate_gguf(SMOLLM2_GGUF, path, keep)
    return path


@pytest.fixture(scope="module")
def smollm2_2blocks(tmp_path_factory):
    """(template path, quantized model, windows): SmolLM2's first two blocks as GGUF; GPTQ 4-bit g128 asymmetric
    with act-order and static groups (the shipped config's grid), written by ``quantize`` with its folder and GGUF."""
    root = tmp_path_factory.mktemp("gguf")
    cache, os.environ["LIGHTNING_GPTQ_CACHE"] = os.environ.get("LIGHTNING_GPTQ_CACHE"), str(root / "cache")
    try:
        template = smollm2_blocks(root / "smollm2-2blocks.gguf", [0, 1])
        windows = torch.randint(0, 49152, (4, 48), generator=torch.Generator().manual_seed(0))
        model = lg.quantize(str(template), windows, lg.QuantConfig(bits=4, group_size=128, sym=False, act_order=True,
                                                                   static_groups=True), progress=False,
                            output_dir=root / "run", gguf="auto")
        yield template, model, windows, root
    finally:
        os.environ.pop("LIGHTNING_GPTQ_CACHE")
        if cache is not None:
            os.environ["LIGHTNING_GPTQ_CACHE"] = cache


def logits(model, windows):
    with torch.no_grad():
        return model(windows).logits


def fp16_grids(model):
    """A copy of ``model`` whose quantized layers decode as their Q4_1 blocks do (scales and minimums in fp16)."""
    import copy
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, QuantLinear):
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight.data = expected_decode(module, gguf_type_for(module)[0])
            module.forward = dense.forward
    return twin


@needs_smollm2
def test_smollm2_export_copies_what_gptq_left_alone(smollm2_2blocks, tmp_path):
    template, model, _, root = smollm2_2blocks
    report = save_gguf(model, tmp_path / "out.gguf", template)
    assert (root / "run" / "model.gguf").read_bytes() == (tmp_path / "out.gguf").read_bytes()  # quantize(gguf="auto")
    assert report.types == {"Q4_1": 14} and report.copied == 6 and not report.rewritten
    assert 0 < report.fp16_error < 0.05
    fields = gguf.GGUFReader(tmp_path / "out.gguf").fields
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_1
    assert fields["llama.block_count"].contents() == 2 and fields["general.quantized_by"].contents() == "lightning-gptq"


@needs_smollm2
def test_smollm2_export_reads_back_as_the_quantized_model_with_a_changed_norm(smollm2_2blocks, tmp_path):
    from lightning_gptq.models import load_causal_lm

    template, model, windows, _ = smollm2_2blocks
    norm = model.model.layers[1].post_attention_layernorm.weight
    kept = norm.detach().clone()
    try:
        norm.data.mul_(1.5)  # as input scaling folds a factor into a norm
        report = save_gguf(model, tmp_path / "out.gguf", template)
        assert report.rewritten == ["blk.1.ffn_norm.weight"] and report.copied == 6 - 1
        back, _ = load_causal_lm(str(tmp_path / "out.gguf"))  # transformers' GGUF reader: un-permutes q/k
        torch.testing.assert_close(logits(back, windows), logits(fp16_grids(model), windows), rtol=1e-4, atol=1e-4)
    finally:
        norm.data.copy_(kept)


@needs_smollm2
def test_a_template_of_another_depth_is_refused(smollm2_2blocks, tmp_path):
    _, model, _, _ = smollm2_2blocks
    deeper = smollm2_blocks(tmp_path / "smollm2-3blocks.gguf", [0, 1, 2])
    with pytest.raises(GGUFExportError, match="this model's source"):
        save_gguf(model, tmp_path / "out.gguf", deeper)
    assert not list(tmp_path.glob("out.gguf*"))


@needs_smollm2
def test_the_template_is_parsed_once_per_fit_and_again_once_it_changes(smollm2_2blocks, tmp_path, monkeypatch):
    from lightning_gptq.checkpoint.gguf_export import template_mismatch

    _, model, _, _ = smollm2_2blocks
    template = smollm2_blocks(tmp_path / "source.gguf", [0, 1])
    deeper = smollm2_blocks(tmp_path / "deeper.gguf", [0, 1, 2])
    parsed = []
    monkeypatch.setattr(gguf, "GGUFReader", lambda path, *a, **k: parsed.append(path) or real(path, *a, **k))
    real = gguf.gguf_reader.GGUFReader
    assert template_mismatch(model, template) is None  # GGUFExport.setup, then its on_fit_end:
    save_gguf(model, tmp_path / "out.gguf", template, verify=False)
    assert parsed == [template.resolve()]
    deeper.replace(template)  # the same path, another file
    assert "this model's source" in template_mismatch(model, template)
    assert parsed[1:] == [template.resolve()]


@needs_smollm2
def test_cli_finds_the_template_the_folder_was_fit_from(smollm2_2blocks, tmp_path, capsys):
    from lightning_gptq.export_gguf import main

    template, _, _, root = smollm2_2blocks
    folder = root / "run" / "model"
    assert main([str(folder), str(tmp_path / "cli.gguf")]) == 0
    assert f"from {template}" in capsys.readouterr().out
    assert gguf.GGUFReader(tmp_path / "cli.gguf").fields["llama.block_count"].contents() == 2
    assert main([str(folder), str(tmp_path / "x.gguf"), "--template", str(tmp_path / "none.gguf")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_without_a_template_says_what_to_pass(tmp_path, capsys):
    from tiny_lm import tiny_model_dir

    from lightning_gptq.export_gguf import main

    model = lg.quantize(tiny_model_dir(tmp_path, "llama"), torch.randint(4, 60, (2, 8)), lg.QuantConfig(group_size=32),
                        method="rtn", accelerator="cpu")
    folder = lg.save_quantized(model, None, tmp_path / "quantized")  # fit from a HF folder: no .gguf to name
    assert main([str(folder), str(tmp_path / "x.gguf")]) == 2
    assert "--template" in capsys.readouterr().err
    # a folder that is not a quantized checkpoint is named as such (it was told to pass --template)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    assert main([str(tmp_path / "plain"), str(tmp_path / "x.gguf")]) == 2
    assert "is not a quantized checkpoint folder" in capsys.readouterr().err


@needs_smollm2
def test_fit_refuses_a_gguf_template_of_another_model_before_calibrating(tmp_path):
    """Found by a user audit: a template of another model failed only when the GGUF was written, after the fit."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException
    from tiny_lm import tiny_model_dir

    from lightning_gptq.cli import main

    with pytest.raises(MisconfigurationException, match="gguf.template: template tensor token_embd.weight is "
                                                         r"\[49152, 576\], the model's model.embed_tokens.weight is"):
        main(fit_args(tiny_model_dir(tmp_path, "llama"), tmp_path / "runs", f"--gguf.template={SMOLLM2_GGUF}"))
    assert not list(tmp_path.rglob("quantized"))


def test_cli_runs_as_a_module_from_the_checkout():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "lightning_gptq.export_gguf", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "--template" in out.stdout


@needs_smollm2
def test_reading_back_catches_blocks_that_decode_wrong(smollm2_2blocks, tmp_path, monkeypatch):
    from lightning_gptq.checkpoint import gguf_export

    template, model, _, _ = smollm2_2blocks
    right = gguf_export.encode_layer

    def nibbles_swapped(layer, kind, rows=None):  # the two halves of each block's codes exchanged
        blocks = right(layer, kind, rows).reshape(layer.out_features, -1, 20).copy()
        blocks[..., 4:] = (blocks[..., 4:] >> 4) | (blocks[..., 4:] << 4)
        return blocks.reshape(layer.out_features, -1)

    monkeypatch.setattr(gguf_export, "encode_layer", nibbles_swapped)
    with pytest.raises(GGUFExportError, match="do not decode to the layer's weight"):
        save_gguf(model, tmp_path / "out.gguf", template)
    assert not list(tmp_path.glob("out.gguf*"))


@needs_smollm2
def test_the_template_is_never_overwritten_and_a_non_gguf_template_is_named(smollm2_2blocks, tmp_path):
    import hashlib

    _, model, _, _ = smollm2_2blocks
    template = smollm2_blocks(tmp_path / "source.gguf", [0, 1])
    digest = hashlib.sha256(template.read_bytes()).hexdigest()
    with pytest.raises(GGUFExportError, match="is the template"):
        save_gguf(model, tmp_path / "." / "source.gguf", template)
    assert hashlib.sha256(template.read_bytes()).hexdigest() == digest
    text = tmp_path / "notes.gguf"
    text.write_text("not a GGUF file")
    with pytest.raises(GGUFExportError, match="cannot be read as GGUF"):
        save_gguf(model, tmp_path / "out.gguf", text)
    assert not list(tmp_path.glob("out.gguf*"))


# -- fit writes it: GGUFExport, `--gguf.path` --------------------------------------------------------------------
def fit_args(model, root, *extra):
    from test_lightning import cli_args

    return ["fit", *cli_args(model, root, "--model.eval_after=false", "--model.latency=false", "--gguf.path=auto",
                             *extra, nsamples=2, seqlen=32, group_size=64)]


@needs_smollm2
def test_fit_writes_the_gguf_the_export_cli_writes_from_its_folder(smollm2_2blocks, tmp_path):
    from test_lightning import only_run_dir

    from lightning_gptq.cli import main
    from lightning_gptq.export_gguf import main as export

    template = smollm2_2blocks[0]
    main(fit_args(template, tmp_path / "runs", "--gptq.quant.act_order=true", "--gptq.quant.static_groups=true"))
    out = only_run_dir(tmp_path / "runs") / "quantized"
    assert export([str(out / "model"), str(tmp_path / "again.gguf")]) == 0
    assert (out / "model.gguf").read_bytes() == (tmp_path / "again.gguf").read_bytes()
    assert gguf.GGUFReader(out / "model.gguf").fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_1


@needs_smollm2
@pytest.mark.parametrize("extra, words", [
    (["--gptq.quant.group_size=48"], "not a multiple of GGUF's 32"),
    (["--gptq.quant.act_order=true", "--gptq.quant.static_groups=false"], "static_groups=true"),
    (["--gptq.quant.bits=8"], "quant.sym=true"),
    (["--gguf.template=missing.gguf"], "missing.gguf is not a file"),
    (["--gptq.dynamic={'+:.*down_proj': {group_size: 16}}"], r"not a multiple of GGUF's 32.*dynamic '\+:\.\*down_proj'"),
])
def test_fit_refuses_a_gguf_it_could_not_write_before_calibrating(smollm2_2blocks, tmp_path, extra, words):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_gptq.cli import main

    with pytest.raises(MisconfigurationException, match=words):
        main(fit_args(smollm2_2blocks[0], tmp_path / "runs", *extra))
    assert not list(tmp_path.rglob("quantized"))


def test_quantize_gguf_auto_needs_an_output_dir():
    with pytest.raises(ValueError, match="give output_dir"):
        lg.quantize("never-loaded", torch.zeros(1, 8, dtype=torch.long), gguf="auto")


def test_gguf_export_in_another_module_says_what_to_call():
    from lightning.pytorch import LightningModule
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_gptq.lightning import GGUFExport

    with pytest.raises(MisconfigurationException, match="save_gguf"):
        GGUFExport("out.gguf").setup(None, LightningModule(), "fit")


def test_fit_from_a_folder_asks_for_a_gguf_template(tmp_path):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException
    from tiny_lm import tiny_model_dir

    from lightning_gptq.cli import main

    with pytest.raises(MisconfigurationException, match="set gguf.template"):
        main(fit_args(tiny_model_dir(tmp_path, "llama"), tmp_path / "runs"))
