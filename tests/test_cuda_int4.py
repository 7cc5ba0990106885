"""The ``cuda-int4`` backend on CPU, over an emulation of PyTorch's CUDA int4 kernel.

The emulation follows the kernel's documented contract (input ``uint8 [N, K/2]`` with column 2i in the
high nibble; output ``int32 [N/8, K/(16t), 32, t/2]``, one tile per slice; ``W = (q − 8)·s + z'``) and
hides the order of codes inside a tile behind a secret permutation, so these tests prove that the
backend learns the order from the kernel (rather than assuming one), reads codes back exactly, and
computes what the oracle computes. On a GPU, ``cuda_int4.unavailable()`` runs the same round trip
and product check against the real kernel before the backend is ever offered.
"""

import pytest
import torch

from lightning_gptq.kernels import cuda_int4
from lightning_gptq.nn import LayerSpec, QuantLinear
from lightning_gptq.nn.cuda_int4 import CudaInt4QuantLinear
from lightning_gptq.nn.timing import random_layer

SECRET = {t: torch.randperm(8 * 16 * t, generator=torch.Generator().manual_seed(t)) for t in cuda_int4.INNER_K_TILES}


def _codes_from_input(w: torch.Tensor) -> torch.Tensor:
    return torch.stack([w >> 4, w & 0xF], dim=-1).view(w.shape[0], -1)  # column 2i high, 2i+1 low


