"""Mixture-of-experts models: expert banks split into one linear per projection, each quantized on the tokens
routed to it; better than round-to-nearest, saved and loaded per expert; what cannot be done is refused."""

import json
import warnings

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from test_lightning import cli_args, only_run_dir
from tiny_lm import char_tokenizer
from tiny_models import MOE_FACTORIES, full_logits, token_ids

import lightning_gptq as lg
from lightning_gptq.cli import main
from lightning_gptq.models import ExpertBank, UnsupportedArchitectureError, get_adapter, unfuse_experts
from lightning_gptq.models.adapters import VERIFIED_MODEL_TYPES
from lightning_gptq.nn import QuantLinear
from lightning_gptq.sources import StreamedModel

MOE = sorted(MOE_FACTORIES)


@pytest.mark.parametrize("arch", MOE)
def test_split_experts_give_the_banks_output(arch):
    model = MOE_FACTORIES[arch]()
    ids = token_ids(n=2)
    before = full_logits(model, ids)
    if arch == "mixtral":
        with pytest.raises(UnsupportedArchitectureError, match="packed MoE experts"):
            get_adapter(model)  # the banks hold most weights in tensors no linear owns
    names = unfuse_experts(model)
    assert names and all(isinstance(model.get_submodule(n), ExpertBank) for n in names)
    torch.testing.assert_close(full_logits(model, ids), before, rtol=1e-5, atol=1e-6)
    assert unfuse_experts(model) == []  # nothing fused is left
    block = get_adapter(model).blocks(model)[-1]
    groups = get_adapter(model).sequential_groups(block)
    bank = [g for g in groups if any(".experts.0." in n for n in g)]
    # every expert's gate/up in one step and every down_proj in the next: two calibration passes, not two per expert
    assert len(bank) == 2 and all(len(g) == len(model.get_submodule(names[-1])) * k for g, k in zip(bank, (2, 1)))


class _SwappedHalves(torch.nn.Module):
    """A bank whose gate_up_proj puts up before gate: same shapes, another function."""

    def __init__(self, bank):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = bank.gate_up_proj, bank.down_proj, bank.act_fn

    def forward(self, hidden, index, weights):
        out = torch.zeros_like(hidden)
        for e in range(self.down_proj.shape[0]):
            token, slot = torch.where(index == e)
            up, gate = torch.nn.functional.linear(hidden[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = torch.nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e]) * weights[token, slot, None]
            out.index_add_(0, token, y)
        return out


def test_a_bank_of_another_layout_is_refused():
    model = MOE_FACTORIES["mixtral"]()
    mlp = model.model.layers[0].mlp
    mlp.experts = _SwappedHalves(mlp.experts)
    with pytest.raises(UnsupportedArchitectureError, match="do not give its output"):
        unfuse_experts(model)


