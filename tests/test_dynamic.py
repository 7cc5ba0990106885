"""Per-layer settings (``gptq.dynamic``, GPTQModel's ``dynamic`` rules): the layers a rule names are solved with
its settings (bit for bit what a whole-model fit at those settings gives them), ``-:`` layers stay dense, and the
checkpoint records the rules so it loads back (ours, streamed or not, and by the same rules other tools read)."""

import json

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from safetensors.torch import load_file
from test_lightning import cli_args
from tiny_lm import CALIBRATION_TEXT, tiny_model_dir

from lightning_gptq import QuantConfig
from lightning_gptq.checkpoint import CheckpointError, load_quantized, read_settings, save_quantized
from lightning_gptq.checkpoint.gptq_format import GPTQSettings, layer_grids_rules
from lightning_gptq.cli import main
from lightning_gptq.driver import CalibrationDriver
from lightning_gptq.lightning import CalibrationDataModule, GPTQCallback, HessianCapture
from lightning_gptq.models import load_causal_lm
from lightning_gptq.nn import QuantLinear
from lightning_gptq.quant import QuantConfigError
from lightning_gptq.quant.rules import LayerRules
from lightning_gptq.sources import LoadedModel

RULES = {r"+:.*\.mlp\.down_proj$": {"bits": 8, "group_size": -1},
         r"-:model\.layers\.1\.self_attn\.o_proj$": {},
         r".*\.layers\.2\.mlp\.": {"desc_act": False, "damp_percent": 0.05}}
FIT = ["--model.eval_after=false", "--model.latency=false", "--gptq.quant.act_order=true"]


def test_rules_first_match_wins_and_speak_both_spellings():
    rules = LayerRules({"-:a\\.x$": {}, "a\\.": {"bits": 8, "desc_act": False}, "+:.*": {"damp_percent": 0.1}})
    base = QuantConfig(bits=4, act_order=True)
    assert rules.config_for("a.x", base) is None
    assert rules.config_for("a.y", base) == QuantConfig(bits=8, act_order=False)  # not the later "+:.*"
    assert rules.config_for("b.a.y", base) == QuantConfig(bits=4, act_order=True, damp=0.1)  # re.match: from the start
    assert rules.layout_rules() == {"-:a\\.x$": {}, "a\\.": {"bits": 8, "desc_act": False}, "+:.*": {}}
    assert LayerRules(None).config_for("anything", base) is base and not LayerRules({})


@pytest.mark.parametrize("rules, message", [
    ({"(": {"bits": 8}}, "not a regular expression"),
    ({".*": {"bitz": 8}}, "not QuantConfig settings"),
    ({".*": {"bits": 9}}, "bits must be an integer in 2..8"),
    ({"-:.*": {"bits": 8}}, "takes no settings"),
    ({".*": 8}, "must be a mapping"),
])
def test_bad_rules_fail_when_the_callback_is_made(rules, message):
    with pytest.raises(QuantConfigError, match=message):
        LayerRules(rules).check(QuantConfig())
    with pytest.raises(MisconfigurationException, match=message):
        GPTQCallback(QuantConfig(), dynamic=rules)


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    """The tiny LLaMA (3 blocks) fitted with the rules, and at each of their settings for the whole model."""
    tmp = tmp_path_factory.mktemp("dynamic")
    model_dir = tiny_model_dir(tmp, "llama")
    out = {}
    for name, extra in {"rules": [f"--gptq.dynamic={json.dumps(RULES)}"],
                        "base": [],
                        "8bit": ["--gptq.quant.bits=8", "--gptq.quant.group_size=-1"]}.items():
        main(["fit", *cli_args(model_dir, tmp / name, *FIT, *extra, f"--model.output_dir={tmp / name}")])
        out[name] = tmp / name / "model"
    return model_dir, out