def fake_convert(w: torch.Tensor, t: int, high_first: bool = True) -> torch.Tensor:
    assert w.dtype == torch.uint8 and t in (2, 4, 8)
    codes = _codes_from_input(w) if high_first else _codes_from_input(((w & 0xF) << 4) | (w >> 4))
    n, k = codes.shape
    assert n % 8 == 0 and k % (16 * t) == 0, (n, k, t)
    tiles = codes.view(n // 8, 8, k // (16 * t), 16 * t).permute(0, 2, 1, 3).reshape(n // 8, k // (16 * t), -1)
    nib = tiles[..., SECRET[t]].to(torch.int32).view(-1, 8)  # nibble i of a tile holds tile position SECRET[i]
    words = (nib << torch.arange(0, 32, 4, dtype=torch.int32)).sum(-1, dtype=torch.int64)
    return words.to(torch.uint32).view(torch.int32).view(n // 8, k // (16 * t), 32, t // 2)


def fake_mm(x: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    assert x.dtype == torch.bfloat16 and sz.dtype == torch.bfloat16
    t = packed.shape[3] * 2
    n, k = packed.shape[0] * 8, packed.shape[1] * 16 * t
    nib = ((packed.reshape(-1, 1) >> torch.arange(0, 32, 4, dtype=torch.int32)) & 0xF).view(n // 8, k // (16 * t), -1)
    tiles = torch.empty_like(nib)
    tiles[..., SECRET[t]] = nib
    q = tiles.view(n // 8, k // (16 * t), 8, 16 * t).permute(0, 2, 1, 3).reshape(n, k).float()
    s, z = sz[..., 0].float().repeat_interleave(group, 0).T, sz[..., 1].float().repeat_interleave(group, 0).T
    return (x.float() @ ((q - 8) * s + z).T).to(torch.bfloat16)


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(cuda_int4, "_convert_op", fake_convert)
    monkeypatch.setattr(cuda_int4, "_mm_op", fake_mm)
    monkeypatch.setattr(cuda_int4, "_ORDERS", {})


@pytest.mark.parametrize("t", cuda_int4.INNER_K_TILES)
def test_the_tile_order_is_learned_from_the_kernel_and_codes_round_trip(emulated, t):
    order = cuda_int4.tile_order(t, torch.device("cpu"))
    assert torch.equal(order, SECRET[t])
    codes = torch.randint(0, 16, (40, 16 * t * 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    assert torch.equal(cuda_int4.unpack(cuda_int4.pack(codes, t), 40, 16 * t * 3, t), codes)
    assert torch.equal(cuda_int4.unpack_through_kernel(cuda_int4.pack(codes, t), 40, 16 * t * 3, 32), codes)


def test_the_order_is_learned_once_and_serves_any_device(emulated, monkeypatch):
    """A layer moved off the GPU (Lightning's teardown and saving both move models to the CPU) reads its codes
    with the order learned where the kernel ran; it never calls the kernel where it now sits."""
    spec = LayerSpec(128, 64, 4, 64, False, True, True, "cpu", "float32")
    layer, oracle = random_layer(CudaInt4QuantLinear, spec, seed=3), random_layer(QuantLinear, spec, seed=3)

    def no_kernel(*args):
        raise AssertionError("the int4 kernel was called again")

    monkeypatch.setattr(cuda_int4, "_convert_op", no_kernel)
    monkeypatch.setattr(cuda_int4, "_mm_op", no_kernel)
    moved = cuda_int4.tile_order(layer.k_tiles, torch.device("meta"))  # another device: the same order, moved
    assert moved.device.type == "meta" and moved.shape == cuda_int4.tile_order(layer.k_tiles, torch.device("cpu")).shape
    saved, expected = layer.state_dict(), oracle.state_dict()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_the_load_time_check_passes_on_the_contract_and_fails_off_it(emulated, monkeypatch):
    assert cuda_int4.check_layout(torch.device("cpu")) is None
    # a kernel that read the nibbles of each input byte the other way round: codes still round-trip
    # (pack and the learned order agree with each other), but the product gives it away
    monkeypatch.setattr(cuda_int4, "_ORDERS", {})
    monkeypatch.setattr(cuda_int4, "_convert_op", lambda w, t: fake_convert(w, t, high_first=False))
    assert "product" in cuda_int4.check_layout(torch.device("cpu"))


def test_tiling_and_group_choice():
    assert cuda_int4.kernel_group(128, 576) == 64 and cuda_int4.tiles_for(576, 64) == (4, 576)  # SmolLM2: no padding
    assert cuda_int4.tiles_for(4096, 128) == (8, 4096)
    assert cuda_int4.kernel_group(-1, 100) == 128 and cuda_int4.tiles_for(100, 128)[1] == 128  # ties: the widest
    assert cuda_int4.kernel_group(48, 96) is None


CASES = [  # (out, in), group, act-order
    ((72, 576), 128, True), ((64, 256), 32, False), ((13, 100), -1, False), ((40, 192), 64, True)]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape,group,act_order", CASES)
def test_every_kernel_equals_the_oracle_and_saves_the_checkpoint_layout(emulated, bits, shape, group, act_order):
    out_f, in_f = shape
    spec = LayerSpec(in_f, out_f, bits, group, False, act_order, True, "cpu", "float32")
    layer, oracle = random_layer(CudaInt4QuantLinear, spec, seed=bits), random_layer(QuantLinear, spec, seed=bits)
    x = torch.randn(5, in_f, generator=torch.Generator().manual_seed(2))
    ref = oracle(x).double()
    for kernel in CudaInt4QuantLinear.kernels:
        y = layer.run(kernel, x)
        assert y.shape == (5, out_f) and y.dtype == x.dtype
        error = ((y.double() - ref).norm() / ref.norm()).item()
        assert error <= CudaInt4QuantLinear.tolerance_of(kernel), (kernel, error)
    saved, expected = layer.state_dict(), oracle.state_dict()
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    assert torch.equal(layer.dequantize(), oracle.dequantize())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_inputs_with_a_bias_get_their_own_dtype_back(emulated, dtype):
    """The int4 kernel answers in bf16 and ``dense-fp32`` in fp32: with an fp16/bf16 bias the layer still returns
    the input's dtype (an fp16 bias plus a bf16 output used to come out fp32)."""
    spec = LayerSpec(160, 72, 4, 32, False, True, True, "cpu", str(dtype).removeprefix("torch."))
    layer = random_layer(CudaInt4QuantLinear, spec, seed=1)
    x = torch.randn(5, 160, generator=torch.Generator().manual_seed(2)).to(dtype)
    ref = random_layer(QuantLinear, LayerSpec(160, 72, 4, 32, False, True, True), seed=1)(x.float()).double()
    for kernel in CudaInt4QuantLinear.kernels:
        y = layer.run(kernel, x)
        assert y.dtype == dtype, (kernel, y.dtype)
        assert ((y.double() - ref).norm() / ref.norm()).item() <= 1.6e-2, kernel


def test_the_kernel_is_checked_on_this_processs_gpu(monkeypatch):
    """Under ``gptq_ddp`` each process computes on its own GPU: the load-time check runs there, not on GPU 0 for all
    (a CUDA context on GPU 0 per process, and a check of a GPU the process never uses)."""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(cuda_int4, "unavailable", lambda index=0: asked.append(index))
    CudaInt4QuantLinear.unavailable()
    assert asked == [2]


def test_declared_capabilities_and_why_it_declines_here():
    assert CudaInt4QuantLinear.unsupported(LayerSpec(576, 576, 8, 128, False, False, False, "cuda", "float16")) \
        == "bits must be one of (2, 3, 4)"
    assert "cuda" in CudaInt4QuantLinear.unsupported(LayerSpec(576, 576, 4, 128, False, False, False, "cpu"))
    if not torch.cuda.is_available():
        assert CudaInt4QuantLinear.unavailable() == "needs an NVIDIA CUDA GPU"


def test_every_kernel_traces_without_graph_breaks(emulated):
    """Under ``torch.compile``, the layer (its tile order learned at load) is one graph for each kernel."""
    import torch._dynamo

    layer = random_layer(CudaInt4QuantLinear, LayerSpec(128, 64, 4, 64, False, True, True), seed=1)
    x = torch.randn(3, 128)
    for kernel in CudaInt4QuantLinear.kernels:
        explained = torch._dynamo.explain(lambda t: layer.run(kernel, t))(x)
        assert explained.graph_break_count == 0, (kernel, explained.break_reasons)
        compiled = torch.compile(lambda t: layer.run(kernel, t), backend="eager", fullgraph=True)
        assert torch.equal(compiled(x), layer.run(kernel, x))
        torch._dynamo.reset()