@pytest.mark.parametrize("arch", MOE)
def test_every_moe_quantizes_better_than_rounding_saves_and_loads(arch, tmp_path):
    reference = MOE_FACTORIES[arch]()
    assert reference.config.model_type in VERIFIED_MODEL_TYPES
    windows, held_out = token_ids(n=32, seqlen=16), token_ids(n=4, seqlen=16, seed=5)
    config = lg.QuantConfig(bits=3, group_size=16, act_order=True)
    models = {}
    for method in ("gptq", "rtn"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models[method] = lg.quantize(MOE_FACTORIES[arch](), windows, config, method=method, accelerator="cpu",
                                         true_sequential=True)
    model = models["gptq"]
    unfused = MOE_FACTORIES[arch]()
    unfuse_experts(unfused)
    adapter = get_adapter(unfused)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == \
        sum(len(adapter.linear_layers(b)) for b in adapter.blocks(unfused))

    def error(m):
        return float((full_logits(m, held_out) - full_logits(reference, held_out)).norm()
                     / full_logits(reference, held_out).norm())
    assert 0 < error(model) < error(models["rtn"]), (error(model), error(models["rtn"]))
    if arch == "qwen2_moe":  # its shared expert's scalar gate routes: kept dense, as vLLM builds it
        assert type(model.model.layers[0].mlp.shared_expert_gate) is torch.nn.Linear
    lg.save_quantized(model, None, tmp_path / "model")
    loaded, _ = lg.load_quantized(tmp_path / "model")
    assert any(isinstance(m, ExpertBank) for m in loaded.modules())
    torch.testing.assert_close(full_logits(loaded, held_out), full_logits(model, held_out), rtol=1e-5, atol=1e-5)


def test_experts_no_token_chose_are_rounded_and_said_so():
    model = MOE_FACTORIES["qwen2_moe"](num_experts_per_tok=1)  # 8 experts, one per token
    windows = token_ids(n=1, seqlen=3)  # 3 tokens reach at most 3 of them
    with pytest.warns(UserWarning, match=r"no calibration token reached \d+ layer\(s\)") as caught:
        lg.quantize(model, windows, lg.QuantConfig(bits=4, group_size=16), accelerator="cpu")
    message = next(str(w.message) for w in caught if "no calibration token" in str(w.message))
    assert "mlp.experts." in message
    assert all(isinstance(getattr(expert, name), QuantLinear) for expert in model.model.layers[0].mlp.experts
               for name in ("gate_proj", "up_proj", "down_proj"))


def test_cli_fit_records_unreached_experts_and_validates_the_folder_whole_and_streamed(tmp_path):
    model_dir = tmp_path / "mixtral"
    MOE_FACTORIES["mixtral"](num_experts_per_tok=1).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    main(["fit", *cli_args(model_dir, tmp_path / "runs", "--model.latency=false", nsamples=1, seqlen=4)])
    out = only_run_dir(tmp_path / "runs") / "quantized"
    records = json.loads((out / "summary.json").read_text())["layers"]
    experts = [r for r in records if ".experts." in r["name"]]
    assert {r["method"] for r in experts} == {"gptq", "rtn"}  # 4 tokens cannot reach all 4 experts of 3 blocks
    assert all(r["nsamples"] == 0 for r in experts if r["method"] == "rtn")
    whole = main(["validate", *cli_args(out / "model", tmp_path / "val", "--model.latency=false")])
    # a quantized MoE folder is read block by block too (only calibration from a full-precision one refuses to stream)
    streamed = main(["validate", *cli_args(out / "model", tmp_path / "val-s", "--model.latency=false",
                                           "--model.streaming=true")])
    a, b = whole.model.results["val"]["wikitext2"], streamed.model.results["val"]["wikitext2"]
    assert a["ppl"] > 1 and abs(b["ppl"] - a["ppl"]) <= 1e-4 * a["ppl"]


def test_streaming_a_moe_is_refused_with_the_way_out(tmp_path):
    folder = tmp_path / "mixtral"
    MOE_FACTORIES["mixtral"]().save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    with pytest.raises(UnsupportedArchitectureError, match="streaming=false"):
        StreamedModel(folder, dtype=torch.float32)


def test_mixtral_is_written_in_the_names_other_tools_read(tmp_path):
    """transformers' own Mixtral files and vLLM spell the MoE block ``block_sparse_moe`` and the experts' projections
    w1 (gate), w3 (up), w2 (down); transformers 5 builds ``mlp``. Written so by default, read back."""
    from lightning_gptq.checkpoint.shards import Shards

    model = MOE_FACTORIES["mixtral"]()
    windows = token_ids(n=8, seqlen=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lg.quantize(model, windows, lg.QuantConfig(bits=4, group_size=16), accelerator="cpu")
    lg.save_quantized(model, None, tmp_path / "model")
    keys = set(Shards(tmp_path / "model").shapes)
    assert {"model.layers.0.block_sparse_moe.experts.3.w1.qweight", "model.layers.0.block_sparse_moe.experts.3.w3.scales",
            "model.layers.2.block_sparse_moe.experts.0.w2.qzeros", "model.layers.0.block_sparse_moe.gate.weight",
            "model.layers.0.self_attn.q_proj.qweight"} <= keys
    assert not any(".mlp." in k or "gate_proj" in k for k in keys)
    loaded, _ = lg.load_quantized(tmp_path / "model")
    assert isinstance(loaded.model.layers[0].mlp.experts[3].gate_proj, QuantLinear)
    torch.testing.assert_close(full_logits(loaded, windows), full_logits(model, windows), rtol=1e-5, atol=1e-5)


def test_mixtral_in_the_modules_spelling_for_gptqmodel(tmp_path):
    """GPTQModel 7 writes and reads Mixtral's experts as transformers 5 names the modules (``mlp.experts.<e>.gate_proj``)
    and refuses the files' spelling, which vLLM needs (docs/architectures.md): ``checkpoint_names: modules`` writes
    that spelling (rules too), and our loader reads it. (Streamed: GPT-NeoX in test_streaming.py; MoE does not stream.)"""
    from lightning_gptq.checkpoint.shards import Shards

    src = tmp_path / "src"
    MOE_FACTORIES["mixtral"]().save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    out = tmp_path / "out"
    main(["fit", *cli_args(src, tmp_path / "runs", "--model.checkpoint_names=modules", f"--model.output_dir={out}",
                           "--gptq.dynamic={'+:.*\\.experts\\.1\\.down_proj$': {bits: 8}}",
                           group_size=16)])
    keys = set(Shards(out / "model").shapes)
    assert {"model.layers.0.mlp.experts.3.gate_proj.qweight", "model.layers.2.mlp.experts.0.down_proj.qzeros",
            "model.layers.0.mlp.gate.weight"} <= keys
    assert not any("block_sparse_moe" in k or ".w1." in k for k in keys)
    config = json.loads((out / "model" / "config.json").read_text())["quantization_config"]
    assert any("experts" in key and "down_proj" in key for key in config["dynamic"])  # the rule, in the same spelling
    loaded, _ = lg.load_quantized(out / "model")
    assert loaded.model.layers[1].mlp.experts[1].down_proj.bits == 8 and loaded.model.layers[1].mlp.experts[2].down_proj.bits == 4
    summary = json.loads((out / "summary.json").read_text())
    assert abs(main(["validate", *cli_args(out / "model", tmp_path / "val", "--model.latency=false")]
                    ).model.results["val"]["wikitext2"]["ppl"] - summary["results"]["after"]["wikitext2"]["ppl"]) < 1e-4


@pytest.mark.parametrize("arch, names, says", [
    ("mixtral", "files", "checkpoint_names='modules' for GPTQModel"),
    ("mixtral", "modules", "checkpoint_names='files' for vLLM"),
    ("qwen3_moe", "files", "leaves every expert bank newly initialized")])
def test_saving_a_moe_says_which_readers_take_it(tmp_path, caplog, arch, names, says):
    """transformers' from_pretrained loads a GPTQ MoE folder (ours or GPTQModel's) with its experts newly initialized
    and no error; GPTQModel and vLLM each read Mixtral in one spelling only (experiments/moe_interop.py)."""
    model = MOE_FACTORIES[arch]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lg.quantize(model, token_ids(n=4, seqlen=16), lg.QuantConfig(bits=4, group_size=16), method="rtn", accelerator="cpu")
    with caplog.at_level("WARNING", logger="lightning_gptq"):
        lg.save_quantized(model, None, tmp_path / "m", names=names)
    assert says in caplog.text and "from_pretrained leaves every expert bank" in caplog.text
    assert ("Mixtral" in caplog.text) == (arch == "mixtral")


def test_checkpoint_names_other_than_files_or_modules_are_refused(tmp_path):
    from lightning_gptq.checkpoint import save_compressed_tensors

    model = MOE_FACTORIES["mixtral"]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lg.quantize(model, token_ids(n=4, seqlen=16), lg.QuantConfig(bits=4, group_size=16), method="rtn", accelerator="cpu")
    for save in (lg.save_quantized, save_compressed_tensors):
        with pytest.raises(ValueError, match="names must be one of 'files', 'modules'"):
            save(model, None, tmp_path / "x", names="vllm")
    assert not (tmp_path / "x").exists()
    src = tmp_path / "src"
    MOE_FACTORIES["mixtral"]().save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    with pytest.raises(MisconfigurationException, match="checkpoint_names must be 'files'"):
        main(["fit", *cli_args(src, tmp_path / "runs", "--model.checkpoint_names=vllm")])


def test_gpt_oss_experts_hold_the_halves_of_the_fused_projection_as_other_tools_write_them():
    """GPT-OSS interleaves gate and up in its fused projection's outputs. GPTQModel (Defuser) writes and vLLM reads a
    GPT-OSS expert's ``gate_proj``/``up_proj`` as that projection's first and second half, in the interleaved order
    (vLLM's ``swigluoai`` takes the even outputs as gate). Split into the true gate and up instead, the same function
    gave another file: 0.67 relative logit error across the tools (experiments/moe_interop.py)."""
    model = MOE_FACTORIES["gpt_oss"]()
    bank = model.model.layers[0].mlp.experts
    fused, bias = bank.gate_up_proj.detach().clone(), bank.gate_up_proj_bias.detach().clone()
    unfuse_experts(model)
    half = fused.shape[-1] // 2
    for e in (0, 3):
        expert = model.model.layers[0].mlp.experts[e]
        torch.testing.assert_close(expert.gate_proj.weight, fused[e][:, :half].t(), rtol=0, atol=0)
        torch.testing.assert_close(expert.up_proj.weight, fused[e][:, half:].t(), rtol=0, atol=0)
        torch.testing.assert_close(expert.gate_proj.bias, bias[e][:half], rtol=0, atol=0)
        torch.testing.assert_close(expert.up_proj.bias, bias[e][half:], rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["gptq", "compressed-tensors"])
def test_a_gpt_oss_folder_written_before_the_halves_is_refused_and_others_still_read(tmp_path, layout):
    """Folders this tool wrote before ``format_revision`` 2 split GPT-OSS experts into true gate and up; read as halves
    they would give another function without a word. Other families' folders of that age read as before."""
    from lightning_gptq.checkpoint import CheckpointError, load_compressed_tensors, save_compressed_tensors

    save, load = ((lg.save_quantized, lg.load_quantized) if layout == "gptq"
                  else (save_compressed_tensors, load_compressed_tensors))
    for arch in ("gpt_oss", "qwen3_moe"):
        model = MOE_FACTORIES[arch]()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lg.quantize(model, token_ids(n=2, seqlen=8), lg.QuantConfig(bits=4, group_size=16), method="rtn",
                        accelerator="cpu")
            save(model, None, tmp_path / arch)
        config_file = tmp_path / arch / "config.json"
        config = json.loads(config_file.read_text())
        ours = config["quantization_config"].get("meta", config["quantization_config"])["lightning_gptq"]
        assert ours["format_revision"] == 2
        load(tmp_path / arch)  # today's folder reads
        del ours["format_revision"]
        config_file.write_text(json.dumps(config))
        (tmp_path / arch / "quantize_config.json").unlink(missing_ok=True)
        if arch == "gpt_oss":
            with pytest.raises(CheckpointError, match="before 2026-12-06.*quantize the model again"):
                load(tmp_path / arch, verify=False)
        else:
            load(tmp_path / arch, verify=False)


def test_mixtral_per_layer_rules_and_compressed_tensors_use_the_files_names(tmp_path):
    """Other tools match ``dynamic`` rules and compressed-tensors targets against the names in the files
    (``block_sparse_moe.experts.<e>.w2``), so both are written in that spelling; rules in the model's spelling
    (folders written before) still read."""
    import re

    from lightning_gptq.checkpoint import load_compressed_tensors, save_compressed_tensors
    from lightning_gptq.checkpoint.shards import Shards

    model = MOE_FACTORIES["mixtral"]()
    windows = token_ids(n=8, seqlen=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lg.quantize(model, windows, lg.QuantConfig(bits=4, group_size=16), accelerator="cpu",
                    dynamic={r"+:.*experts\.\d+\.down_proj$": {"bits": 8}})
    assert model.model.layers[0].mlp.experts[1].down_proj.bits == 8
    lg.save_quantized(model, None, tmp_path / "gptq")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    layers = [k[: -len(".qweight")] for k in Shards(tmp_path / "gptq").shapes if k.endswith(".qweight")]
    eight = [n for n in layers if n.endswith(".w2")]
    assert eight and all(re.match(key[2:], n) for n in eight for key in config["dynamic"])
    assert not any(re.match(key[2:], n) for n in layers if n not in eight for key in config["dynamic"])
    assert "down_proj" not in json.dumps(config["dynamic"])
    loaded, _ = lg.load_quantized(tmp_path / "gptq")
    assert loaded.model.layers[1].mlp.experts[2].down_proj.bits == 8
    assert loaded.model.layers[1].mlp.experts[2].up_proj.bits == 4
    torch.testing.assert_close(full_logits(loaded, windows), full_logits(model, windows), rtol=1e-5, atol=1e-5)

    old = tmp_path / "gptq"  # as written before: the rule in the model's spelling
    config_json = json.loads((old / "config.json").read_text())
    config_json["quantization_config"]["dynamic"] = {r"+:.*experts\.\d+\.down_proj$": {"bits": 8}}
    (old / "config.json").write_text(json.dumps(config_json))
    (old / "quantize_config.json").unlink(missing_ok=True)
    again, _ = lg.load_quantized(old, verify=False)
    assert again.model.layers[1].mlp.experts[2].down_proj.bits == 8

    save_compressed_tensors(model, None, tmp_path / "ct")
    block = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    named = [t for g in block["config_groups"].values() for t in g["targets"] if t != "Linear"] + block["ignore"]
    assert any(".block_sparse_moe.experts.0.w2" in t for t in named)
    assert not any(".mlp." in t or "_proj" in t and "experts" in t for t in named)
    assert "model.layers.0.block_sparse_moe.experts.0.w2.weight_packed" in Shards(tmp_path / "ct").shapes
    ct, _ = load_compressed_tensors(tmp_path / "ct")
    assert ct.model.layers[1].mlp.experts[2].down_proj.bits == 8
    torch.testing.assert_close(full_logits(ct, windows), full_logits(model, windows), rtol=1e-5, atol=1e-5)


def test_the_dry_run_counts_a_hessian_per_expert(tmp_path):
    model_dir = tmp_path / "qwen3_moe"
    MOE_FACTORIES["qwen3_moe"]().save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    run = main(["fit", *cli_args(model_dir, tmp_path / "runs", "--model.dry_run=true")])
    hidden, experts, inter = 32, 4, 32  # q/k/v and o read 32 wide; each expert: gate/up 32, down 32
    assert run.model.plan.to_dict()["bytes"]["Hessians (one block)"] == 8 * (2 * hidden ** 2 + experts * (
        hidden ** 2 + inter ** 2))


def test_the_dry_run_times_solves_when_its_batch_misses_experts(tmp_path, monkeypatch):
    """One 3-token batch, one expert per token: most experts get no token in the dry run's sample. Their solves
    are not timed (the fit rounds such experts to nearest); another layer of their shape stands for them."""
    from lightning_gptq.lightning import plan

    missed, empty, timed, solve = [], [], plan._solve_seconds, plan.gptq_quantize

    def spy(driver, blocks, adapter, own, accumulators, *args, **kwargs):
        missed.extend(name for name in own if accumulators[name].nsamples == 0)
        return timed(driver, blocks, adapter, own, accumulators, *args, **kwargs)

    def solve_spy(weight, hessian, *args, **kwargs):
        empty.append(not hessian.any())
        return solve(weight, hessian, *args, **kwargs)

    monkeypatch.setattr(plan, "_solve_seconds", spy)
    monkeypatch.setattr(plan, "gptq_quantize", solve_spy)
    model_dir = tmp_path / "qwen2_moe"  # experts 40 wide: a shape no other layer has
    MOE_FACTORIES["qwen2_moe"](num_experts_per_tok=1, moe_intermediate_size=40).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    run = main(["fit", *cli_args(model_dir, tmp_path / "runs", "--model.dry_run=true", "--data.batch_size=1",
                                 nsamples=2, seqlen=3)])
    assert any(".experts." in name for name in missed)
    assert empty and not any(empty)  # no solve timed on a Hessian no token reached
    assert run.model.plan.to_dict()["seconds"]["solve"] > 0


def test_input_scaling_reaches_experts_down_proj_and_leaves_unreached_ones_alone(tmp_path):
    """up_proj -> down_proj inside each expert is a rewrite like the dense MLP's; an expert no token chose has no
    Hessian to scale by: it is rounded on its own weights and its up_proj is left as it was."""
    model = MOE_FACTORIES["qwen2_moe"](num_experts_per_tok=1)
    reference = MOE_FACTORIES["qwen2_moe"](num_experts_per_tok=1)
    unfuse_experts(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lg.quantize(model, token_ids(n=1, seqlen=3), lg.QuantConfig(bits=3, group_size=16), equalize=[0.5, 1.0],
                    accelerator="cpu", output_dir=tmp_path)
    records = {r["name"]: r for r in json.loads((tmp_path / "summary.json").read_text())["layers"]}
    downs = [r for n, r in records.items() if ".experts." in n and n.endswith("down_proj")]
    assert any(r["equalize_alpha"] for r in downs if r["method"] == "gptq")  # some reached expert was scaled
    for r in downs:
        if r["method"] == "rtn":
            expert = r["name"].rsplit(".", 1)[0]
            up = model.get_submodule(expert + ".up_proj")
            rounded = lg.rtn_quantize(reference.get_submodule(expert + ".up_proj").weight.detach(),
                                      lg.QuantConfig(bits=3, group_size=16))
            torch.testing.assert_close(up.dequantize(), rounded.dequantize().to(up.dequantize().dtype))  # not divided


def test_a_tensor_spelt_both_ways_is_refused(tmp_path):
    from safetensors.torch import save_file

    from lightning_gptq.checkpoint import CheckpointError
    from lightning_gptq.checkpoint.names import model_names
    from lightning_gptq.checkpoint.shards import Shards

    save_file({"model.layers.0.mlp.gate.weight": torch.zeros(2), "model.layers.0.block_sparse_moe.gate.weight":
               torch.ones(2)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="spelt two ways"):
        Shards(tmp_path, rename=model_names("mixtral"))
    assert set(Shards(tmp_path).shapes) == {"model.layers.0.mlp.gate.weight", "model.layers.0.block_sparse_moe.gate.weight"}


def test_a_rewrite_refused_for_one_expert_is_not_tried_on_the_others(tmp_path):
    """GPT-OSS's clamped SwiGLU makes up_proj -> down_proj scaling inexact: refused once for the block type, and
    every expert of every block then solved plainly without another check or warning."""
    model = MOE_FACTORIES["gpt_oss"]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lg.quantize(model, token_ids(n=16, seqlen=16), lg.QuantConfig(bits=3, group_size=16), equalize=[0.5, 1.0],
                    accelerator="cpu", output_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["equalize_refused"]) == 1 and "up_proj" in summary["equalize_refused"][0]
    downs = [r for r in summary["layers"] if ".experts." in r["name"] and r["name"].endswith("down_proj")]
    assert downs and not any(r["equalize_alpha"] for r in downs)


def test_the_bank_operator_passes_opcheck_and_gives_the_eager_output():
    """Under ``torch.compile`` a bank is ``lightning_gptq::expert_bank``: its schema, fake shapes and result."""
    from lightning_gptq.models.experts import expert_bank

    model = MOE_FACTORIES["qwen3_moe"]()
    unfuse_experts(model)
    bank = model.model.layers[0].mlp.experts
    hidden, index = torch.randn(5, bank[0].down_proj.out_features), torch.randint(0, len(bank), (5, 2))
    weights = torch.rand(5, 2)
    torch.library.opcheck(torch.ops.lightning_gptq.expert_bank.default, (hidden, index, weights, id(bank)))
    with torch.no_grad():
        torch.testing.assert_close(expert_bank(hidden, index, weights, id(bank)), bank(hidden, index, weights),
                                   rtol=0, atol=0)


def test_asymmetric_calibration_solves_experts_plainly_and_the_rest_with_the_mismatch():
    """GPTAQ pairs each layer's input rows with the full-precision model's; the two models route tokens
    differently, so an expert's rows cannot be paired (this stopped the run with a shape error): experts take the
    plain Hessian, with one warning, and attention still takes the mismatch term."""
    windows = token_ids(n=16, seqlen=16)
    models = {}
    for asymmetric in (False, True):
        model = MOE_FACTORIES["mixtral"]()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lg.quantize(model, windows, lg.QuantConfig(bits=3, group_size=16), accelerator="cpu", asymmetric=asymmetric)
        said = [str(w.message) for w in caught if "solved without the mismatch term" in str(w.message)]
        assert len(said) == asymmetric
        models[asymmetric] = model
    last = models[True].model.layers[-1]
    assert not torch.equal(last.self_attn.q_proj.codes(), models[False].model.layers[-1].self_attn.q_proj.codes())


def test_a_rule_that_matches_no_layer_is_said_with_the_spelling_it_matches():
    model = MOE_FACTORIES["mixtral"]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lg.quantize(model, token_ids(n=4, seqlen=16), lg.QuantConfig(bits=4, group_size=16), method="rtn",
                    accelerator="cpu", dynamic={r"+:.*\.w2$": {"bits": 8}, r"+:.*q_proj$": {"bits": 8}, "+:nothing": {}})
    said = [str(w.message) for w in caught if "matches no layer" in str(w.message)]
    assert len(said) == 2
    assert "'+:.*\\\\.w2$'" in said[0] and "block_sparse_moe.experts.0.w2" in said[0] and "module names" in said[0]
    assert "'+:nothing'" in said[1] and "spelling" not in said[1]
    assert model.model.layers[0].mlp.experts[0].down_proj.bits == 4 and model.model.layers[0].self_attn.q_proj.bits == 8
