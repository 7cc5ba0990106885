"""The compressed-tensors layout. Written: decoded here by a plain reading of its layout, it is our dense weight
exactly; what it cannot write fails at the start of fit. Read: folders laid out as llm-compressor writes them (packed
here by a plain encoder) and our own exports read back exactly; what cannot be read says why. (compressed-tensors
itself and transformers: tests/test_compressed_tensors_peer.py; vLLM: tests/test_vllm_slow.py.)"""

import json

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from safetensors.torch import load_file

import lightning_gptq as lg
from lightning_gptq.checkpoint.compressed_tensors import CompressedTensorsReader, pack_along_rows, save_compressed_tensors
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
    ragged = lg.quantize(FACTORIES["llama"](), WINDOWS, lg.QuantConfig(bits=4, group_size=16), method="rtn",
                         dynamic={r"+:.*\.down_proj$": {"group_size": 48}}, backend="torch", accelerator="cpu")
    with pytest.raises(CheckpointError, match="whole groups"):
        save_compressed_tensors(ragged, None, tmp_path / "m")
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


def test_per_layer_grids_are_config_groups_by_exact_name(tmp_path):
    rules = {r"+:.*\.down_proj$": {"bits": 8, "sym": True}, r"+:.*\.self_attn\.(q|k|v)_proj$": {"group_size": 32},
             r"-:.*\.o_proj$": {}}
    model = lg.quantize(FACTORIES["llama"](), WINDOWS, lg.QuantConfig(bits=4, group_size=16, sym=False), method="rtn",
                        dynamic=rules, backend="torch", accelerator="cpu")
    folder = save_compressed_tensors(model, None, tmp_path / "ct")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    groups = [((g["weights"]["num_bits"], g["weights"]["group_size"], g["weights"]["symmetric"]), g["targets"])
              for g in config["config_groups"].values()]
    blocks = range(3)
    assert groups == [((4, 32, False), ["Linear"]),  # q/k/v: the most layers
                      ((4, 16, False), sorted(f"model.layers.{b}.mlp.{p}_proj" for b in blocks for p in ("gate", "up"))),
                      ((8, 16, True), [f"model.layers.{b}.mlp.down_proj" for b in blocks])]
    assert [f"model.layers.{b}.self_attn.o_proj" for b in blocks] == [n for n in config["ignore"] if "o_proj" in n]
    loaded, _ = lg.load_quantized(folder, backend="torch")
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            assert torch.equal(loaded.get_submodule(name).dequantize(), layer.dequantize()), name
    assert not isinstance(loaded.get_submodule("model.layers.0.self_attn.o_proj"), QuantLinear)
    settings = CompressedTensorsReader(folder).settings  # stated as the GPTQ layout would: base grid and rules
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            read = settings.for_layer(name)
            assert (read.bits, read.group_size, read.sym) == (layer.bits, layer.group_size, layer.sym), name
    assert settings.for_layer("model.layers.0.self_attn.o_proj") is None


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


def test_the_full_precision_loader_points_at_load_quantized(tmp_path):
    from lightning_gptq.models.loading import ModelLoadError, load_causal_lm

    model = lg.quantize(FACTORIES["llama"](), WINDOWS, lg.QuantConfig(bits=4, group_size=16), method="rtn",
                        backend="torch", accelerator="cpu")
    folder = save_compressed_tensors(model, None, tmp_path / "ct")
    with pytest.raises(ModelLoadError, match="compressed-tensors checkpoint: read it with lightning_gptq.load_quantized"):
        load_causal_lm(str(folder))


@pytest.mark.parametrize("option", [dict(dtype="float17"), dict(dtype="int8"), dict(max_shard_size="lots")])
def test_bad_save_options_fail_before_writing(tmp_path, option):
    model = lg.quantize(FACTORIES["llama"](), WINDOWS, lg.QuantConfig(bits=4, group_size=16), method="rtn",
                        backend="torch", accelerator="cpu")
    with pytest.raises(ValueError):
        save_compressed_tensors(model, None, tmp_path / "ct", **option)
    assert not (tmp_path / "ct").exists() and not (tmp_path / "ct.partial").exists()