def test_rule_layers_are_solved_with_their_settings_and_dense_ones_left(fits):
    model_dir, out = fits
    config = json.loads((out["rules"] / "config.json").read_text())["quantization_config"]
    assert config["bits"] == 4 and config["group_size"] == 12
    assert config["dynamic"] == {r"+:.*\.mlp\.down_proj$": {"bits": 8, "group_size": -1},
                                 r"-:model\.layers\.1\.self_attn\.o_proj$": {}, r".*\.layers\.2\.mlp\.": {"desc_act": False}}
    assert config["meta"]["lightning_gptq"]["dynamic"] == RULES  # as the user wrote them, solve settings too
    ours, base, eight = (load_file(out[k] / "model.safetensors") for k in ("rules", "base", "8bit"))
    # Block 0's Hessians come from the unquantized block: its layers match the uniform fits bit for bit (zero points
    # compared in memory: each file's zero convention, v1 or v2, is chosen for the whole checkpoint).
    loaded = {k: dict(load_quantized(out[k], backend="torch")[0].named_modules()) for k in ("rules", "base", "8bit")}
    for name, other in (("model.layers.0.mlp.down_proj", "8bit"), ("model.layers.0.self_attn.q_proj", "base")):
        a, b = loaded["rules"][name], loaded[other][name]
        for key in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(getattr(a, key), getattr(b, key)), (name, key)
    assert "model.layers.1.self_attn.o_proj.weight" in ours and "model.layers.1.self_attn.o_proj.qweight" not in ours
    assert ours["model.layers.2.mlp.gate_proj.g_idx"].diff().ge(0).all()  # desc_act False there: natural order
    assert not ours["model.layers.0.mlp.gate_proj.g_idx"].diff().ge(0).all()  # act-order elsewhere


def test_a_checkpoint_with_rules_loads_back_as_it_was_fitted(fits):
    _, out = fits
    model, _ = load_quantized(out["rules"], backend="torch")
    layers = dict(model.named_modules())
    assert layers["model.layers.1.mlp.down_proj"].bits == 8 and layers["model.layers.1.mlp.down_proj"].group_size == -1
    assert layers["model.layers.1.mlp.up_proj"].bits == 4 and layers["model.layers.1.mlp.up_proj"].group_size == 12
    assert type(layers["model.layers.1.self_attn.o_proj"]) is torch.nn.Linear
    assert type(layers["model.layers.0.self_attn.o_proj"]) is QuantLinear
    # and written again by save_quantized with the same rules, the same tensors (no solve this time)
    resaved = out["rules"].parent / "resaved"
    save_quantized(model, None, resaved, dynamic=LayerRules(RULES).layout_rules())
    again = load_file(resaved / "model.safetensors")
    first = load_file(out["rules"] / "model.safetensors")
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    # re-saved as loaded: the folder's own rules again
    save_quantized(model, None, resaved.with_name("again"))
    read = lambda f: json.loads((f / "config.json").read_text())["quantization_config"]["dynamic"]  # noqa: E731
    assert read(resaved.with_name("again")) == read(out["rules"])
    # without rules, one exact-name rule per grid that differs from the most common, and one `-:` rule for
    # the full-precision o_proj (other blocks quantize theirs: a loader would expect it packed)
    model.gptq_dynamic = None
    save_quantized(model, None, resaved.with_name("exact"))
    dynamic = json.loads((resaved.with_name("exact") / "config.json").read_text())["quantization_config"]["dynamic"]
    assert list(dynamic.values()) == [{"bits": 8, "group_size": -1, "sym": False}, {}]
    assert "model\\.layers\\.2\\.mlp\\.down_proj" in list(dynamic)[0]
    assert list(dynamic)[1] == "-:(?:model\\.layers\\.1\\.self_attn\\.o_proj)$"
    again, _ = load_quantized(resaved.with_name("exact"), backend="torch")
    ids = torch.randint(4, 90, (2, 16))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_streamed_fit_with_rules_writes_the_same_checkpoint(fits, tmp_path):
    model_dir, out = fits
    main(["fit", *cli_args(model_dir, tmp_path / "s", *FIT, f"--gptq.dynamic={json.dumps(RULES)}",
                           "--model.streaming=true", f"--model.output_dir={tmp_path / 's'}")])
    from lightning_gptq.checkpoint.shards import Shards

    whole, streamed = Shards(out["rules"]), Shards(tmp_path / "s" / "model")
    assert whole.shapes.keys() == streamed.shapes.keys()
    assert all(torch.equal(whole.get(k), streamed.get(k)) for k in whole.shapes)
    read = lambda f: json.loads((f / "config.json").read_text())["quantization_config"]["dynamic"]  # noqa: E731
    assert read(tmp_path / "s" / "model") == read(out["rules"])


def test_rules_that_contradict_the_tensors_are_refused(fits, tmp_path):
    _, out = fits
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(out["rules"], broken)
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["dynamic"] = {r"-:.*\.down_proj$": {}}  # but down_proj has packed tensors
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="leave it unquantized"):
        load_quantized(broken, verify=False)
    config["quantization_config"]["dynamic"] = {}  # down_proj's 8-bit tensors then contradict bits=4
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="down_proj.qweight has shape"):
        load_quantized(broken, verify=False)
    config["quantization_config"]["dynamic"] = {".*": {"bits": 12}}
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="bits=12"):
        load_quantized(broken, verify=False)


