"""Streaming (models bigger than memory): the model never exists whole, yet the written checkpoint
equals the one an in-memory fit writes, tensor for tensor, and loads and scores the same."""

import pytest
import torch
from safetensors.torch import load_file
from test_lightning import cli_args
from tiny_lm import tiny_model_dir
from tiny_models import FACTORIES

from lightning_gptq.checkpoint import load_quantized
from lightning_gptq.checkpoint.shards import Shards
from lightning_gptq.cli import main
from lightning_gptq.lightning import GPTQModule

QUIET_FIT = ["--model.eval_after=false", "--model.latency=false", "--gptq.quant.act_order=true",
             "--hessian.sink_weight=16"]


def _tensors(folder):
    shards = Shards(folder)
    return {name: shards.get(name) for name in shards.shapes}


# untied head; tied head (+ sliding layers); OPT; a head the files call embed_out (GPT-NeoX), or not (its module name)
@pytest.mark.parametrize("arch, names", [("llama", "files"), ("gemma3", "files"), ("opt", "files"), ("gpt_neox", "files"),
                                         ("gpt_neox", "modules")])
def test_streamed_checkpoint_equals_the_in_memory_one(tmp_path, arch, names):
    model_dir = tiny_model_dir(tmp_path, arch)
    fit = [*QUIET_FIT, f"--model.checkpoint_names={names}"]
    main(["fit", *cli_args(model_dir, tmp_path / "a", *fit, f"--model.output_dir={tmp_path / 'whole'}")])
    run = main(["fit", *cli_args(model_dir, tmp_path / "b", *fit, "--model.streaming=true",
                                 f"--model.output_dir={tmp_path / 'streamed'}")])
    # the streamed run's model ends with nothing materialized but buffers: every block was freed
    assert all(p.device.type == "meta" for p in run.model.lm.parameters())
    whole, streamed = _tensors(tmp_path / "whole" / "model"), _tensors(tmp_path / "streamed" / "model")
    assert whole.keys() == streamed.keys()
    for name, tensor in whole.items():
        assert torch.equal(tensor, streamed[name]), name
    assert (tmp_path / "streamed" / "model" / "model.safetensors.index.json").is_file()
    # GPT-NeoX's files (the source and ours) name the head as transformers 4, vLLM and GPTQModel read it; "modules":
    # as transformers 5 names the module
    assert ("embed_out.weight" in Shards(model_dir).shapes) == (arch == "gpt_neox")
    assert ("embed_out.weight" in whole) == (arch == "gpt_neox" and names == "files")
    assert arch != "gpt_neox" or ("lm_head.weight" in whole) == (names == "modules")
    a, _ = load_quantized(tmp_path / "whole" / "model", backend="torch")
    b, _ = load_quantized(tmp_path / "streamed" / "model", backend="torch")
    ids = torch.randint(4, 90, (2, 16))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("extra", [["--model.calibration_dtype=float64"],
                                   ["--model.calibration_dtype=float64", "--hessian.asymmetric=true"]])
def test_an_fp64_stream_streamed_equals_in_memory(tmp_path, extra):
    """The fp64 calibration stream (cached inputs, passes, propagation in fp64) through a streamed model:
    block inputs spill to the disk cache as fp64, blocks are fetched as fp32 and run as fp64 copies."""
    model_dir = tiny_model_dir(tmp_path, "llama")
    fit = [*QUIET_FIT, *extra]
    main(["fit", *cli_args(model_dir, tmp_path / "a", *fit, f"--model.output_dir={tmp_path / 'whole'}")])
    run = main(["fit", *cli_args(model_dir, tmp_path / "b", *fit, "--model.streaming=true",
                                 "--model.activation_storage=disk", f"--model.output_dir={tmp_path / 'streamed'}")])
    assert run.model.activation_dtype() == "float64"
    whole, streamed = _tensors(tmp_path / "whole" / "model"), _tensors(tmp_path / "streamed" / "model")
    assert whole.keys() == streamed.keys() and all(torch.equal(t, streamed[n]) for n, t in whole.items())


@pytest.mark.parametrize("arch, dtype", [("llama", "float32"), ("opt", "float32"), ("llama", "bfloat16")])
def test_a_streamed_fit_with_input_scaling_equals_in_memory(tmp_path, arch, dtype):
    """``gptq.equalize`` rescales norms and producing layers inside the block: the written blocks carry them. In
    bf16 too (big models, the ones that stream, load in 16 bits: the configs for them say ``float16``)."""
    model_dir = tiny_model_dir(tmp_path, arch)
    fit = [*QUIET_FIT, "--gptq.equalize=[0.5, 1.0]", f"--model.dtype={dtype}"]
    main(["fit", *cli_args(model_dir, tmp_path / "a", *fit, f"--model.output_dir={tmp_path / 'whole'}")])
    main(["fit", *cli_args(model_dir, tmp_path / "b", *fit, "--model.streaming=true",
                           f"--model.output_dir={tmp_path / 'streamed'}")])
    whole, streamed = _tensors(tmp_path / "whole" / "model"), _tensors(tmp_path / "streamed" / "model")
    assert whole.keys() == streamed.keys() and all(torch.equal(t, streamed[n]) for n, t in whole.items())
    source = load_file(model_dir / "model.safetensors")
    norms = [n for n in whole if n.endswith("norm.weight") and ".layers." in n]
    assert any(not torch.equal(whole[n], source[n].to(whole[n].dtype)) for n in norms)  # something was rescaled


