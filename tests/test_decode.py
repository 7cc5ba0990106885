"""The LM head's int8 option and the static-cache decoder (eager and compiled) against transformers' own decoding."""

import re

import pytest
import torch

from lightning_gptq.models import unfuse_experts
from lightning_gptq.models.decode import StaticDecoder
from lightning_gptq.nn import Int8Head, int8_head
from lightning_gptq.nn.cpu_packed import CpuPackedQuantLinear
from lightning_gptq.nn.head import int8_rows

from tiny_lm import char_tokenizer
from tiny_models import FACTORIES, MOE_FACTORIES, token_ids


@pytest.fixture
def packed():
    reason = CpuPackedQuantLinear.unavailable()
    if reason is not None:
        pytest.skip(f"the C++ CPU kernel is unavailable here: {reason}")


def test_int8_rows_round_each_row_to_its_own_step():
    w = torch.tensor([[0.5, -1.0, 0.25], [100.0, 3.0, -50.0], [0.0, 0.0, 0.0]])
    q, step = int8_rows(w)
    assert q.dtype == torch.int8 and step.tolist() == pytest.approx([1 / 127, 100 / 127, step[2].item()])
    assert q[0].tolist() == [64, -127, 32] and q[1].tolist() == [127, 4, -64] and q[2].tolist() == [0, 0, 0]
    assert ((q.float() * step[:, None] - w).abs() <= step[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("rows", [1, 3, 7, 40])  # the int8 GEMV (up to max_rows) and the dequantized slices
def test_int8_head_equals_its_dequantized_weight(packed, rows, monkeypatch):
    model = FACTORIES["llama"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = int8_head(model)
    head = model.get_output_embeddings()
    assert isinstance(head, Int8Head) and "int8 rows" in message
    assert model.state_dict().keys() == before.keys()  # the copy is not saved; the fp32 weight stays
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    monkeypatch.setattr(Int8Head, "chunk", 40)  # several slices on the tiny vocabulary (96)
    x = torch.randn(rows, 32)
    expected = x.double() @ (head.int8_weight.double() * head.int8_step.double()[:, None]).T
    torch.testing.assert_close(head(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert int8_head(model) == "LM head: already int8"


@pytest.mark.parametrize("k", [576, 100, 64])  # whole 64-byte chunks, a ragged run and chunk, one chunk
def test_int8_row_gemv_against_fp64(k):
    """The head kernel on shapes of real heads (the tiny models' K is 32), both its paths where the CPU has VNNI:
    within the rounding of its inputs to two int8 digits per run of 32 (VNNI) or fp32 summation order (the path
    of CPUs without it); an outlier input and a zero run included."""
    from lightning_gptq.kernels import cpu_gemm

    gen = torch.Generator().manual_seed(k)
    q = torch.randint(-127, 128, (1000, k), generator=gen, dtype=torch.int8)
    step = torch.rand(1000, generator=gen) * 1e-2 + 1e-3
    x = torch.randn(3, k, generator=gen)
    x[1, 7] = 300.0  # one outlier: its run's step is 300/127
    x[2, :32] = 0.0
    want = (x.double() @ q.double().T) * step.double()
    scale = (x.abs().double() @ q.double().abs().T * step.double()).amax(dim=1, keepdim=True)  # sum |x w| per row
    ext = cpu_gemm._load()
    paths = {"vnni": 1e-4, "fp32": 1e-6} if ext.head_has_vnni() else {"fp32": 1e-6}  # (AVX2 machines: fp32 only)
    previous = ext.set_head_vnni(True)
    try:
        for path, tolerance in paths.items():
            ext.set_head_vnni(path == "vnni")
            got = cpu_gemm.int8_row_gemv(x, q, step).double()
            assert ((got - want).abs() / scale).max() < tolerance, path
    finally:
        ext.set_head_vnni(previous)


def test_int8_head_refuses_what_it_cannot_do():
    model = FACTORIES["llama"]()
    model.lm_head = torch.nn.Identity()
    with pytest.raises(ValueError, match="nn.Linear"):
        int8_head(model)


def _eager_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             temperature=None, top_k=None, top_p=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_static_decoder_greedy_equals_generate(arch):
    model = FACTORIES[arch]()
    ids = token_ids(1, 12)
    decoder = StaticDecoder(model, max_cache_len=32, compiled=False)
    assert decoder.greedy(ids, 10) == _eager_greedy(model, ids, 10)
    assert decoder.greedy(ids[:, :5], 4) == _eager_greedy(model, ids[:, :5], 4)  # a reused cache starts clean


#: one architecture per mechanism the step must get right (learned positions, ALiBi, sliding windows, hybrid
#: sliding/full layers, MoE banks, attention sinks); the others run with the slow tests
DECODE_ARCHS = ("opt", "bloom", "mistral", "gemma3", "mixtral", "gpt_oss")


@pytest.mark.parametrize("arch", [a if a in DECODE_ARCHS else pytest.param(a, marks=pytest.mark.slow)
                                  for a in [*FACTORIES, *MOE_FACTORIES]])
def test_static_decode_compiled_and_eager_equal_the_whole_forward(arch):
    """Every architecture's one-token steps past the sliding window (the tiny models' is 4): the compiled step
    over our decode attention (GPT-OSS's sinks through its own eager attention, MoE banks as one operator, OPT
    with its positions given) and the eager step give the logits of one forward over the whole sequence."""
    factories = {**FACTORIES, **MOE_FACTORIES}
    model = factories[arch]()
    unfuse_experts(model)
    ids = token_ids(1, 14, seed=3)
    with torch.no_grad():
        whole = model(ids).logits[0, 7:]
    torch._dynamo.reset()
    for compiled in (False, True):
        decoder = StaticDecoder(model, max_cache_len=24, compiled=compiled)
        steps = torch.stack([decoder.prefill(ids[:, :8]), *(decoder.step(t) for t in ids[0, 8:])])
        torch.testing.assert_close(steps, whole, rtol=1e-5, atol=1e-5 * float(whole.abs().max()))
    torch._dynamo.reset()


def test_predict_auto_decodes_eagerly_when_the_static_path_fails(monkeypatch):
    from lightning_gptq.lightning import generation
    from lightning_gptq.lightning.generation import Generation, GreedyPaths, complete

    model = FACTORIES["llama"]()
    paths = GreedyPaths(model, Generation(decode="auto", max_new_tokens=4))
    monkeypatch.setattr(generation.StaticDecoder, "greedy", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    tokenizer = char_tokenizer()
    first = complete(model, tokenizer, "3 4 5", 0, paths.settings, torch.device("cpu"), paths)
    assert first["decode"] == "eager" and paths.path() == "compiled"
    with pytest.warns(UserWarning, match="compiled decode path failed .RuntimeError: boom.; decoding eagerly"):
        second = complete(model, tokenizer, "3 4 5", 1, paths.settings, torch.device("cpu"), paths)
    assert second["decode"] == "eager" and second["completion"] == first["completion"] and paths.path() == "eager"
    with pytest.raises(RuntimeError, match="boom"):  # a path asked for by name is not replaced
        complete(model, tokenizer, "3 4 5", 2, Generation(decode="compiled", max_new_tokens=4), torch.device("cpu"),
                 GreedyPaths(model, Generation(decode="compiled", max_new_tokens=4)))


def test_static_decoder_refuses_a_full_cache_and_what_is_not_one_prompt(tmp_path):
    """A batch of two, an empty prompt and 1-D ids gave index_copy_/reshape tracebacks (a user audit); a JSON-lines
    prompt that is not text, a TypeError inside the chat template."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_gptq.lightning.generation import read_prompts

    model = FACTORIES["llama"]()
    decoder = StaticDecoder(model, max_cache_len=8, compiled=False)
    for ids in (token_ids(2, 4), token_ids(1, 4)[:, :0], token_ids(1, 4)[0]):
        with pytest.raises(ValueError, match=r"one prompt at a time: ids must be \[1, T\] .* got " + re.escape(str(list(ids.shape)))):
            decoder.greedy(ids, 2)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": 5}\n')
    with pytest.raises(MisconfigurationException, match="a prompt must be text, got 5"):
        read_prompts(None, str(tmp_path / "p.jsonl"))
    with pytest.raises(ValueError, match="no room"):
        decoder.prefill(token_ids(1, 8))
    decoder.prefill(token_ids(1, 7))
    decoder.step(3)
    with pytest.raises(ValueError, match="full"):
        decoder.step(3)


def test_compiled_decoder_matches_eager_logits_with_quantized_layers(packed):
    """Quantized layers (C++ kernels as operators) and the int8 head, compiled by inductor: the same tokens and
    logits equal to eager's up to fp32 summation order; later prompts reuse the compiled step."""
    from lightning_gptq import QuantConfig, quantize

    model = quantize(FACTORIES["llama"](), token_ids(2, 16), QuantConfig(bits=4, group_size=32), method="rtn",
                     backend="cpu-packed")
    int8_head(model)
    torch._dynamo.reset()
    eager = StaticDecoder(model, max_cache_len=24, compiled=False)
    compiled = StaticDecoder(model, max_cache_len=24, compiled=True)
    for prompt in (token_ids(1, 10, seed=1), token_ids(1, 6, seed=2)):
        a, b = eager.prefill(prompt), compiled.prefill(prompt)
        for _ in range(6):
            token = int(a.argmax())
            assert token == int(b.argmax())
            a, b = eager.step(token), compiled.step(token)
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert compiled.compile_s > 0
    assert compiled.attention == "lightning_gptq_decode"  # traced with our decode attention, then set back
    assert model.config._attn_implementation == "sdpa"
    torch._dynamo.reset()


def test_a_compile_mode_goes_in_as_the_options_it_stands_for(monkeypatch):
    """``mode="reduce-overhead"`` (CUDA graphs: what latency and the GPU test ask for on CUDA) beside the decoder's
    own options: torch.compile refuses a mode and options together, so the mode is passed as its options."""
    calls, real = [], torch.compile

    def recording(fn, **kwargs):
        calls.append({**kwargs, "options": dict(kwargs.get("options") or {})})  # (torch.compile pops some)
        return real(fn, **kwargs)  # the real one raises on a mode beside options

    monkeypatch.setattr(torch, "compile", recording)
    StaticDecoder(FACTORIES["llama"](), max_cache_len=8, compiled=True, mode="reduce-overhead")
    assert calls[0].get("mode") is None and calls[0]["options"]["triton.cudagraphs"] is True
    assert calls[0]["options"]["guard_filter_fn"] is torch.compiler.skip_all_guards_unsafe


def test_decode_attention_equals_eager_attention(packed):
    """One query token over a cache: grouped-query heads, a mask with masked positions (skipped) and without."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from lightning_gptq.models.decode_attention import decode_attention_forward, register

    assert register() == "lightning_gptq_decode"
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 6, 1, 16, generator=gen), torch.randn(2, 2, 40, 16, generator=gen), torch.randn(2, 2, 40, 16, generator=gen)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = 3, False
    mask = torch.zeros(2, 1, 1, 40)
    mask[0, ..., 25:] = torch.finfo(torch.float32).min  # a static cache filled to 25 positions
    mask[1, ..., :3] = torch.finfo(torch.float32).min  # and one whose first positions are masked
    for m in (mask, None):
        expected, _ = eager_attention_forward(module, q, k, v, m, scaling=0.25)
        got, weights = decode_attention_forward(module, q, k, v, m, scaling=0.25)
        assert weights is None and got.shape == expected.shape == (2, 1, 6, 16)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.library.opcheck(torch.ops.lightning_gptq.decode_attention.default, (q, k, v, mask, 0.25))
    # the prompt (several query tokens) goes to sdpa
    q4 = torch.randn(2, 6, 4, 16, generator=gen)
    causal = torch.zeros(2, 1, 4, 40)
    expected, _ = eager_attention_forward(module, q4, k, v, causal, scaling=0.25)
    torch.testing.assert_close(decode_attention_forward(module, q4, k, v, causal, scaling=0.25)[0], expected,
                               rtol=1e-5, atol=1e-5)


def test_module_options_are_checked():
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_gptq.lightning import GPTQModule

    with pytest.raises(MisconfigurationException, match="lm_head must be 'fp32' or 'int8'"):
        GPTQModule("unused", lm_head="int4")
    with pytest.raises(MisconfigurationException, match="latency_decode must be"):
        GPTQModule("unused", latency_decode="fast")


def test_validate_scores_with_the_int8_head(packed, tmp_path):
    """``lm_head: int8`` changes what validate scores (the head's cost shows in perplexity), nothing else."""
    from test_lightning import cli_args
    from tiny_lm import tiny_model_dir

    from lightning_gptq.cli import main

    model_dir = tiny_model_dir(tmp_path, "llama")
    scores = {}
    for head in ("fp32", "int8"):
        cli = main(["validate", *cli_args(model_dir, tmp_path / head, "--model.latency=false", f"--model.lm_head={head}")])
        scores[head] = cli.model.results["val"]["wikitext2"]["ppl"]
        assert isinstance(cli.model.lm.get_output_embeddings(), Int8Head) == (head == "int8")
    assert scores["int8"] != scores["fp32"] and scores["int8"] == pytest.approx(scores["fp32"], rel=0.05)


def test_shared_inputs_are_bit_identical_and_hold_the_codes_once(packed):
    """q/k/v and gate/up as one kernel call at decode sizes: the same logits bit for bit, eager and compiled,
    the same state_dict, and each layer's codes a view of the shared tensor; a group whose members decode one row
    with different kernels takes one (``auto`` timing noise made fused decoding unavailable, a user audit)."""
    from lightning_gptq import QuantConfig, quantize
    from lightning_gptq.models.decode import share_inputs
    from lightning_gptq.nn.cpu_packed import CpuPackedQuantLinear, SharedInput

    model = quantize(FACTORIES["llama"](), token_ids(2, 16), QuantConfig(bits=4, group_size=32), method="rtn",
                     backend="cpu-packed")
    layers = [m for m in model.modules() if isinstance(m, CpuPackedQuantLinear)]
    for layer in layers:  # auto's timing may pick other kernels for each tiny layer
        layer.set_dispatch([(1, "int8x2"), (64, "blocked")])
    prompt = token_ids(1, 9, seed=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref_prefill = model(input_ids=prompt).logits
        out = model(input_ids=prompt[:, :8], use_cache=True)
        ref_step = model(input_ids=prompt[:, 8:], cache=out.cache, use_cache=True).logits
        ref_short = model(input_ids=prompt[:, :4]).logits  # <= 4 rows: a shared call once they share
    layers[1].set_dispatch([(1, "gemm"), (64, "blocked")])  # block 0's k_proj: another one-row kernel than q/v's
    assert share_inputs(model) == 6 and share_inputs(model) == 0  # 3 blocks × (q/k/v, gate/up)
    assert [layer.kernel_for(1) for layer in layers[:3]] == ["int8x2"] * 3  # the group's kernel: most members'
    assert [layer.kernel_for(64) for layer in layers[:3]] == ["blocked"] * 3
    attn = model.model.layers[0].self_attn
    shared = attn.q_proj.__dict__["_shared"]
    assert isinstance(shared, SharedInput) and attn.k_proj.__dict__["_shared"] is shared
    assert attn.k_proj.k_qweight.untyped_storage().data_ptr() == shared.args[1].untyped_storage().data_ptr()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=prompt).logits, ref_prefill)  # many rows: each layer alone
        out = model(input_ids=prompt[:, :8], use_cache=True)
        assert torch.equal(model(input_ids=prompt[:, 8:], cache=out.cache, use_cache=True).logits, ref_step)
    with torch.inference_mode():  # Lightning's validate/predict: an inference tensor has no version counter (a crash)
        out = model(input_ids=prompt[:, :8], use_cache=True)
        assert torch.equal(model(input_ids=prompt[:, 8:], cache=out.cache, use_cache=True).logits, ref_step)
        assert torch.equal(model(input_ids=prompt[:, :4]).logits, ref_short)  # a prompt of <= 4 rows
    torch._dynamo.reset()
    eager, compiled = StaticDecoder(model, 16, compiled=False), StaticDecoder(model, 16, compiled=True)
    a, b = eager.prefill(prompt[:, :8]), compiled.prefill(prompt[:, :8])
    for token in prompt[0, 8:].tolist() + [5, 7]:
        a, b = eager.step(token), compiled.step(token)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_prefill_latency_computes_only_the_next_tokens_logits(arch):
    """What generation waits for: the head sees one row of the prompt in the timed prefill (every call)."""
    from lightning_gptq.models.latency import measure_latency

    model = FACTORIES[arch]()
    rows = []
    model.get_output_embeddings().register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[-2]))
    result = measure_latency(model, prompt_tokens=9, decode_tokens=2, repeats=1, decode="eager")
    assert result.prefill_tokens_per_s > 0
    assert rows and set(rows) == {1}  # prefill and decode calls alike; without logits_to_keep prefill gives 9


def _packed_llama(arch="llama", kernel="int8x2"):
    from lightning_gptq import QuantConfig, quantize

    model = quantize(FACTORIES[arch](), token_ids(2, 16), QuantConfig(bits=4, group_size=32), method="rtn",
                     backend="cpu-packed")
    for layer in model.modules():
        if isinstance(layer, CpuPackedQuantLinear):  # auto's timing may pick other kernels for each tiny layer
            layer.set_dispatch([(1, kernel), (64, "blocked")])
    return model


@pytest.mark.parametrize("kernel", ["int8x2", "gemm"])
def test_fused_step_equals_the_eager_static_step(packed, kernel):
    """One C++ call per layer (norms, joined q/k/v, RoPE, cache write, attention, o, joined gate/up, SiLU, down,
    residuals) against transformers' own layers on the same static cache: logits and cache rows to fp32 rounding,
    greedy tokens equal, and the cache's length kept for transformers' next call."""
    from lightning_gptq.models.fused_decode import unavailable

    model = _packed_llama(kernel=kernel)
    eager, fused = StaticDecoder(model, 24, compiled=False), StaticDecoder(model, 24, fused=True)
    assert unavailable(model) is None and fused.compiled is False
    prompt = token_ids(1, 9, seed=3)
    a, b = eager.prefill(prompt), fused.prefill(prompt)
    for token in [5, 7, 11, 2, 30]:
        a, b = eager.step(token), fused.step(token)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(fused.cache.layers, eager.cache.layers):
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.values, theirs.values, rtol=1e-5, atol=1e-5)
        assert int(mine.cumulative_length) == int(theirs.cumulative_length) == 14
    assert fused.greedy(prompt, 10) == eager.greedy(prompt, 10)


def test_fused_step_says_why_it_cannot_run(packed):
    from lightning_gptq.models.fused_decode import unavailable

    assert "model type 'opt'" in unavailable(FACTORIES["opt"]())
    assert "not all on cpu-packed" in unavailable(FACTORIES["llama"]())  # full precision
    model = _packed_llama()
    model.model.layers[1].self_attn.k_proj.set_dispatch([(1, "gemm"), (64, "blocked")])  # takes q/v's kernel to join
    StaticDecoder(model, 24, fused=True)
    model = _packed_llama()
    k_proj = model.model.layers[1].self_attn.k_proj
    k_proj.bias = torch.zeros(k_proj.out_features)  # q/k/v cannot be one call
    with pytest.raises(ValueError, match="layer 1: q/k/v or gate/up do not run as one kernel call"):
        StaticDecoder(model, 24, fused=True)
    assert "sliding-window" in unavailable(_packed_llama("mistral"))


def test_the_fused_step_declines_a_16_bit_or_gpu_model_before_building_the_cpu_kernel(monkeypatch):
    """``latency_decode: auto`` asks first whether the fused C++ step runs: on a GPU (or a 16-bit model) the answer
    must come without compiling the C++ kernel, about a minute a GPU run would spend for nothing."""
    from lightning_gptq.kernels import cpu_gemm
    from lightning_gptq.models.fused_decode import unavailable

    def build():
        raise AssertionError("the C++ kernel was asked for")

    monkeypatch.setattr(cpu_gemm, "unavailable", build)
    assert "needs an fp32 model on CPU, got torch.float16" in unavailable(FACTORIES["llama"]().to(torch.float16))


def test_fused_layer_op_passes_opcheck(packed):
    from lightning_gptq.models.fused_decode import FusedLlamaStep

    model = _packed_llama()
    decoder = StaticDecoder(model, 16, fused=True)
    decoder.prefill(token_ids(1, 5))
    ln1, ln2, eps, scale, tensors, meta, dims = FusedLlamaStep(model, 16).layers[0]
    cache = decoder.cache.layers[0]
    x, cos, sin = torch.randn(1, 1, 32), torch.randn(16, dims[2]), torch.randn(16, dims[2])
    torch.library.opcheck(torch.ops.lightning_gptq.llama_decode_layer.default,
                          (x, cos, sin, cache.keys, cache.values, cache.cumulative_length, 5, ln1, ln2, eps, scale,
                           tensors, meta, dims))
    torch.ops.lightning_gptq.llama_decode_layer(x, cos, sin, cache.keys, cache.values, cache.cumulative_length, 5,
                                                ln1, ln2, eps, scale, tensors, meta, dims)
    assert int(cache.cumulative_length) == 6  # the cache's count of filled positions, kept for transformers
    norm = model.model.norm
    torch.library.opcheck(torch.ops.lightning_gptq.rms_norm.default, (x, norm.weight, norm.variance_epsilon))
    torch.testing.assert_close(torch.ops.lightning_gptq.rms_norm(x, norm.weight, norm.variance_epsilon), norm(x),
                               rtol=1e-6, atol=1e-6)


def test_auto_latency_times_the_fused_path_where_it_runs(packed):
    from lightning_gptq.models.latency import measure_latency

    result = measure_latency(_packed_llama(), prompt_tokens=8, decode_tokens=3, repeats=1, decode="auto")
    assert result.fused_decode_ms_per_token > 0 and result.eager_decode_ms_per_token > 0
    assert result.compiled_decode_ms_per_token is None and result.compile_s is None  # nothing compiled
    assert result.decode_ms_per_token == min(result.fused_decode_ms_per_token, result.eager_decode_ms_per_token)
    assert "fused" in str(result) and "eager" in str(result)


def test_predict_paths_take_the_fused_step_where_it_runs(packed):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_gptq.lightning.generation import Generation, GreedyPaths

    model = _packed_llama()
    assert GreedyPaths(model, Generation(decode="auto")).static == "fused"
    assert GreedyPaths(FACTORIES["llama"](), Generation(decode="auto")).static == "compiled"  # full precision
    paths = GreedyPaths(model, Generation(decode="fused", max_new_tokens=6))
    prompt = token_ids(1, 7, seed=5)
    new, compile_s = paths.generate(prompt)
    assert paths.path() == "fused" and compile_s == 0.0 and paths.decoder.compiled is False
    assert new.tolist() == _eager_greedy(model, prompt, 6)
    with pytest.raises(MisconfigurationException, match="decode=fused: the fused step cannot run this model .*not all "
                                                        "on cpu-packed"):  # (was a traceback at the first prompt)
        GreedyPaths(FACTORIES["llama"](), Generation(decode="fused"))
