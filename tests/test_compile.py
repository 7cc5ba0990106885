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
    op = torch.ops.lightning_gptq
    torch.library.opcheck(op.packed_matmul.default, (x, *args, cpu_gemm.KERNELS[kernel]))
    torch.testing.assert_close(ops.packed_matmul(x, *args, cpu_gemm.KERNELS[kernel]),
                               cpu_gemm.matmul(x, *args, cpu_gemm.KERNELS[kernel]), rtol=0, atol=0)
    hot = layer.__dict__["_hot"]
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(op.packed_dequant_t.default, (hot["k_qweight"], hot["k_scales"], hot["k_zeros"],
                                                            layer.bits, layer.k_group, dtype))


def test_head_ops_pass_opcheck(packed):
    from lightning_gptq.nn.head import int8_rows

    w = torch.randn(40, 48)
    q, step = int8_rows(w)
    for rows in ((1, 48), (3, 48), (2, 1, 48)):
        x = torch.randn(*rows)
        torch.library.opcheck(torch.ops.lightning_gptq.dense_gemv.default, (x, w))
        torch.library.opcheck(torch.ops.lightning_gptq.int8_row_gemv.default, (x, q, step))


def test_ops_are_defined_once_per_process(packed):
    """A second kernel library loaded into the process (an A/B of two revisions) must not define them again."""
    from lightning_gptq.kernels import cpu_gemm

    assert cpu_gemm._load().register_ops() is False


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


def test_gemv_head_compiles_without_graph_breaks(packed):
    from lightning_gptq.nn import GemvHead

    head = torch.nn.Linear(48, 40, bias=False)
    head.__class__ = GemvHead
    x = torch.randn(1, 48)
    explained = torch._dynamo.explain(head)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch.testing.assert_close(torch.compile(head, fullgraph=True)(x), x @ head.weight.T, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_export_carries_the_kernels(packed):
    """``torch.export`` holds each kernel call as one ``lightning_gptq::`` node; the exported program equals eager."""
    model = _model("cpu-packed")
    x = torch.randn(1, 64)
    exported = torch.export.export(model, (x,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any("lightning_gptq.packed_matmul" in t for t in targets), targets
    torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.fixture
def interpreted_triton():
    pytest.importorskip("triton", reason="triton is not installed (Linux only)")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs on CPU only under TRITON_INTERPRET=1 (set by conftest.py)")


def test_triton_ops_pass_opcheck(interpreted_triton):
    from lightning_gptq.nn.triton import TritonQuantLinear

    layer = random_layer(TritonQuantLinear, LayerSpec(64, 48, 4, 32, False, True, True), seed=3)
    hot = layer.__dict__["_hot"]
    args = (hot["k_words"], hot["k_scales"], hot["k_zeros"], layer.bits, layer.k_group)
    op = torch.ops.lightning_gptq
    for rows in (1, 5):
        torch.library.opcheck(op.triton_matmul.default, (torch.randn(rows, layer.k_pad), *args))
    torch.library.opcheck(op.triton_dequantize.default, (*args, layer.k_pad, torch.float32))


@pytest.mark.parametrize("kernel", ["fused", "dequant"])
def test_triton_layers_trace_without_graph_breaks(interpreted_triton, kernel):
    """Dynamo cannot trace Triton's launch wrappers; traced, the layer calls them as ``lightning_gptq::`` ops."""
    from lightning_gptq.nn.triton import TritonQuantLinear

    first = random_layer(TritonQuantLinear, LayerSpec(64, 96, 4, 32, False, True, True), seed=1)  # act-order, bias
    second = random_layer(TritonQuantLinear, LayerSpec(96, 64, 3, -1, False, False, False), seed=2)

    def model(x):
        return second.run(kernel, torch.nn.functional.gelu(first.run(kernel, x)))

    for rows in (1, 5):  # the GEMV and the tl.dot tiles
        x = torch.randn(rows, 64)
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x), model(x))  # the same kernels: the same numbers
        torch._dynamo.reset()

