"""Real-model checks on SmolLM2-135M-Instruct (GGUF, Llama architecture). Run with `-m slow`."""

import json
import os

import pytest
import torch

from lightning_gptq.data.evaluation import eval_tokens, perplexity, perplexity_blockwise
from lightning_gptq.models.adapters import get_adapter
from lightning_gptq.models.capture import forward_blocks
from lightning_gptq.models.loading import gguf_cache_folder, load_causal_lm

GGUF = "/work/shared/models/SmolLM2-135M-Instruct.Q4_1.gguf"
WIKITEXT = "/work/shared/data/wikitext-2-raw/wiki.test.raw"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (os.path.isfile(GGUF) and os.path.isfile(WIKITEXT)), reason="shared model/data missing"),
]


@pytest.fixture(scope="module")
def smollm2():
    return load_causal_lm(GGUF)  # converts once into the cache, then loads the plain folder


def rtn4_copy(model, backend: str):
    """A copy of ``model`` with every block linear rounded to nearest, 4-bit g128 asymmetric, on ``backend``."""
    import copy

    from lightning_gptq import QuantConfig, rtn_quantize
    from lightning_gptq.models import weight_out_in
    from lightning_gptq.nn import make_quant_linear, replace_submodule

    quantized = copy.deepcopy(model)
    adapter = get_adapter(quantized)
    for block in adapter.blocks(quantized):
        for name, layer in adapter.linear_layers(block).items():
            qw = rtn_quantize(weight_out_in(layer), QuantConfig(bits=4, group_size=128, sym=False))
            replace_submodule(block, name, make_quant_linear(layer, qw, backend=backend))
    return quantized


def test_loading_gives_a_plain_llama(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.dtype == torch.float32 and getattr(model.config, "quantization_config", None) is None
    config = json.loads((gguf_cache_folder(GGUF) / "config.json").read_text())
    assert "quantization_config" not in config
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    assert len(blocks) == 30 and model.config.hidden_size == 576
    assert len(adapter.linear_layers(blocks[0])) == 7
    assert adapter.sequential_groups(blocks[29]) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"],
    ]
    assert len(tokenizer("The quick brown fox").input_ids) > 2


def test_block_replay_reproduces_the_model(smollm2):
    model, tokenizer = smollm2
    ids = eval_tokens("wikitext2", tokenizer, path=WIKITEXT)[:, :256]
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    assert torch.allclose(forward_blocks(model, get_adapter(model), ids), expected, atol=1e-5, rtol=0)


def test_whole_model_and_blockwise_perplexity_agree(smollm2):
    model, tokenizer = smollm2
    tokens = eval_tokens("wikitext2", tokenizer, path=WIKITEXT)
    assert tokens.shape[1] > 290_000
    whole = perplexity(model, tokens, seqlen=2048, dataset="wikitext2", max_windows=2, progress=False)
    blockwise = perplexity_blockwise(model, get_adapter(model), tokens, seqlen=2048, dataset="wikitext2",
                                     max_windows=2, progress=False)
    assert whole.partial and whole.nsamples == 2 and whole.total_windows == tokens.shape[1] // 2048
    assert blockwise.ppl == pytest.approx(whole.ppl, rel=1e-4)
    assert 5 < whole.ppl < 40, str(whole)


def test_every_cpu_backend_scores_the_same_perplexity(smollm2):
    """RTN 4-bit g128 act-order-free SmolLM2 (576-wide layers: ragged groups) through each backend that
    holds it: perplexity on 2 WikiText-2 windows within the backends' stated tolerance of the oracle."""
    from lightning_gptq.nn import QuantLinear, backends, to_backend

    model, tokenizer = smollm2
    quantized = rtn4_copy(model, "torch")
    tokens = eval_tokens("wikitext2", tokenizer, path=WIKITEXT)
    score = lambda m: perplexity(m, tokens, seqlen=2048, dataset="wikitext2", max_windows=2, progress=False).ppl
    oracle = score(quantized)
    spec = next(m for m in quantized.modules() if isinstance(m, QuantLinear)).spec()
    tested = []
    for name, cls in backends().items():
        if name == "torch" or cls.unsupported(spec):
            continue
        to_backend(quantized, name)
        assert all(m.backend == name for m in quantized.modules() if isinstance(m, QuantLinear))
        assert score(quantized) == pytest.approx(oracle, rel=cls.tolerance), name
        tested.append(name)
    assert tested, "no fast CPU backend could hold SmolLM2's layers"


def test_fused_and_compiled_decode_give_generates_greedy_tokens(smollm2):
    """The real model, RTN 4-bit g128 on cpu-packed with the int8 head: 24 greedy tokens from the fused step (one C++
    call per layer) and from the compiled step equal transformers' generate on the same model, token for token."""
    from lightning_gptq.models.decode import StaticDecoder
    from lightning_gptq.models.fused_decode import unavailable
    from lightning_gptq.nn import int8_head

    model, tokenizer = smollm2
    quantized = rtn4_copy(model, "cpu-packed")
    int8_head(quantized)
    ids = tokenizer("The history of the Roman Empire", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = quantized.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                      temperature=None, top_k=None, top_p=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    eos = quantized.generation_config.eos_token_id  # generate stops there; so does greedy when told
    eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    fused = StaticDecoder(quantized, 64, fused=True)
    assert unavailable(quantized) is None
    assert fused.greedy(ids, 24, eos) == expected and len(expected) > 4
    torch._dynamo.reset()
    assert StaticDecoder(quantized, 64, compiled=True).greedy(ids, 24, eos) == expected
    torch._dynamo.reset()
