"""The compressed-tensors export: decoded here by a plain reading of its layout, it is our dense weight exactly;
what it cannot write fails at the start of fit. (vLLM reading it: tests/test_vllm_slow.py, scripts/check_vllm.py.)"""

import json

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from safetensors.torch import load_file

import lightning_gptq as lg
from lightning_gptq.checkpoint.compressed_tensors import pack_along_rows, save_compressed_tensors
from lightning_gptq.checkpoint.gptq_format import CheckpointError
from lightning_gptq.nn import QuantLinear
from tiny_models import FACTORIES

WINDOWS = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(0))


def unpack_along_rows(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The layout read plainly: code j of each int32 word at bit j·bits, 32 // bits codes a word."""
    per_word = 32 // bits
    values = [(int(w) & 0xFFFFFFFF) >> (j * bits) & ((1 << bits) - 1) for w in words.reshape(-1) for j in range(per_word)]
    return torch.tensor(values).view(words.shape[0], -1)[:, :cols]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_round_trips_with_padding(bits):
    codes = torch.randint(0, 2**bits, (5, 37), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    words = pack_along_rows(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (5, -(-37 // (32 // bits)))
    assert torch.equal(unpack_along_rows(words, bits, 37), codes.long())


@pytest.mark.parametrize("sym", [True, False])
def test_written_tensors_decode_to_our_weights(tmp_path, sym):
    model = lg.quantize(FACTORIES["llama"](), WINDOWS, lg.QuantConfig(bits=4, group_size=16, sym=sym, act_order=True,
                                                                       static_groups=True), backend="torch",
                        accelerator="cpu")
    folder = save_compressed_tensors(model, None, tmp_path / "ct")
    state = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (config["quant_method"], config["format"]) == ("compressed-tensors", "pack-quantized")
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"], weights["strategy"]) == (4, 16, sym, "group")
    assert "lm_head" in config["ignore"]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert layers
    for name, layer in layers.items():
        out, cols = state[f"{name}.weight_shape"].tolist()
        codes = unpack_along_rows(state[f"{name}.weight_packed"], 4, cols)
        scale = state[f"{name}.weight_scale"]                                        # [out, groups]
        if sym:
            assert f"{name}.weight_zero_point" not in state
            zero = torch.full_like(scale, 8)
        else:
            zero = unpack_along_rows(state[f"{name}.weight_zero_point"].T, 4, out).T  # packed along out
        group = torch.arange(cols) // 16
        dense = (codes - zero[:, group]) * scale[:, group]
        assert torch.equal(dense.to(layer.dequantize().dtype), layer.dequantize()), name
        assert f"{name}.qweight" not in state and f"{name}.g_idx" not in state


def test_what_it_cannot_write_is_refused(tmp_path):
    act_order = lg.quantize(FACTORIES["llama"](), WINDOWS, lg.QuantConfig(bits=4, group_size=16, act_order=True),
                            backend="torch", accelerator="cpu")
    if any(m.act_order for m in act_order.modules() if isinstance(m, QuantLinear)):
        with pytest.raises(CheckpointError, match="static_groups"):
            save_compressed_tensors(act_order, None, tmp_path / "a")
    mixed = lg.quantize(FACTORIES["llama"](), WINDOWS, lg.QuantConfig(bits=4, group_size=16), method="rtn",
                        dynamic={r"+:.*\.down_proj$": {"bits": 8}}, backend="torch", accelerator="cpu")
    with pytest.raises(CheckpointError, match="one grid"):
        save_compressed_tensors(mixed, None, tmp_path / "m")
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


@pytest.mark.parametrize("config, match", [
    (dict(bits=4, group_size=16, act_order=True), "static_groups"),
    (dict(bits=4, group_size=48), "whole groups"),
])
def test_fit_refuses_at_its_start(tmp_path, config, match):
    with pytest.raises(MisconfigurationException, match=match):
        lg.quantize(FACTORIES["llama"](), WINDOWS, lg.QuantConfig(**config), backend="torch", accelerator="cpu",
                    output_dir=tmp_path / "out", checkpoint_format="compressed-tensors")
    assert not (tmp_path / "out" / "model").exists()


def test_fit_writes_it_and_says_vllm_serves_asymmetric_grids(tmp_path):
    with pytest.warns() as caught:
        lg.quantize(FACTORIES["llama"](), WINDOWS, lg.QuantConfig(bits=4, group_size=16, sym=False, act_order=True,
                                                                   static_groups=True), backend="torch",
                    accelerator="cpu", output_dir=tmp_path / "out", checkpoint_format="compressed-tensors")
    assert not any("vLLM" in str(w.message) for w in caught)
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and not config["config_groups"]["group_0"]["weights"]["symmetric"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["serving"] == {"vllm": "serves"}


def test_our_loader_names_the_format_it_does_not_read(tmp_path):
    from lightning_gptq.models.loading import ModelLoadError, load_causal_lm

    model = lg.quantize(FACTORIES["llama"](), WINDOWS, lg.QuantConfig(bits=4, group_size=16), method="rtn",
                        backend="torch", accelerator="cpu")
    folder = save_compressed_tensors(model, None, tmp_path / "ct")
    with pytest.raises(ModelLoadError, match="compressed-tensors checkpoint"):
        load_causal_lm(str(folder))


@pytest.mark.parametrize("option", [dict(dtype="float17"), dict(dtype="int8"), dict(max_shard_size="lots")])
def test_bad_save_options_fail_before_writing(tmp_path, option):
    model = lg.quantize(FACTORIES["llama"](), WINDOWS, lg.QuantConfig(bits=4, group_size=16), method="rtn",
                        backend="torch", accelerator="cpu")
    with pytest.raises(ValueError):
        save_compressed_tensors(model, None, tmp_path / "ct", **option)
    assert not (tmp_path / "ct").exists() and not (tmp_path / "ct.partial").exists()
