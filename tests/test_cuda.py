"""On a CUDA GPU only: ``scripts/check_gpu.py --all`` runs this file there; elsewhere every test skips, saying so.

The CUDA backends inside compiled models: no graph breaks, CUDA graphs (``mode="reduce-overhead"``) equal
to eager up to the order of split-K partial sums, and a model calibrated on the GPU in fp16 (Hessians in
fp32) whose compiled, graph-replayed decode gives eager's tokens.
"""

import pytest
import torch
import torch._dynamo

from lightning_gptq.nn import LayerSpec, quant_linear_class
from lightning_gptq.nn.timing import random_layer

from tiny_models import FACTORIES, token_ids

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (scripts/check_gpu.py --all runs this file on one)")


def _available(backend: str):
    cls = quant_linear_class(backend)
    reason = cls.unavailable()
    if reason is not None:
        pytest.skip(f"{backend} is unavailable on this GPU: {reason}")
    return cls


@pytest.mark.parametrize("backend,dtype", [("triton", "float16"), ("cuda-int4", "bfloat16")])
def test_cuda_graphs_of_the_kernels_equal_eager(backend, dtype):
    """Dynamo's ``cudagraphs`` backend (no code generation: it compiles in seconds) replays the kernels in a graph."""
    cls = _available(backend)
    first = random_layer(cls, LayerSpec(576, 1536, 4, 64, False, True, True, "cuda", dtype), seed=1)  # act-order, bias
    second = random_layer(cls, LayerSpec(1536, 576, 4, 128, False, False, False, "cuda", dtype), seed=2)
    for kernel in cls.kernels[:2]:  # (cuda-int4's third, dense-fp32, is the second in fp32)
        def model(x, kernel=kernel):
            return second.run(kernel, torch.nn.functional.gelu(first.run(kernel, x)))

        for rows in (1, 40):
            x = torch.randn(rows, 576, device="cuda", dtype=getattr(torch, dtype))
            explained = torch._dynamo.explain(model)(x)
            assert explained.graph_break_count == 0, (kernel, explained.break_reasons)
            compiled = torch.compile(model, backend="cudagraphs", fullgraph=True)
            for _ in range(3):  # warm-up (autotuning happens here), capture, replay
                y = compiled(x).clone()
            # split-K partial sums are added atomically in arrival order: a one-ulp difference in the first layer's
            # output moves the second's, so compare as the kernels' own check does, by relative norm
            eager = model(x).float()
            assert ((y.float() - eager).norm() / eager.norm()).item() <= 2e-3, (kernel, rows)
            torch._dynamo.reset()


def test_fit_in_fp16_on_the_gpu_and_compiled_decode_gives_eager_tokens(tmp_path):
    import json

    from lightning_gptq import QuantConfig, quantize
    from lightning_gptq.models.decode import StaticDecoder
    from lightning_gptq.nn import QuantLinear

    model = quantize(FACTORIES["llama"]().to(torch.float16), token_ids(4, 16), QuantConfig(bits=4, group_size=32),
                     equalize=[0.5, 1.0], accelerator="gpu", output_dir=tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["equalize_refused"] == []  # fp16 rounding is no reason to refuse an exact rewrite
    chosen = summary["quantized_linear"]["choices"]  # `auto` chose on the GPU, and the summary says what it chose
    assert chosen and all(c["spec"]["device"] == "cuda" and c["spec"]["dtype"] == "float16" for c in chosen)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.scales.device.type == "cuda" for m in layers)
    assert next(model.parameters()).dtype == torch.float16
    eager = StaticDecoder(model, max_cache_len=24, compiled=False)
    compiled = StaticDecoder(model, max_cache_len=24, compiled=True, mode="reduce-overhead")
    prompt = token_ids(1, 8, seed=1).cuda()
    a, b = eager.prefill(prompt), compiled.prefill(prompt)
    for _ in range(8):
        token = int(a.argmax())
        assert token == int(b.argmax())
        a, b = eager.step(token), compiled.step(token)
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-2, atol=1e-2)
    torch._dynamo.reset()
