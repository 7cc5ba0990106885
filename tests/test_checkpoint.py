"""Hugging Face GPTQ checkpoints: round trips, the published layout built by hand, integrity, bad input."""

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file
from tiny_lm import char_tokenizer
from tiny_models import FACTORIES

from lightning_gptq.checkpoint import (
    CheckpointError,
    load_quantized,
    read_settings,
    save_quantized,
)
from lightning_gptq.models import get_adapter, weight_out_in
from lightning_gptq.nn import LayerSpec, QuantLinear, replace_submodule
from lightning_gptq.nn.timing import random_layer


def quantize_randomly(model, bits, group_size, sym, act_order, zero_floor=0, seed=0):
    """Replace every block linear by a QuantLinear with random codes/grids (what is saved does not
    need to be a good approximation). ``zero_floor=1`` keeps every zero >= 1 (then v1 is lossless)."""
    adapter = get_adapter(model)
    for b, block in enumerate(adapter.blocks(model)):
        for name, linear in adapter.linear_layers(block).items():
            out_f, in_f = weight_out_in(linear).shape
            spec = LayerSpec(in_f, out_f, bits, group_size, sym, act_order, getattr(linear, "bias", None) is not None)
            layer = random_layer(QuantLinear, spec, seed=seed + b)
            if zero_floor and not sym:
                zeros = layer.zero_points().T.to(torch.int32).clamp(min=zero_floor)
                layer.set_weight(layer.codes(), layer.scales.T, zeros, layer.g_idx, layer.bias)
            replace_submodule(block, name, layer)
    return model


def packed_buffers(model):
    return {k: v for k, v in model.state_dict().items()}


def assert_same_model(a, b):
    sa, sb = packed_buffers(a), packed_buffers(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [False, True])
def test_round_trip_is_bit_identical(tmp_path, bits, act_order, sym):
    """auto picks v1 when every zero is >= 1 (symmetric grids: always) and v2 otherwise; a sharded
    save (every other case) loads the same."""
    model = quantize_randomly(FACTORIES["llama"](), bits, 16, sym, act_order)
    sharded = (bits + act_order) % 2 == 0
    folder = save_quantized(model, char_tokenizer(), tmp_path / "q", max_shard_size="20KB" if sharded else "4GB")
    settings = read_settings(folder)
    zeros = [m.zero_points() for m in model.modules() if isinstance(m, QuantLinear)]
    assert settings.checkpoint_format == ("gptq" if all(bool((z > 0).all()) for z in zeros) else "gptq_v2")
    if sym:
        assert settings.checkpoint_format == "gptq"
    assert settings.desc_act == act_order and settings.bits == bits and settings.sym == sym
    assert (folder / "model.safetensors.index.json").is_file() == sharded
    assert json.loads((folder / "quantize_config.json").read_text())["checkpoint_format"] == settings.checkpoint_format
    loaded, tokenizer = load_quantized(folder, backend="torch")
    assert tokenizer is not None
    assert_same_model(model, loaded)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_forced_formats_round_trip_and_v1_refuses_a_zero_of_0(tmp_path, fmt):
    model = quantize_randomly(FACTORIES["llama"](), 4, 16, False, True, zero_floor=1)
    folder = save_quantized(model, None, tmp_path / "q", checkpoint_format=fmt)
    assert read_settings(folder).checkpoint_format == fmt
    assert_same_model(model, load_quantized(folder, backend="torch")[0])
    with_zero = quantize_randomly(FACTORIES["llama"](), 4, 16, False, True)
    assert any(bool((m.zero_points() == 0).any()) for m in with_zero.modules() if isinstance(m, QuantLinear))
    if fmt == "gptq":
        with pytest.raises(CheckpointError, match="cannot hold a zero point of 0"):
            save_quantized(with_zero, None, tmp_path / "refused", checkpoint_format=fmt)
        assert not (tmp_path / "refused").exists()


