"""Adapters, block-input capture and block replay on tiny random-init models of every architecture."""

import warnings

import pytest
import torch
import transformers as tf
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_gptq.models import adapters as adapters_module
from lightning_gptq.models.adapters import (
    ArchitectureAdapter,
    UnsupportedArchitectureError,
    get_adapter,
    is_conv1d,
    linear_in_features,
    linear_out_features,
    register_adapter,
    set_weight_out_in,
    weight_out_in,
)
from lightning_gptq.models.capture import (
    capture_block_inputs,
    check_replay,
    estimate_activation_bytes,
    forward_blocks,
    run_block,
)
from tiny_models import EXPECTED_GROUPS, EXPECTED_STAGES, FACTORIES, full_logits, token_ids

ARCHS = sorted(FACTORIES)


def _replay(model, adapter, inputs):
    """run_block over every block, then the final stage; logits [n, seq, vocab]."""
    hidden = list(inputs.hidden)
    for i, block in enumerate(adapter.blocks(model)):
        hidden = [run_block(block, h, inputs.kwargs_for(i, j)) for j, h in enumerate(hidden)]
    with torch.no_grad():
        return torch.cat([adapter.logits(model, h) for h in hidden])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch_size", [1, 2])
def test_capture_and_replay_reproduce_the_full_model(arch, batch_size):
    model = FACTORIES[arch]()
    adapter = get_adapter(model)
    ids = token_ids(n=3)  # with batch_size 2 the last batch is smaller
    inputs = capture_block_inputs(model, adapter, ids, batch_size=batch_size)
    assert len(inputs) == -(-3 // batch_size)
    assert [h.shape[0] for h in inputs.hidden] == ([1, 1, 1] if batch_size == 1 else [2, 1])
    assert all(h.device.type == "cpu" for h in inputs.hidden)
    replayed = _replay(model, adapter, inputs)
    assert torch.equal(replayed, full_logits(model, ids))
    assert torch.equal(forward_blocks(model, adapter, ids, batch_size=batch_size), full_logits(model, ids))


@pytest.mark.parametrize("arch", ["llama", "bloom", "gemma3", "gpt2", "opt"])
def test_capture_with_eager_attention(arch):
    model = FACTORIES[arch](attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    adapter = get_adapter(model)
    ids = token_ids(n=2)
    assert torch.equal(forward_blocks(model, adapter, ids, batch_size=2), full_logits(model, ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_finds_linears_groups_and_stages(arch):
    model = FACTORIES[arch]()
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    groups = adapter.sequential_groups(blocks[0])
    assert groups == EXPECTED_GROUPS[arch]
    linears = adapter.linear_layers(blocks[0])
    assert list(linears) == [name for group in groups for name in group]  # execution order, each once
    assert all(blocks[0].get_submodule(name) is module for name, module in linears.items())
    all_linears = {n for n, m in blocks[0].named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    assert set(linears) == all_linears
    embedding, final = EXPECTED_STAGES[arch]
    assert [type(m).__name__ for m in adapter.embedding_modules(model)] == embedding
    assert [type(m).__name__ for m in adapter.final_modules(model)] == final
    assert adapter.final_modules(model)[-1] is model.get_output_embeddings()


def test_gpt2_conv1d_orientation():
    model = FACTORIES["gpt2"]()
    block = get_adapter(model).blocks(model)[0]
    c_attn, c_fc = block.attn.c_attn, block.mlp.c_fc
    assert is_conv1d(c_attn) and not is_conv1d(nn.Linear(2, 3))
    assert weight_out_in(c_attn).shape == (96, 32) and c_attn.weight.shape == (32, 96)
    assert (linear_in_features(c_fc), linear_out_features(c_fc)) == (32, 128)
    x = torch.randn(5, 32)
    assert torch.allclose(c_fc(x), x @ weight_out_in(c_fc).T + c_fc.bias, atol=1e-6)
    new = torch.randn(128, 32)
    set_weight_out_in(c_fc, new)
    assert torch.equal(c_fc.weight, new.T)
    linear = nn.Linear(4, 3)
    set_weight_out_in(linear, torch.ones(3, 4))
    assert torch.equal(linear.weight, torch.ones(3, 4))
    with pytest.raises(ValueError):
        set_weight_out_in(linear, torch.ones(4, 3))


@pytest.mark.parametrize("arch", ["gemma3", "qwen2"])
def test_alternating_attention_gets_per_block_arguments(arch):
    """Sliding-window blocks get other masks / rotary tables than global ones; replay must use them."""
    model = FACTORIES[arch]()
    adapter = get_adapter(model)
    ids = token_ids(n=1)
    inputs = capture_block_inputs(model, adapter, ids)
    assert inputs.block_overrides[0], "expected blocks whose arguments differ from block 0's"
    hidden = inputs.hidden[0]
    for block in adapter.blocks(model):  # wrongly reuse block 0's arguments everywhere
        hidden = run_block(block, hidden, inputs.kwargs[0])
    with torch.no_grad():
        wrong = adapter.logits(model, hidden)
    assert not torch.allclose(wrong, full_logits(model, ids), atol=1e-4)


def test_capture_restores_the_model_exactly_even_on_error():
    model = FACTORIES["llama"]()
    adapter = get_adapter(model)
    layers = model.model.layers
    modules_before = [(name, id(m)) for name, m in model.named_modules()]
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    capture_block_inputs(model, adapter, token_ids(n=2))
    with pytest.raises(IndexError):
        capture_block_inputs(model, adapter, torch.full((1, 8), 10_000))  # out-of-vocabulary ids
    assert model.model.layers is layers
    assert [(name, id(m)) for name, m in model.named_modules()] == modules_before
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_capture_runs_no_block_and_no_head():
    model = FACTORIES["llama"]()
    adapter = get_adapter(model)
    calls = []
    handles = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in adapter.blocks(model)]
    handles.append(model.lm_head.register_forward_pre_hook(lambda *_: calls.append(1)))
    capture_block_inputs(model, adapter, token_ids(n=2))
    for handle in handles:
        handle.remove()
    assert calls == []


def test_storage_dtype_and_memory_accounting():
    model = FACTORIES["llama"]()
    adapter = get_adapter(model)
    ids = token_ids(n=4)
    inputs = capture_block_inputs(model, adapter, ids, batch_size=2, storage_dtype="bfloat16")
    assert all(h.dtype == torch.bfloat16 for h in inputs.hidden)
    out = run_block(adapter.blocks(model)[0], inputs.hidden[0], inputs.kwargs[0])
    assert out.dtype == torch.float32
    hidden_bytes = estimate_activation_bytes(model.config, 4, 16, torch.bfloat16)
    assert hidden_bytes == 4 * 16 * 32 * 2 == sum(h.numel() * h.element_size() for h in inputs.hidden)
    assert estimate_activation_bytes(32, 4, 16, "float32") == 2 * hidden_bytes
    # Equal position ids / rotary tables of the two batches are stored once.
    assert inputs.kwargs[0]["position_embeddings"][0] is inputs.kwargs[1]["position_embeddings"][0]
    assert hidden_bytes < inputs.nbytes() < hidden_bytes + 2 * 16 * 8 * 4 + 16 * 8 + 1024
    assert inputs.kwargs[0]["use_cache"] is False and inputs.kwargs[0].get("past_key_values") is None


def test_registered_adapter_overrides_detection(monkeypatch):
    monkeypatch.setattr(adapters_module, "_REGISTRY", dict(adapters_module._REGISTRY))
    explicit = ArchitectureAdapter(
        name="llama",
        blocks_path="model.layers",
        embedding_paths=("model.embed_tokens", "model.rotary_emb"),
        final_paths=("model.norm", "lm_head"),
        groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
                ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
    )
    register_adapter("llama", explicit)
    model = FACTORIES["llama"]()
    assert get_adapter(model) is explicit
    assert len(explicit.sequential_groups(explicit.blocks(model)[0])) == 2
    ids = token_ids(n=2)
    assert torch.equal(forward_blocks(model, explicit, ids), full_logits(model, ids))
    broken = ArchitectureAdapter(name="llama", groups=(("self_attn.q_proj",),))
    with pytest.raises(ValueError, match="exactly once"):
        broken.sequential_groups(broken.blocks(model)[0])


def test_unverified_architecture_warns_but_works():
    model = tf.Starcoder2ForCausalLM(tf.Starcoder2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )).eval()
    with pytest.warns(UserWarning, match="not among the verified"):
        adapter = get_adapter(model)
    assert adapter.sequential_groups(adapter.blocks(model)[0]) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]
    ids = token_ids(n=2)
    assert torch.equal(forward_blocks(model, adapter, ids), full_logits(model, ids))
    assert check_replay(model, adapter) == 0.0  # what calibration checks before it starts on such a model


class _NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


@pytest.mark.parametrize(
    "make_model",
    [
        _NoBlocks,
        lambda: tf.BertForMaskedLM(tf.BertConfig(
            vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)),
        lambda: tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)),
        lambda: tf.LlamaModel(tf.LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    ],
    ids=["no-blocks", "bert-masked-lm", "t5-encoder-decoder", "llama-without-head"],
)
def test_unsupported_models_raise_a_helpful_error(make_model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_model()
    with pytest.raises(UnsupportedArchitectureError) as raised:
        get_adapter(model)
    message = str(raised.value)
    assert isinstance(raised.value, ValueError)
    assert "blocks(model)" in message and "linear_layers(block)" in message and "register_adapter(" in message


def test_extend_shares_equal_argument_tensors():
    model = FACTORIES["mistral"](attn_implementation="eager")  # materialised [b, 1, s, s] masks
    adapter = get_adapter(model)
    ids = token_ids(n=4)
    first = capture_block_inputs(model, adapter, ids[:2], batch_size=1)
    second = capture_block_inputs(model, adapter, ids[2:], batch_size=1)
    assert second.kwargs[0]["attention_mask"] is not first.kwargs[0]["attention_mask"]
    size_apart = first.nbytes() + second.nbytes()
    first.extend(second)
    assert len(first) == 4 and len(first.block_overrides) == 4
    assert first.kwargs[3]["attention_mask"] is first.kwargs[0]["attention_mask"]
    assert first.nbytes() < size_apart
    assert torch.equal(_replay(model, adapter, first), full_logits(model, ids))