def test_streaming_refuses_what_it_cannot_do(tmp_path):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    model_dir = tiny_model_dir(tmp_path, "llama")
    with pytest.raises(MisconfigurationException, match="--model.latency=false"):
        main(["fit", *cli_args(model_dir, tmp_path / "r", "--model.streaming=true")])
    with pytest.raises(MisconfigurationException, match="save_quantized=true"):
        main(["fit", *cli_args(model_dir, tmp_path / "r", "--model.streaming=true", "--model.latency=false",
                               "--model.save_quantized=false")])
    with pytest.raises(MisconfigurationException, match="predict needs: set --model.streaming=false"):
        main(["predict", *cli_args(model_dir, tmp_path / "r", "--model.streaming=true", "--model.latency=false",
                                   "--data.prompts=[Hello]")])
    (model_dir / "model.safetensors").rename(model_dir / "weights.bin")
    with pytest.raises(Exception, match="safetensors"):
        GPTQModule(str(model_dir), streaming=True)


def test_dry_run_of_a_streaming_fit_counts_one_block(tmp_path):
    model_dir = tiny_model_dir(tmp_path, "llama")
    run = main(["fit", *cli_args(model_dir, tmp_path / "r", "--model.eval_after=false", "--model.latency=false",
                                 "--model.streaming=true", "--model.dry_run=true", f"--model.output_dir={tmp_path / 'o'}")])
    plan = run.model.plan.to_dict()
    lm = run.model.lm
    block = sum(p.numel() * 4 for p in lm.model.layers[0].parameters())
    outside = sum(p.numel() * 4 for p in [lm.model.embed_tokens.weight, lm.model.norm.weight])
    assert plan["bytes"]["of which weights"] == block + outside
    assert all(p.device.type == "meta" for p in lm.parameters())  # measured, then freed again
    assert not (tmp_path / "o" / "model").exists()
    assert "scoring hidden states" not in plan["bytes"] and "evaluate" not in plan["seconds"]

    # scoring block by block after the fit: every window's hidden state is held between blocks
    run = main(["fit", *cli_args(model_dir, tmp_path / "e", "--model.latency=false", "--model.streaming=true",
                                 "--model.dry_run=true", f"--model.output_dir={tmp_path / 'o'}")])
    plan = run.model.plan.to_dict()
    assert plan["bytes"]["scoring hidden states"] == 6 * 32 * lm.config.hidden_size * 4  # 6 windows of 32
    assert plan["seconds"]["evaluate"] > 0


# what the logits get: soft-capping; / and x scales; a head the files call embed_out; the rest with the slow tests
STREAMED_SCORING = ("gemma3", "granite", "cohere", "gpt_neox")


@pytest.mark.parametrize("arch", [a if a in STREAMED_SCORING else pytest.param(a, marks=pytest.mark.slow)
                                  for a in sorted(FACTORIES)])
def test_validate_streaming_scores_block_by_block_like_the_whole_model(tmp_path, arch):
    model_dir = tiny_model_dir(tmp_path, arch)
    whole = main(["validate", *cli_args(model_dir, tmp_path / "w", "--model.latency=false")])
    streamed = main(["validate", *cli_args(model_dir, tmp_path / "s", "--model.latency=false", "--model.streaming=true")])
    a, b = whole.model.results["val"]["wikitext2"], streamed.model.results["val"]["wikitext2"]
    assert b["tokens"] == a["tokens"]
    assert abs(b["ppl"] - a["ppl"]) <= 1e-4 * a["ppl"]  # same windows, fp32 summed in another order
    assert all(p.device.type == "meta" for n, p in streamed.model.lm.named_parameters() if ".layers." in n)