def test_grid_rules_prefer_the_users_patterns_and_fall_back_to_names():
    grids = {"m.l.0.a": (4, 128, False), "m.l.0.down": (8, 128, False), "m.l.1.a": (4, 128, False),
             "m.l.1.down": (8, 128, False)}
    assert layer_grids_rules(grids, {r"+:.*down$": {"bits": 8}}) == ((4, 128, False), {r"+:.*down$": {"bits": 8}})
    base, exact = layer_grids_rules(grids, {r"+:.*down$": {"bits": 3}})  # rules that do not explain: names
    settings = GPTQSettings(bits=4, group_size=128, desc_act=False, sym=False, dynamic=exact)
    assert base == (4, 128, False) and all(settings.for_layer(n).bits == g[0] for n, g in grids.items())
    assert layer_grids_rules({"a": (4, 128, True)}) == ((4, 128, True), {})
    # full-precision linears in the place of quantized ones get a `-:` rule; others (the head) none
    dense = ["m.l.1.b", "m.l.2.a", "lm_head"]
    grids = {**grids, "m.l.0.b": (4, 128, False)}
    base, rules = layer_grids_rules(grids, {r"+:.*down$": {"bits": 8}}, dense)  # the rules leave m.l.1.b packed
    assert rules == {r"+:(?:m\.l\.0\.down|m\.l\.1\.down)$": {"bits": 8, "group_size": 128, "sym": False},
                     r"-:(?:m\.l\.1\.b|m\.l\.2\.a)$": {}}
    own = {r"+:.*down$": {"bits": 8}, r"-:m\.l\.1\.b$": {}, r"-:m\.l\.2\.": {}}
    assert layer_grids_rules(grids, own, dense) == ((4, 128, False), own)  # the user's rules explain them all


def test_print_config_round_trips_the_rules(tmp_path, capsys):
    model_dir = tiny_model_dir(tmp_path, "llama")
    with pytest.raises(SystemExit):
        main(["fit", *cli_args(model_dir, tmp_path / "r"), f"--gptq.dynamic={json.dumps(RULES)}", "--print_config"])
    printed = capsys.readouterr().out
    (tmp_path / "c.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", f"--config={tmp_path / 'c.yaml'}", "--print_config"])
    assert capsys.readouterr().out == printed and "down_proj" in printed


def test_the_one_call_api_takes_the_rules(fits):
    import lightning_gptq as lg
    from tiny_lm import CALIBRATION_TEXT

    model_dir, _ = fits
    model = lg.quantize(model_dir, CALIBRATION_TEXT, QuantConfig(bits=4, group_size=16), nsamples=4, seqlen=24,
                        method="rtn", dynamic={r"+:.*\.v_proj$": {"bits": 8}, r"-:.*\.o_proj$": {}}, accelerator="cpu")
    layers = dict(model.named_modules())
    assert layers["model.layers.0.self_attn.v_proj"].bits == 8 and layers["model.layers.0.self_attn.k_proj"].bits == 4
    assert all(type(layers[f"model.layers.{i}.self_attn.o_proj"]) is torch.nn.Linear for i in range(3))
    # saved afterwards, the folder keeps the rules: with o_proj dense in every block, nothing else would tell a
    # loader that builds layers from the config (GPTQModel, vLLM) to leave it dense (before: "Missing required
    # quantized weights ... o_proj.qweight" in GPTQModel)
    save_quantized(model, None, model_dir.parent / "api-rules")
    settings = read_settings(model_dir.parent / "api-rules")
    assert settings.for_layer("model.layers.2.self_attn.o_proj") is None
    assert settings.for_layer("model.layers.2.self_attn.v_proj").bits == 8
    assert settings.for_layer("model.layers.2.self_attn.k_proj").bits == 4


def test_rules_text_that_is_not_a_mapping_says_how_to_write_a_backslash(tmp_path):
    model_dir = tiny_model_dir(tmp_path, "llama")
    bad = '--gptq.dynamic={"+:.*\\.down_proj$": {"bits": 8}}'  # JSON's "\." is not an escape
    with pytest.raises(MisconfigurationException, match="backslash is written twice"):
        main(["fit", *cli_args(model_dir, tmp_path / "r", *FIT), bad])


