"""The attention probe: the model computes exactly what it computed before, and the attention each
key receives equals what transformers' own eager attention reports (``output_attentions``)."""

import pytest
import torch
from tiny_models import FACTORIES, MOE_FACTORIES, token_ids

from lightning_gptq.models import get_adapter, unfuse_experts
from lightning_gptq.models.attention_probe import (
    AttentionProbeError,
    attention_layers,
    probe_attention,
)

PROBED = ["llama", "mistral", "qwen2", "gemma", "gemma3", "opt", "gpt_neox", "gpt2"]


@pytest.mark.parametrize("arch, implementation", [(a, i) for a in PROBED for i in ("sdpa", "eager")]
                         + [("gpt_oss", "eager")])  # learned sinks (s_aux) join each row's softmax; no sdpa
def test_probe_reports_the_eager_attention_and_changes_nothing(arch, implementation):
    model = {**FACTORIES, **MOE_FACTORIES}[arch]()
    unfuse_experts(model)
    model.set_attn_implementation(implementation)
    ids = token_ids(n=2, seqlen=16)
    with torch.no_grad():
        plain = model(ids).logits
    blocks = get_adapter(model).blocks(model)
    layers = [m for b in blocks for m in attention_layers(b)]
    assert len(layers) == len(blocks)
    got: dict[int, torch.Tensor] = {}
    firsts: dict[int, torch.Tensor] = {}
    with torch.no_grad(), probe_attention(layers, lambda m, received, q, k: got.setdefault(id(m), received)):
        probed = model(ids).logits
    with torch.no_grad(), probe_attention(layers, lambda m, received, q, k: firsts.setdefault(id(m), received), first=2):
        model(ids)
    assert torch.equal(plain, probed), "the probe changed the model's output"
    assert model.config._attn_implementation == implementation

    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions  # per block [batch, heads, q, k]
    for layer, probs in zip(layers, attentions):
        torch.testing.assert_close(got[id(layer)], probs.float().sum(dim=-2), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(firsts[id(layer)], probs.float().sum(dim=-2)[..., :2], rtol=1e-4, atol=1e-5)
    if arch == "gpt_oss":  # the sinks take real mass: rows sum to less than 1
        assert float(got[id(layers[0])].sum()) < 0.99 * 2 * model.config.num_attention_heads * 16
    if arch in ("mistral", "gemma3"):  # sliding layers (window 4 < 16): position 0 is out of reach of late queries
        assert got[id(layers[0])][..., 0].max() < 5


def test_probe_refuses_attention_it_cannot_read():
    model = FACTORIES["bloom"]()  # BLOOM computes its attention inline, not through the interface
    block = get_adapter(model).blocks(model)[0]
    assert attention_layers(block) == []
    with pytest.raises(AttentionProbeError, match="numeric sink_weight"):
        with probe_attention(attention_layers(block), lambda *a: None):
            pass


@pytest.mark.parametrize("first", [1, 3])
def test_probe_from_the_fused_kernels_log_sum_exp_equals_the_softmax(first):
    """The fast path of the attention probe (each query's log-sum-exp from the fused CPU kernel) gives
    the mass the plain causal softmax gives the first keys."""
    from lightning_gptq.models.attention_probe import received_attention

    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 6, 300, 16, generator=gen) * 2, torch.randn(2, 2, 300, 16, generator=gen) * 2
    k[:, :, 0] *= 3  # a sink-like first key
    module = type("Attention", (), {"is_causal": True})()
    fast = received_attention(module, q, k, None, first=first)
    mask = torch.ones(300, 300, dtype=torch.bool).tril()[None, None]  # the same causal mask, given explicitly
    plain = received_attention(module, q, k, mask, first=None)[..., :first]
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
    assert fast.shape == (2, 6, first)