# -- reading ---------------------------------------------------------------------------------------
def plain_pack(signed: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' packing spelled out: each signed value + 2**(bits-1), 32 // bits a word along a row,
    the first in the lowest bits, the last word zero-padded."""
    per_word, rows = 32 // bits, []
    for row in signed.tolist():
        words = []
        for start in range(0, len(row), per_word):
            word = sum((v + (1 << (bits - 1))) << (j * bits) for j, v in enumerate(row[start:start + per_word]))
            words.append(word - (1 << 32) if word >= 1 << 31 else word)
        rows.append(words)
    return torch.tensor(rows, dtype=torch.int32)


def write_ct_folder(folder, model, layers: dict, groups: dict, ignore: list, **block):
    """A compressed-tensors folder as llm-compressor lays it out: ``layers`` maps a linear's name to its tensors
    (``weight_packed``, ...); every other tensor is the model's own."""
    from safetensors.torch import save_file

    folder.mkdir()
    state = {n: t for n, t in model.state_dict().items() if n.rsplit(".", 1)[0] not in layers or not n.endswith(".weight")}
    for name, tensors in layers.items():
        state.update({f"{name}.{k}": v for k, v in tensors.items()})
    save_file({n: t.contiguous() for n, t in state.items()}, str(folder / "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                     "quantization_status": "compressed", "config_groups": groups, "ignore": ignore,
                                     **block}
    (folder / "config.json").write_text(json.dumps(config, default=str))
    return folder


def random_layer(out: int, cols: int, bits: int, group: int, sym: bool, act_order: bool, seed: int):
    """The stored tensors of one layer, and the dense weight they mean: ``(q − z) · s[:, g_idx]``."""
    g = torch.Generator().manual_seed(seed)
    low, high = -(1 << (bits - 1)), 1 << (bits - 1)
    width = group if group > 0 else cols
    n_groups = -(-cols // width)
    q = torch.randint(low, high, (out, cols), generator=g)
    z = torch.zeros(out, n_groups, dtype=torch.int64) if sym else torch.randint(low, high, (out, n_groups), generator=g)
    s = torch.rand(out, n_groups, generator=g).to(torch.bfloat16) / 16 + 0.01
    g_idx = torch.arange(cols) // width
    if act_order:
        g_idx = g_idx[torch.randperm(cols, generator=g)]
    tensors = {"weight_packed": plain_pack(q, bits), "weight_scale": s, "weight_shape": torch.tensor([out, cols])}
    if not sym:
        tensors["weight_zero_point"] = plain_pack(z.T, bits).T       # packed along the output dimension
    if act_order:
        tensors["weight_g_idx"] = g_idx.to(torch.int32)
    return tensors, (q - z[:, g_idx]) * s.float()[:, g_idx]


def test_reads_an_llm_compressor_folder_as_its_layout_says(tmp_path):
    """Two schemes by target precedence (a pattern before the class name), act-order groups, an ignored layer."""
    model = FACTORIES["llama"]()
    groups = {"group_0": {"targets": ["Linear"], "format": "pack-quantized",
                          "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                      "group_size": 16, "actorder": "group", "dynamic": False}},
              "group_1": {"targets": ["re:.*down_proj$"],
                          "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                                      "group_size": None, "actorder": None, "dynamic": False}}}
    layers, dense = {}, {}
    for i, (name, linear) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)):
        if name == "lm_head" or name.endswith("o_proj"):
            continue
        down = name.endswith("down_proj")
        layers[name], dense[name] = random_layer(linear.out_features, linear.in_features, 8 if down else 4,
                                                 -1 if down else 16, down, not down, seed=i)
    folder = write_ct_folder(tmp_path / "ct", model, layers, groups, ["lm_head", "re:.*o_proj$"])
    loaded, _ = lg.load_quantized(folder, backend="torch")
    for name, weight in dense.items():
        layer = loaded.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.bits == (8 if name.endswith("down_proj") else 4), name
        assert torch.equal(layer.dequantize(), weight), name
    o_proj = loaded.get_submodule("model.layers.0.self_attn.o_proj")
    assert not isinstance(o_proj, QuantLinear)
    assert torch.equal(o_proj.weight, model.get_submodule("model.layers.0.self_attn.o_proj").weight)


@pytest.mark.parametrize("bits, group_size, sym", [(2, 16, False), (3, 16, True), (4, -1, False), (8, 16, False)])
def test_our_export_reads_back_exactly(tmp_path, bits, group_size, sym):
    model = lg.quantize(FACTORIES["llama"](), WINDOWS, lg.QuantConfig(bits=bits, group_size=group_size, sym=sym,
                                                                       act_order=True, static_groups=True),
                        backend="torch", accelerator="cpu")
    folder = save_compressed_tensors(model, None, tmp_path / "ct")
    loaded, _ = lg.load_quantized(folder, backend="torch")
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            back = loaded.get_submodule(name)
            assert (back.bits, back.group_size, back.sym) == (bits, group_size, sym)
            assert torch.equal(back.dequantize(), layer.dequantize()), name
    with torch.no_grad():
        assert torch.equal(loaded(WINDOWS).logits, model(WINDOWS).logits)


def test_a_compressed_tensors_folder_converts_to_the_gptq_layout(tmp_path):
    model = lg.quantize(FACTORIES["llama"](), WINDOWS, lg.QuantConfig(bits=4, group_size=16), method="rtn",
                        backend="torch", accelerator="cpu")
    loaded, _ = lg.load_quantized(save_compressed_tensors(model, None, tmp_path / "ct"), backend="torch")
    again, _ = lg.load_quantized(lg.save_quantized(loaded, None, tmp_path / "gptq"), backend="torch")
    with torch.no_grad():
        assert torch.equal(again(WINDOWS).logits, model(WINDOWS).logits)


def _one_layer_folder(tmp_path, **change):
    model = FACTORIES["llama"]()
    name = "model.layers.0.mlp.up_proj"
    tensors, _ = random_layer(64, 32, 4, 16, False, False, seed=0)
    tensors.update(change.pop("tensors", {}))
    groups = change.pop("groups", {"group_0": {"targets": [name], "weights": {
        "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 16}}})
    return write_ct_folder(tmp_path / "ct", model, {name: tensors}, groups, change.pop("ignore", []), **change)


@pytest.mark.parametrize("change, match", [
    (dict(format="float-quantized"), "format 'float-quantized'"),
    (dict(quantization_status="frozen"), "stored unpacked"),
    (dict(ignore=["re:.*mlp.*"]), "ignore list"),
    (dict(groups={"g": {"targets": ["re:.*attn.*"], "weights": {"num_bits": 4, "strategy": "group", "group_size": 16}}}),
     "no config group targets it"),
    (dict(groups={"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "float"}}}), "not static integer"),
    (dict(groups={"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group", "group_size": 16},
                        "input_activations": {"num_bits": 8}}}), "quantized activations"),
    (dict(groups={"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "symmetric": False, "strategy": "group",
                                                           "group_size": 16, "actorder": "group"}}}),
     "weight_g_idx is missing"),
    (dict(tensors={"weight_scale": torch.ones(64, 3)}), r"weight_scale has shape \[64, 3\], expected \[64, 2\]"),
    (dict(tensors={"weight_shape": torch.tensor([32, 64])}), r"weight_shape is \[32, 64\]"),
    (dict(tensors={"weight_scale": torch.full((64, 2), float("nan"))}), "non-finite"),
])
def test_unreadable_folders_say_why(tmp_path, change, match):
    folder = _one_layer_folder(tmp_path, **change)
    with pytest.raises(CheckpointError, match=match):
        lg.load_quantized(folder, backend="torch")


def test_a_missing_zero_point_is_named(tmp_path):
    folder = _one_layer_folder(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.0.mlp.up_proj.weight_zero_point"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="weight_zero_point is missing"):
        lg.load_quantized(folder, backend="torch")


def test_validate_scores_a_compressed_tensors_folder_whole_and_streamed(tmp_path):
    """What fit scored after quantizing is what validate scores on the compressed-tensors folder it wrote."""
    from test_lightning import cli_args
    from tiny_lm import tiny_model_dir

    from lightning_gptq.cli import main

    model_dir = tiny_model_dir(tmp_path, "llama")
    fitted = main(["fit", *cli_args(model_dir, tmp_path / "f", "--model.latency=false", "--model.eval_after=true",
                                    "--gptq.quant.act_order=true", "--gptq.quant.static_groups=true",
                                    "--model.checkpoint_format=compressed-tensors",
                                    f"--model.output_dir={tmp_path / 'out'}", group_size=16)])
    after = fitted.model.results["after"]["wikitext2"]["ppl"]
    for streaming in ("false", "true"):
        validated = main(["validate", *cli_args(tmp_path / "out" / "model", tmp_path / f"v{streaming}",
                                                "--model.latency=false", f"--model.streaming={streaming}")])
        assert abs(validated.model.results["val"]["wikitext2"]["ppl"] - after) <= 1e-6 * after, streaming


def test_a_preset_scheme_and_an_inferred_strategy_read(tmp_path):
    model, name = FACTORIES["llama"](), "model.layers.0.mlp.up_proj"
    preset, preset_dense = random_layer(64, 32, 4, 128, False, False, seed=1)    # W4A16_ASYM: asym g128
    inferred, inferred_dense = random_layer(64, 32, 4, 16, True, False, seed=2)  # no strategy: group, from group_size
    other = "model.layers.1.mlp.up_proj"
    groups = {"W4A16_ASYM": [name], "g": {"targets": [other], "weights": {"num_bits": 4, "group_size": 16}}}
    folder = write_ct_folder(tmp_path / "ct", model, {name: preset, other: inferred}, groups, [])
    loaded, _ = lg.load_quantized(folder, backend="torch")
    assert (loaded.get_submodule(name).group_size, loaded.get_submodule(other).group_size) == (128, 16)
    assert torch.equal(loaded.get_submodule(name).dequantize(), preset_dense)
    assert torch.equal(loaded.get_submodule(other).dequantize(), inferred_dense)


def test_gpt2_conv1d_layers_round_trip(tmp_path):
    """Our export targets ``Linear``; GPT-2's layers are ``Conv1D`` in the model a reader builds."""
    model = lg.quantize(FACTORIES["gpt2"](), WINDOWS, lg.QuantConfig(bits=4, group_size=16), method="rtn",
                        backend="torch", accelerator="cpu")
    loaded, _ = lg.load_quantized(save_compressed_tensors(model, None, tmp_path / "ct"), backend="torch")
    with torch.no_grad():
        assert torch.equal(loaded(WINDOWS).logits, model(WINDOWS).logits)