def test_a_streaming_writer_state_of_an_earlier_version_restores_its_one_grid(fits, tmp_path):
    from lightning_gptq.checkpoint.hf_streaming import StreamingWriter

    _, out = fits
    model, _ = load_quantized(out["base"], backend="torch")
    writer = StreamingWriter(tmp_path / "w")
    writer.add_block("model.layers.0", model.model.layers[0])
    state = writer.state_dict()
    old = {k: v for k, v in state.items() if k != "layer_grids"}
    old["grids"] = sorted(set(state["layer_grids"].values()))  # what earlier versions kept
    assert StreamingWriter.restore(old).grids == StreamingWriter.restore(state).grids == state["layer_grids"]
    assert len(state["layer_grids"]) == 7


@pytest.mark.parametrize("true_sequential", [False, True])
def test_dense_layers_get_no_hessian_and_a_dense_block_only_propagates(tmp_path, true_sequential):
    """A `-:` layer is not captured (no Hessian, no pass waits for it); the fit equals one that captured it anyway."""
    model_dir = tiny_model_dir(tmp_path, "llama")
    rules = {r"-:.*\.mlp\.down_proj$": {}, r"-:model\.layers\.1\.": {}}
    results, seen = {}, {}
    for filtered in (True, False):
        lm, tokenizer = load_causal_lm(str(model_dir))
        windows = CalibrationDataModule(calibration=str(CALIBRATION_TEXT), nsamples=4, seqlen=16).calibration_windows(tokenizer)
        gptq = GPTQCallback(QuantConfig(bits=4, group_size=12), backend="torch", dynamic=rules)
        hooks = [HessianCapture(), gptq]
        captured = seen[filtered] = []

        def fire(name, ctx):
            if name == "on_block_end":
                captured.append((ctx.block_index, sorted(ctx.hessians)))
            for cb in sorted(hooks, key=lambda cb: cb.block_hook_order):
                if hasattr(cb, name):
                    getattr(cb, name)(None, None, ctx)

        driver = CalibrationDriver(LoadedModel(lm, tokenizer), fire=fire, true_sequential=true_sequential,
                                   quantizes=gptq.quantizes if filtered else None)
        kinds = [(s.kind, s.block) for s in driver.stages()]
        driver.run(windows)
        results[filtered] = {k: v for k, v in lm.state_dict().items()}
        if filtered:
            assert ("calibrate", 1) not in kinds and ("propagate", 1) in kinds
    assert all("down_proj" not in name for _, names in seen[True] for name in names)
    assert {b for b, _ in seen[True]} == {0, 2}
    assert any("down_proj" in name for _, names in seen[False] for name in names)  # the old way captured them
    assert results[True].keys() == results[False].keys()
    for key in results[True]:
        assert torch.equal(results[True][key], results[False][key]), key
    assert "model.layers.1.mlp.down_proj.weight" in results[True] and "model.layers.0.mlp.down_proj.weight" in results[True]


def test_a_streamed_fit_reads_in_a_block_that_stays_dense(tmp_path):
    """Streaming: a block with no calibration pass is still read in, propagated and written (= the in-memory fit)."""
    from lightning_gptq.checkpoint.shards import Shards

    model_dir = tiny_model_dir(tmp_path, "llama")
    rules = json.dumps({r"-:model\.layers\.1\.": {}})
    for name, extra in {"whole": [], "streamed": ["--model.streaming=true"]}.items():
        main(["fit", *cli_args(model_dir, tmp_path / name, *FIT, f"--gptq.dynamic={rules}", *extra,
                               f"--model.output_dir={tmp_path / name}")])
    whole, streamed = Shards(tmp_path / "whole" / "model"), Shards(tmp_path / "streamed" / "model")
    assert whole.shapes.keys() == streamed.shapes.keys() and "model.layers.1.mlp.up_proj.weight" in whole.shapes
    assert all(torch.equal(whole.get(k), streamed.get(k)) for k in whole.shapes)


def test_saving_rules_says_which_other_tools_read_them(fits, tmp_path, caplog):
    from lightning_gptq.checkpoint.hf import _warn_other_readers

    model, _ = load_quantized(fits[1]["rules"], backend="torch")
    caplog.clear()
    with caplog.at_level("WARNING", logger="lightning_gptq"):
        save_quantized(model, None, tmp_path / "v2", checkpoint_format="gptq_v2")
    assert "from_pretrained ignores them" in caplog.text and "checkpoint_format='gptq_v2'" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lightning_gptq"):
        _warn_other_readers("gptq", False, {"+:x": {"bits": 8}})
        assert "checkpoint_format='gptq_v2'" in caplog.text
        caplog.clear()
        _warn_other_readers("gptq", True, {"+:x": {"bits": 8}})
        _warn_other_readers("gptq", False, {})
        assert "checkpoint_format='gptq_v2'" not in caplog.text and "from_pretrained" in caplog.text