def test_activation_cache_spilled_to_files_gives_the_same_model(tmp_path, monkeypatch):
    """`activation_storage=disk` keeps every cached batch in a mapped, unlinked file (nothing left on
    disk after), and quantizes exactly as the in-memory cache does; `auto` spills only when the
    cache would not fit, and a wrong value is refused."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_gptq.lightning import plan
    from lightning_gptq.models.spill import SpillFolder, is_spilled

    model_dir = tiny_model_dir(tmp_path, "llama")
    spilled = []
    put = SpillFolder.put

    def counting_put(self, tensor):
        stored = put(self, tensor)
        spilled.append(is_spilled(stored))
        return stored

    monkeypatch.setattr(SpillFolder, "put", counting_put)
    fit = ["--model.eval_after=false", "--model.latency=false", "--gptq.quant.act_order=true"]
    main(["fit", *cli_args(model_dir, tmp_path / "m", *fit, "--model.activation_storage=memory",
                           f"--model.output_dir={tmp_path / 'memory'}")])
    assert spilled == []
    main(["fit", *cli_args(model_dir, tmp_path / "d", *fit, "--model.activation_storage=disk",
                           f"--model.activation_dir={tmp_path / 'act'}", f"--model.output_dir={tmp_path / 'disk'}")])
    assert spilled and all(spilled)  # capture's batches and every propagate's outputs
    assert list((tmp_path / "act").iterdir()) == []
    a, b = _tensors(tmp_path / "memory" / "model"), _tensors(tmp_path / "disk" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    spilled.clear()
    main(["fit", *cli_args(model_dir, tmp_path / "a", *fit, f"--model.output_dir={tmp_path / 'auto'}")])
    assert spilled == []  # a few KiB of cache: kept in memory
    monkeypatch.setattr(plan, "available_bytes", lambda: 1024)  # a machine with no memory to spare
    main(["fit", *cli_args(model_dir, tmp_path / "a2", *fit, f"--model.output_dir={tmp_path / 'auto2'}")])
    assert spilled and all(spilled)
    with pytest.raises(MisconfigurationException, match="activation_storage"):
        GPTQModule(str(model_dir), activation_storage="swap")


def test_streaming_fit_scores_its_written_model_block_by_block(tmp_path):
    """eval_before / eval_after in a streaming fit go block by block (the fp32 folder, then the written
    checkpoint read back one block at a time) and give what the whole models give; `validate` streams
    a quantized folder the same way, and `fit` refuses to quantize it again."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_gptq.sources import QuantizedWeightSource

    model_dir = tiny_model_dir(tmp_path, "gemma3")  # tied head: the streamed head must take the embedding
    scoring = ["--model.latency=false", "--gptq.quant.act_order=true", "--model.eval_before=true",
               "--model.eval_after=true"]
    whole = main(["fit", *cli_args(model_dir, tmp_path / "w", *scoring, f"--model.output_dir={tmp_path / 'whole'}")])
    seen = []
    materialize = QuantizedWeightSource.materialize

    def counting(self, model, module, device="cpu"):
        seen.append([n for n, m in model.named_modules() if m is module][0])
        return materialize(self, model, module, device)

    QuantizedWeightSource.materialize = counting
    try:
        streamed = main(["fit", *cli_args(model_dir, tmp_path / "s", *scoring, "--model.streaming=true",
                                          f"--model.output_dir={tmp_path / 'streamed'}")])
    finally:
        QuantizedWeightSource.materialize = materialize
    blocks = len(whole.model.driver.adapter.blocks(whole.model.lm))
    assert [n for n in seen if ".layers." in n] == [f"model.layers.{i}" for i in range(blocks)]  # once each
    for stage in ("before", "after"):
        a, b = whole.model.results[stage]["wikitext2"], streamed.model.results[stage]["wikitext2"]
        assert b["text"].endswith("blockwise]") and b["tokens"] == a["tokens"]
        assert abs(b["ppl"] - a["ppl"]) <= 1e-4 * a["ppl"], stage  # same weights, fp32 summed in another order
    assert whole.model.results["before"]["wikitext2"]["ppl"] != whole.model.results["after"]["wikitext2"]["ppl"]
    summary = (tmp_path / "streamed" / "summary.json").read_text()
    assert '"after"' in summary

    validated = main(["validate", *cli_args(tmp_path / "streamed" / "model", tmp_path / "v", "--model.latency=false",
                                            "--model.streaming=true")])
    result = validated.model.results["val"]["wikitext2"]
    assert abs(result["ppl"] - streamed.model.results["after"]["wikitext2"]["ppl"]) <= 1e-6 * result["ppl"]
    assert all(t.is_meta for t in validated.model.lm.parameters())  # everything read was freed again
    with pytest.raises(MisconfigurationException, match="already quantized"):
        main(["fit", *cli_args(tmp_path / "streamed" / "model", tmp_path / "q", "--model.latency=false",
                               "--model.streaming=true")])


def test_streamed_scoring_of_a_corrupt_checkpoint_fails_before_any_model_work(tmp_path):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    model_dir = tiny_model_dir(tmp_path, "llama")
    main(["fit", *cli_args(model_dir, tmp_path / "f", *QUIET_FIT, f"--model.output_dir={tmp_path / 'out'}")])
    weights = tmp_path / "out" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(MisconfigurationException, match="sha256"):
        GPTQModule(str(tmp_path / "out" / "model"), streaming=True, latency=False)