def test_a_save_replaces_only_an_empty_folder_or_a_checkpoint(tmp_path):
    """A save writes ``<folder>.partial`` and renames it over ``folder``. It used to delete whatever ``folder``
    held first: ``save_quantized(model, tok, "~")`` would have taken a home directory with it; and replacing a
    checkpoint took the files a user had added to it along."""
    from lightning_gptq.checkpoint import save_compressed_tensors, save_interim

    model = quantize_randomly(FACTORIES["llama"](), 4, 16, True, False)
    mine = tmp_path / "mine"
    (mine / "sub" / "deeper").mkdir(parents=True)
    (mine / "sub" / "deeper" / "a.txt").write_text("a")
    (mine / "b.txt").write_text("b")
    for save in (save_quantized, save_compressed_tensors, save_interim):
        with pytest.raises(CheckpointError, match=r"holds files that are not a quantized checkpoint \(b.txt, sub/\)"):
            save(model, None, mine)
    assert (mine / "sub" / "deeper" / "a.txt").read_text() == "a" and (mine / "b.txt").read_text() == "b"
    assert not (tmp_path / "mine.partial").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="afile is a file, not a folder"):
        save_quantized(model, None, tmp_path / "afile")
    with pytest.raises(CheckpointError, match="afile is a file, so .* cannot be made"):
        save_quantized(model, None, tmp_path / "afile" / "q")
    (tmp_path / "empty").mkdir()
    for save in (save_quantized, save_compressed_tensors, save_interim, save_quantized):  # each replaces the last
        folder = save(model, None, tmp_path / "empty")
    assert read_settings(folder).checkpoint_format == "gptq"
    assert_same_model(model, load_quantized(folder, backend="torch")[0])
    # what a user added to a checkpoint (a model card, notes) is moved into the one replacing it; a save's own files
    # (a stale shard, weights of another layout) go with the old checkpoint
    (folder / "README.md").write_text("my model card")
    (folder / "notes").mkdir()
    (folder / "notes" / "eval.txt").write_text("ppl 24")
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    for save in (save_compressed_tensors, save_quantized):
        folder = save(model, None, folder)
        assert (folder / "README.md").read_text() == "my model card"
        assert (folder / "notes" / "eval.txt").read_text() == "ppl 24"
        assert not (folder / "model-00002-of-00002.safetensors").exists()
    assert_same_model(model, load_quantized(folder, backend="torch")[0])
    # a save stopped after moving those files into <folder>.partial: the next save does not clear them with it
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    os.replace(folder / "README.md", partial / "README.md")
    with pytest.raises(CheckpointError, match=r"holds README.md, which no save writes"):
        save_quantized(model, None, folder)
    assert (partial / "README.md").read_text() == "my model card"


def test_weight_files_are_as_readable_as_the_others(tmp_path):
    """safetensors 0.8 writes its files 0600: a server running as another user could not read the weights."""
    import os

    from lightning_gptq.checkpoint import save_compressed_tensors, save_interim

    model = quantize_randomly(FACTORIES["llama"](), 4, 16, True, False)
    previous = os.umask(0o022)
    try:
        for save, shard in ((save_quantized, "4GB"), (save_quantized, "20KB"), (save_compressed_tensors, "4GB"),
                            (save_interim, None)):
            folder = save(model, None, tmp_path / f"{save.__name__}-{shard}", **({"max_shard_size": shard} if shard else {}))
            modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()}
            assert set(modes.values()) == {"0o644"}, modes
    finally:
        os.umask(previous)


def test_saving_in_float16_halves_the_unquantized_tensors_and_loads_close(tmp_path):
    model = quantize_randomly(FACTORIES["llama"](), 4, 16, True, False)
    full = save_quantized(model, None, tmp_path / "fp32")
    half = save_quantized(model, None, tmp_path / "fp16", dtype="float16")
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "float16"
    assert (half / "model.safetensors").stat().st_size < 0.75 * (full / "model.safetensors").stat().st_size
    loaded = load_quantized(half, backend="torch")[0]
    assert loaded.model.embed_tokens.weight.dtype == torch.float32  # loaded as fp32 by default
    torch.testing.assert_close(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="dtype must be a floating"):
        save_quantized(model, None, tmp_path / "int", dtype="int8")


def test_tied_head_and_other_architectures_round_trip(tmp_path):
    for arch in ("gpt2", "opt"):  # gpt2: Conv1D layers with bias, tied head
        model = quantize_randomly(FACTORIES[arch](), 4, 16, False, False)
        folder = save_quantized(model, None, tmp_path / arch)
        assert_same_model(model, load_quantized(folder, backend="torch")[0])


