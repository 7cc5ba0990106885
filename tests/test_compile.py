"""The quantized layers under ``torch.compile``: the C++ kernels as custom ops (``opcheck``), no graph
breaks on any CPU backend, and compiled outputs equal to eager ones."""

import pytest
import torch
import torch._dynamo

from lightning_gptq.nn import LayerSpec, quant_linear_class
from lightning_gptq.nn.cpu_packed import CpuPackedQuantLinear
from lightning_gptq.nn.timing import random_layer



@pytest.fixture
def packed():
    """Skips where the C++ kernel cannot be built (asked at run time: collecting must not build it)."""
    reason = CpuPackedQuantLinear.unavailable()
    if reason is not None:
        pytest.skip(f"the C++ CPU kernel is unavailable here: {reason}")


def _model(backend: str) -> torch.nn.Module:
    cls = quant_linear_class(backend)
    first = random_layer(cls, LayerSpec(64, 96, 4, 32, False, True, True), seed=1)  # act-order, bias
    second = random_layer(cls, LayerSpec(96, 64, 4, 32, False, False, False), seed=2)
    return torch.nn.Sequential(first, torch.nn.GELU(), second)


@pytest.mark.parametrize("kernel", ["gemm", "blocked", "int8x2"])
def test_packed_matmul_op_passes_opcheck(packed, kernel):
    from lightning_gptq.kernels import cpu_gemm
    from lightning_gptq.nn import ops

    layer = random_layer(CpuPackedQuantLinear, LayerSpec(64, 48, 4, 32, False, True, True), seed=3)
    args = layer.__dict__["_matmul_args"]
    x = torch.randn(3, 64)
    torch.library.opcheck(ops.packed_matmul, (x, *args, cpu_gemm.KERNELS[kernel]))
    hot = layer.__dict__["_hot"]
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(ops.packed_dequant_t, (hot["k_qweight"], hot["k_scales"], hot["k_zeros"], layer.bits,
                                                     layer.k_group, dtype))


@pytest.mark.parametrize("backend", ["torch", "cpu-packed", "cpu-int4"])
def test_no_graph_breaks(backend):
    cls = quant_linear_class(backend)
    reason = cls.unavailable()
    if reason is not None:
        pytest.skip(f"{backend} is unavailable here: {reason}")
    model = _model(backend)
    for rows in (1, 40):  # the decode and the prefill kernels
        x = torch.randn(rows, 64)
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert torch.equal(torch.compile(model, backend="eager", fullgraph=True)(x), model(x))
        torch._dynamo.reset()


def test_inductor_compiled_model_equals_eager(packed):
    model = _model("cpu-packed")
    compiled = torch.compile(model, fullgraph=True)
    for rows in (1, 40):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
