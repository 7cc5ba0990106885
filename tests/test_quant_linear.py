"""The quantized linear and the plain-torch kernel it computes with."""

import pytest
import torch
from torch import nn

from lightning_gptq import QuantConfig, gptq_quantize, rtn_quantize
from lightning_gptq.kernels import torch_ref
from lightning_gptq.nn import QuantLinear, make_quant_linear, quant_linear_class, register_quant_linear


@pytest.mark.parametrize("shape,group_size,act_order", [((24, 40), 16, False), ((24, 40), -1, False),
                                                        ((24, 40), 16, True), ((8, 64), 64, False)])
def test_quant_linear_computes_with_the_solver_weights(shape, group_size, act_order):
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(shape[1], shape[0])
    X = torch.randn(200, shape[1], generator=gen)
    qw = gptq_quantize(linear.weight, 2 * X.T @ X / 200, QuantConfig(bits=4, group_size=group_size, act_order=act_order))
    layer = make_quant_linear(linear, qw)
    torch.testing.assert_close(layer.dequantize(), qw.dequantize(), rtol=0, atol=0)
    # the broadcast path (contiguous groups) and the gather path agree exactly
    gathered = torch_ref.dequantize(layer.codes, layer.scales, layer.zeros, layer.g_idx)
    assert torch.equal(gathered, layer.dequantize())
    assert (layer.contiguous_group_size() is None) == (act_order and group_size != -1)
    x = torch.randn(3, 5, shape[1], generator=gen)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, qw.dequantize(), linear.bias))
    assert layer.weight.shape == shape and "bits=4" in repr(layer)


def test_backend_registry():
    @register_quant_linear("test-backend")
    class Doubling(QuantLinear):
        def forward(self, x):
            return 2 * super().forward(x)

    qw = rtn_quantize(torch.randn(4, 8), QuantConfig(bits=8, group_size=-1))
    layer = make_quant_linear(nn.Linear(8, 4, bias=False), qw, backend="test-backend")
    assert isinstance(layer, Doubling) and layer.backend == "test-backend" and layer.bias is None
    with pytest.raises(ValueError, match="unknown quantized-linear backend 'nope'"):
        quant_linear_class("nope")