# -- the published layout, built by hand ------------------------------------------------------------
def pack_by_hand(values, bits):
    """[n, cols] ints → int32 [n*bits/32, cols]: value i occupies stream bits i*bits .. i*bits+bits-1,
    lowest bits first, word w holding stream bits 32w..32w+31 (a value may straddle two words)."""
    n, cols = values.shape
    words = [[0] * cols for _ in range(-(-n * bits // 32))]
    for c in range(cols):
        for i in range(n):
            for bit in range(bits):
                if (int(values[i, c]) >> bit) & 1:
                    pos = i * bits + bit
                    words[pos // 32][c] |= 1 << (pos % 32)
    as_signed = [[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in words]
    return torch.tensor(as_signed, dtype=torch.int32)


def hand_checkpoint(folder, bits, fmt, act_order, seed=0):
    """A tiny llama folder in the published GPTQ layout, written without our writer. Returns the
    intended dense weights ``{layer: W [out, in]}``."""
    gen = torch.Generator().manual_seed(seed)
    model = FACTORIES["llama"]()
    group_size, maxq = 16, (1 << bits) - 1
    tensors, intended = {}, {}
    adapter = get_adapter(model)
    linears = {f"model.layers.{b}.{n}": lin for b, blk in enumerate(adapter.blocks(model))
               for n, lin in adapter.linear_layers(blk).items()}
    for name, tensor in model.state_dict().items():
        if name.rsplit(".", 1)[0] not in linears:
            tensors[name] = tensor.to(torch.float16)
    for name, linear in linears.items():
        out_f, in_f = linear.weight.shape
        n_groups = math.ceil(in_f / group_size)
        q = torch.randint(0, maxq + 1, (in_f, out_f), generator=gen)
        zeros = torch.randint(1 if fmt == "gptq" else 0, maxq + 1, (n_groups, out_f), generator=gen)
        scales = (torch.rand(n_groups, out_f, generator=gen) * 0.05 + 0.01).to(torch.float16)
        order = torch.randperm(in_f, generator=gen) if act_order else torch.arange(in_f)
        g_idx = (torch.argsort(order) // group_size).to(torch.int32)
        stored = zeros - 1 if fmt == "gptq" else zeros
        tensors[f"{name}.qweight"] = pack_by_hand(q, bits)
        tensors[f"{name}.qzeros"] = pack_by_hand(stored.T, bits).T.contiguous()
        tensors[f"{name}.scales"] = scales
        tensors[f"{name}.g_idx"] = g_idx
        gi = g_idx.long()
        intended[name] = ((q - zeros[gi]).float() * scales[gi].float()).T  # [out, in]
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["torch_dtype"] = "float16"
    config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order,
                                     "sym": False, "checkpoint_format": fmt, "meta": {"quantizer": ["handmade:0"]}}
    (folder / "config.json").write_text(json.dumps(config))
    return intended


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt,act_order", [("gptq", False), ("gptq_v2", True), ("gptq", True)])
def test_loader_reads_the_published_layout_built_by_hand(tmp_path, bits, fmt, act_order):
    intended = hand_checkpoint(tmp_path / "theirs", bits, fmt, act_order)
    model, _ = load_quantized(tmp_path / "theirs", backend="torch")
    for name, weight in intended.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear)
        torch.testing.assert_close(layer.dequantize(), weight, rtol=0, atol=1e-6)


def unpack_by_hand(words, bits, n):
    out = torch.zeros(n, words.shape[1], dtype=torch.int64)
    w = words.to(torch.int64) & 0xFFFFFFFF
    for i in range(n):
        for bit in range(bits):
            pos = i * bits + bit
            out[i] |= ((w[pos // 32] >> (pos % 32)) & 1) << bit
    return out


def test_autogptq_file_names_and_quantize_config_only(tmp_path):
    """Older AutoGPTQ folders: weights as gptq_model-4bit-16g.safetensors, settings only in quantize_config.json."""
    folder = tmp_path / "autogptq"
    intended = hand_checkpoint(folder, 4, "gptq", True)
    (folder / "model.safetensors").rename(folder / "gptq_model-4bit-16g.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "quantize_config.json").write_text(json.dumps(config.pop("quantization_config")))
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = load_quantized(folder, backend="torch")
    name, weight = next(iter(intended.items()))
    torch.testing.assert_close(model.get_submodule(name).dequantize(), weight, rtol=0, atol=1e-6)
    (folder / "second.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="several .safetensors files"):
        load_quantized(folder)


@pytest.mark.parametrize("bits,sym", [(3, True), (4, False), (8, True)])
def test_writer_output_passes_the_published_layout_checks(tmp_path, bits, sym):
    from safetensors import safe_open

    model = quantize_randomly(FACTORIES["llama"](), bits, 16, sym, True, zero_floor=1)
    folder = save_quantized(model, None, tmp_path / "q")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["bits"] == bits and config["group_size"] == 16
    assert config["checkpoint_format"] == "gptq" and config["meta"]["quantizer"][0].startswith("lightning-gptq:")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for name, m in model.named_modules():
            if not isinstance(m, QuantLinear):
                continue
            qweight, qzeros = f.get_tensor(f"{name}.qweight"), f.get_tensor(f"{name}.qzeros")
            scales, g_idx = f.get_tensor(f"{name}.scales"), f.get_tensor(f"{name}.g_idx")
            n_groups = math.ceil(m.in_features / 16)
            assert qweight.dtype == qzeros.dtype == g_idx.dtype == torch.int32
            assert qweight.shape == (-(-m.in_features * bits // 32), m.out_features)
            assert qzeros.shape == (n_groups, -(-m.out_features * bits // 32))
            assert scales.shape == (n_groups, m.out_features) and g_idx.shape == (m.in_features,)
            assert torch.equal(unpack_by_hand(qweight, bits, m.in_features), m.codes().T.long())
            stored = unpack_by_hand(qzeros.T.contiguous(), bits, m.out_features).T
            assert torch.equal(stored + 1, m.zero_points().long())  # v1: zero − 1


# -- integrity and bad input ----------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    model = quantize_randomly(FACTORIES["llama"](), 4, 16, False, True)
    return save_quantized(model, None, tmp_path / "q", max_shard_size="20KB")


def test_flipped_bytes_in_a_shard_are_caught_by_the_recorded_sha256(saved):
    shard = sorted(saved.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    middle = header + (len(data) - header) // 2
    data[middle:middle + 64] = b"\xff" * 64
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name} is corrupt: its sha256 differs"):
        load_quantized(saved)
    load_quantized(saved, verify=False, backend="torch")  # the user may skip the check


def test_truncated_missing_and_inconsistent_files_are_clear_errors(saved, tmp_path):
    shards = sorted(saved.glob("model-*.safetensors"))
    broken = tmp_path / "truncated"
    shutil.copytree(saved, broken)
    (broken / shards[0].name).write_bytes(shards[0].read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{shards[0].name}.*(truncated or corrupt|sha256)"):
        load_quantized(broken)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_quantized(broken, verify=False)
    gone = tmp_path / "missing"
    shutil.copytree(saved, gone)
    (gone / shards[-1].name).unlink()
    with pytest.raises(CheckpointError, match=f"{shards[-1].name} named in model.safetensors.index.json are missing"):
        load_quantized(gone)


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_config_that_does_not_match_the_tensors(saved):
    edit_config(saved, bits=8)
    with pytest.raises(CheckpointError, match=r"qweight has shape .* bits=8"):
        load_quantized(saved)
    edit_config(saved, bits=4, checkpoint_format="gptq_v9")
    with pytest.raises(CheckpointError, match="unknown checkpoint_format 'gptq_v9'"):
        load_quantized(saved)
    edit_config(saved, checkpoint_format="gptq_v2", bits=12)
    with pytest.raises(CheckpointError, match="bits=12"):
        load_quantized(saved)
    edit_config(saved, bits=4, group_size=32)
    with pytest.raises(CheckpointError, match="group size 32"):
        load_quantized(saved)


def test_values_are_checked_on_every_load(tmp_path):
    for damage, message in [("scales", "non-finite"), ("g_idx", "outside"), ("zeros", "stored as 15")]:
        folder = tmp_path / damage
        hand_checkpoint(folder, 4, "gptq", False)
        from safetensors.torch import load_file

        tensors = load_file(str(folder / "model.safetensors"))
        name = "model.layers.1.mlp.down_proj"
        if damage == "scales":
            tensors[f"{name}.scales"][0, 3] = float("nan")
        elif damage == "g_idx":
            tensors[f"{name}.g_idx"][5] = 99
        else:
            tensors[f"{name}.qzeros"][0, 0] = -1  # every stored v1 zero − 1 = 15: a zero of 16
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=f"model.safetensors.*{name}.*{message}|{message}"):
            load_quantized(folder)


def test_bad_save_arguments_fail_before_writing(tmp_path):
    model = quantize_randomly(FACTORIES["llama"](), 4, 16, True, False)
    with pytest.raises(ValueError, match="checkpoint_format"):
        save_quantized(model, None, tmp_path / "a", checkpoint_format="gptq_v3")
    with pytest.raises(ValueError, match="max_shard_size"):
        save_quantized(model, None, tmp_path / "b", max_shard_size="lots")
    assert not any(tmp_path.iterdir())
    with pytest.raises(CheckpointError, match="not a GPTQ checkpoint"):
        (tmp_path / "plain").mkdir()
        FACTORIES["llama"]().save_pretrained(tmp_path / "plain")
        load_quantized(tmp_path / "plain")