def test_the_dry_run_counts_no_hessian_for_dense_layers(tmp_path):
    model_dir = tiny_model_dir(tmp_path, "llama")
    plans = {}
    no_mlp = json.dumps({r"-:.*\.mlp\.": {}})
    for name, extra in {"all": [], "no-mlp": [f"--gptq.dynamic={no_mlp}"]}.items():
        run = main(["fit", *cli_args(model_dir, tmp_path / name, *FIT, *extra, "--model.dry_run=true",
                                     f"--model.output_dir={tmp_path / name}")])
        plans[name] = run.model.plan.to_dict()["bytes"]
    config = run.model.lm.config
    hidden, inter = config.hidden_size, config.intermediate_size
    assert plans["all"]["Hessians (one block)"] == 8 * (2 * hidden ** 2 + hidden ** 2 + inter ** 2)  # qkv, o, gate/up, down
    assert plans["no-mlp"]["Hessians (one block)"] == 8 * 2 * hidden ** 2  # qkv and o only


def test_the_dry_run_times_no_calibration_pass_for_a_wholly_dense_block(tmp_path, monkeypatch):
    from lightning_gptq.lightning import plan

    monkeypatch.setattr(plan, "_best_of", lambda repeats, fn: (fn(), 1.0)[1])  # every timed call: 1 s
    model_dir = tiny_model_dir(tmp_path, "llama")  # 3 blocks
    seconds = {}
    rest_dense = json.dumps({r"-:model\.layers\.[12]\.": {}})
    for name, extra in {"all": [], "block-0": [f"--gptq.dynamic={rest_dense}"]}.items():
        run = main(["fit", *cli_args(model_dir, tmp_path / name, *FIT, *extra, "--model.dry_run=true",
                                     f"--model.output_dir={tmp_path / name}")])
        seconds[name] = run.model.plan.to_dict()["seconds"]
    assert seconds["all"]["calibrate"] == 3 * seconds["block-0"]["calibrate"] > 0  # one pass per calibrated block
    assert seconds["all"]["propagate"] == seconds["block-0"]["propagate"]  # every block still propagates


def test_rules_keep_their_order_in_the_files(tmp_path):
    """First match wins, so the order is part of the rules: config.json must not sort them (it sorts its keys)."""
    model_dir = tiny_model_dir(tmp_path, "llama")
    rules = {r"+:model\.layers\.0\.mlp\.down_proj$": {"bits": 3}, r"+:.*\.down_proj$": {"bits": 8}}  # sorted: 8 first
    main(["fit", *cli_args(model_dir, tmp_path / "r", *FIT, f"--gptq.dynamic={json.dumps(rules)}",
                           f"--model.output_dir={tmp_path / 'r'}")])
    folder = tmp_path / "r" / "model"
    for file in ("config.json", "quantize_config.json"):
        block = json.loads((folder / file).read_text())
        assert list((block.get("quantization_config") or block)["dynamic"]) == list(rules), file
    layers = dict(load_quantized(folder, backend="torch")[0].named_modules())
    assert layers["model.layers.0.mlp.down_proj"].bits == 3 and layers["model.layers.1.mlp.down_proj"].bits == 8


def test_a_sorted_config_json_reads_its_rules_in_quantize_config_order(fits, tmp_path):
    """transformers' save_pretrained (what GPTQModel writes config.json with) sorts keys; quantize_config.json keeps
    the order: when the two hold the same rules in another order, quantize_config.json's is the one read."""
    import shutil

    from lightning_gptq.checkpoint import read_settings

    folder = shutil.copytree(fits[1]["rules"], tmp_path / "sorted")
    config = json.loads((folder / "config.json").read_text())
    dynamic = config["quantization_config"]["dynamic"]
    # layers.2.mlp.down_proj matches the first and the last rule: in this order it would read 4-bit, not 8
    config["quantization_config"]["dynamic"] = dict(reversed(list(dynamic.items())))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    assert list(read_settings(folder).dynamic) == list(dynamic)
    layers = dict(load_quantized(folder, backend="torch")[0].named_modules())
    assert layers["model.layers.2.mlp.down_proj"].bits == 8
