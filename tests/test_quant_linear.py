"""The packed GPTQ layout, the quantized linear's backends against the oracle, and ``auto``."""

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gptq import QuantConfig, gptq_quantize, rtn_quantize
from lightning_gptq.kernels import cpu_gemm, cpu_int4, torch_ref
from lightning_gptq.kernels.packing import pack_cols, pack_rows, packed_length, unpack_cols, unpack_rows
from lightning_gptq.nn import (
    LayerSpec,
    QuantLinear,
    build,
    choose,
    exact_kernels,
    make_quant_linear,
    quant_linear_class,
    register_quant_linear,
    to_backend,
)
from lightning_gptq.nn import selection, timing
from lightning_gptq.nn.selection import AUTO_TOLERANCE, measure
from lightning_gptq.nn.timing import random_layer, worth_timing
from lightning_gptq.nn.cpu_int4 import CpuInt4QuantLinear
from lightning_gptq.nn.cpu_packed import CpuPackedQuantLinear
from lightning_gptq.nn.triton import TritonQuantLinear



def stream_pack(codes: list[int], bits: int) -> list[int]:
    """The published layout spelled out with Python integers: one little-endian bit stream, cut into
    32-bit words, read as signed int32 (independent of the vectorised packer)."""
    stream = sum(c << (i * bits) for i, c in enumerate(codes))
    words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(math.ceil(len(codes) * bits / 32))]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


# -- packing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [32, 96, 100, 576])
def test_pack_rows_round_trips_and_matches_the_bit_stream(bits, n):
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (n, 5), generator=gen)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (packed_length(n, bits), 5)
    assert torch.equal(unpack_rows(packed, bits, n), codes.to(torch.uint8))
    padded = codes[:, 2].tolist() + [0] * (packed.shape[0] * 32 // bits - n)
    assert packed[:, 2].tolist() == stream_pack(padded, bits)


def test_pack_layout_by_hand():
    # 4 bits: word = Σ_j code[8w + j] << 4j, lowest bits first
    codes = torch.arange(16).remainder(16)[:, None].repeat(2, 1)  # 0..15, 0..15
    assert pack_rows(codes, 4)[:, 0].tolist() == [0x76543210, 0xFEDCBA98 - (1 << 32), 0x76543210, 0xFEDCBA98 - (1 << 32)]
    # 3 bits: value 10 straddles words 0 and 1 (bits 30..32), value 21 words 1 and 2 (bits 63..65)
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10], codes[21] = 0b111, 0b101
    words = pack_rows(codes, 3)[:, 0].tolist()
    signed = lambda w: w - (1 << 32) if w >= 1 << 31 else w
    assert words == [signed(0b11 << 30), signed(1 << 31 | 0b1), 0b10]
    assert torch.equal(unpack_rows(pack_rows(codes, 3), 3, 32), codes.to(torch.uint8))


@pytest.mark.parametrize("layout", cpu_gemm.LAYOUTS)
def test_cpu_gemm_3bit_layouts_round_trip_and_put_codes_where_the_kernel_reads_them(layout):
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 8, (96, 32), generator=gen, dtype=torch.uint8)
    tiled = cpu_gemm.pack(codes, 3, layout)
    assert tiled.shape == (2, 9, 16) and torch.equal(cpu_gemm.unpack(tiled, 3, 96, layout), codes)
    # one run, one output column, by hand
    one = torch.zeros(32, 16, dtype=torch.uint8)
    one[12, 0], one[30, 0], one[31, 0] = 0b101, 0b110, 0b011
    words = [w & 0xFFFFFFFF for w in cpu_gemm.pack(one, 3, layout)[0, :, 0].tolist()]
    if layout == "tens":  # code 10b + j at bit 3j of word b; codes 30/31: low bits at the top of words 0/1, high bits in word 2
        assert words == [0b10 << 30, 0b101 << 6 | 0b11 << 30, 1 << 30]
    else:  # low two bits as 2-bit codes (0-15 in word 0, 16-31 in word 1); high bit of code 16b + 4t + j at 8t + 4b + j
        assert words == [0b01 << 24, 0b10 << 28 | 0b11 << 30, 1 << 24 | 1 << 30]
    with pytest.raises(ValueError, match="layout"):
        cpu_gemm.pack(one, 3, "thirds")


def test_pack_cols_is_pack_rows_along_the_output_dim():
    zeros = torch.randint(0, 8, (3, 70))
    packed = pack_cols(zeros, 3)
    assert packed.shape == (3, packed_length(70, 3))
    assert torch.equal(packed, pack_rows(zeros.T, 3).T) and torch.equal(unpack_cols(packed, 3, 70), zeros.to(torch.uint8))


def test_pack_rejects_codes_out_of_range_and_short_buffers():
    with pytest.raises(ValueError, match="out of range for 3 bits"):
        pack_rows(torch.tensor([[8]]), 3)
    with pytest.raises(ValueError, match="cannot hold 64 codes"):
        unpack_rows(torch.zeros(3, 2, dtype=torch.int32), 3, 64)


# -- the layer against the solver ------------------------------------------------------------------
@pytest.mark.parametrize("shape,group_size,act_order,bits", [((24, 40), 16, False, 4), ((24, 40), -1, False, 3),
                                                             ((24, 40), 16, True, 2), ((8, 64), 64, False, 8)])
def test_quant_linear_computes_with_the_solver_weights(shape, group_size, act_order, bits):
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(shape[1], shape[0])
    X = torch.randn(200, shape[1], generator=gen)
    cfg = QuantConfig(bits=bits, group_size=group_size, act_order=act_order, sym=False)
    qw = gptq_quantize(linear.weight, 2 * X.T @ X / 200, cfg)
    layer = QuantLinear.from_quantized(qw, linear.bias)
    assert torch.equal(layer.codes(), qw.codes)
    assert torch.equal(layer.zero_points(), qw.zeros.T.to(torch.uint8))
    assert torch.equal(layer.dequantize(), qw.dequantize())
    assert layer.act_order == (act_order and group_size != -1)
    # the broadcast path (contiguous groups) and the gather path agree exactly
    t = layer.packed_tensors()
    gathered = torch_ref.dequantize_t(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, shape[1])
    assert torch.equal(gathered.T, layer.dequantize())
    x = torch.randn(3, 5, shape[1], generator=gen)
    torch.testing.assert_close(layer(x), F.linear(x, qw.dequantize(), linear.bias))
    assert layer.weight.shape == shape and f"bits={bits}" in repr(layer)


def test_packed_layer_is_about_bits_over_32_of_fp32():
    qw = rtn_quantize(torch.randn(512, 1024), QuantConfig(bits=4, group_size=128))
    layer = QuantLinear.from_quantized(qw)
    packed = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert packed / (512 * 1024 * 4) < 4 / 32 + 0.04  # codes at 4/32, scales and zeros ~3% more


# -- every backend against the oracle --------------------------------------------------------------
def oracle(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """fp64 ``x @ Wᵀ + b`` from the layer's own checkpoint tensors."""
    w = layer.dequantize().double()
    b = None if layer.bias is None else layer.bias.double()
    return F.linear(x.double(), w, b)


def assert_matches_oracle(layer: QuantLinear, kernel: str, x: torch.Tensor):
    # a kernel's output is a fresh tensor, which the allocator may hand back with the last call's result in it:
    # fill it with another input's result first, so that an output element the kernel never writes is wrong
    layer.run(kernel, torch.randn_like(x) * 3)
    y = layer.run(kernel, x)
    ref = oracle(layer, x)
    assert y.shape == ref.shape and y.dtype == x.dtype
    error = ((y.double() - ref).norm() / ref.norm()).item()
    limit = type(layer).tolerance_of(kernel)  # exact kernels: 1e-5, fp32 summation order only
    assert error <= limit, f"{layer.backend}/{kernel}: relative error {error:.2e} > {limit:g}"


CASES = [  # (out, in), group size, act-order: ragged groups, per-row, shapes off every tile
    ((70, 100), 32, False), ((64, 96), -1, False), ((130, 160), 32, True), ((48, 576), 128, False),
    ((100, 576), 128, True), ((64, 256), 64, True), ((40, 608), -1, True),  # one group of 19 runs of 32
]


CPU_BACKENDS = (QuantLinear, CpuInt4QuantLinear, CpuPackedQuantLinear)


def skip_unless_available(cls: type[QuantLinear]) -> None:
    """Skip, with the reason, where ``cls``'s kernel cannot run in this installation. Called in a test's body:
    asking at collection would build the C++ kernel (a minute) while pytest collects."""
    reason = cls.unavailable()
    if reason is not None:
        pytest.skip(f"{cls.backend} is unavailable here: {reason}")


@pytest.fixture
def cpu_gemm_kernel():
    """The C++ kernel, built on first use; the test skips with the reason where it cannot be."""
    skip_unless_available(CpuPackedQuantLinear)
    return cpu_gemm


def test_collecting_builds_no_kernel(request):
    """No test asks for the C++ kernel while pytest collects (a ``skipif`` on its availability would build it,
    a minute on a fresh machine, even for a run that selects no test needing it)."""
    assert request.config.cpu_gemm_built_while_collecting is False


def test_two_checkouts_keep_their_own_kernel_builds(tmp_path):
    """torch's build files name the source's path and torch's headers: two checkouts (or environments) sharing one
    build folder name rebuilt over each other's build at every switch (seen: 40 s per test process)."""
    copy = tmp_path / "cpu_gemm.cpp"
    copy.write_bytes(cpu_gemm.SOURCE.read_bytes())
    assert cpu_gemm.build_name() == cpu_gemm.build_name(cpu_gemm.SOURCE)  # stable
    assert cpu_gemm.build_name(copy) != cpu_gemm.build_name()  # same bytes, another place
    assert cpu_gemm.build_name().startswith("lightning_gptq_cpu_gemm_")


@pytest.mark.parametrize("cls,bits", [(cls, bits) for cls in CPU_BACKENDS for bits in (2, 3, 4, 8)
                                      if bits in cls.capabilities.bits], ids=lambda v: getattr(v, "backend", v))
@pytest.mark.parametrize("shape,group_size,act_order", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_backends_equal_the_oracle(cls, bits, shape, group_size, act_order, bias):
    """Every kernel of every CPU backend, at row counts around each kernel's passes, against the fp64 oracle. Each
    backend is its own test: one whose kernel is unavailable here is reported as skipped, with the reason."""
    (out_features, in_features) = shape
    spec = LayerSpec(in_features, out_features, bits, group_size, False, act_order, bias)
    assert cls.capabilities.unsupported(spec) is None  # every case is within what the backend declares
    skip_unless_available(cls)
    gen = torch.Generator().manual_seed(bits)
    layer = random_layer(cls, spec)
    for rows in (1, 3, 5, 9, 17, 64, 512):  # around the kernels' passes of 4, 6, 8 and 12 rows and blocks of 96
        x = torch.randn(rows, in_features, generator=gen)
        for kernel in layer.kernels:
            assert_matches_oracle(layer, kernel, x)


@pytest.mark.parametrize("cls", [*CPU_BACKENDS, TritonQuantLinear], ids=lambda c: c.backend)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_layers_with_a_bias_answer_in_the_input_dtype(cls, dtype):
    """fp16/bf16 models (every GPU fit) with biases (Qwen2's q/k/v, OPT, GPT-2): each kernel's output has the input's
    dtype, whatever the kernel computes in (some return fp32, cpu-int4 bf16), and the bias is added before the one
    rounding to it. Before, an fp16 bias plus a kernel's fp32 or bf16 output came out fp32."""
    if cls is TritonQuantLinear:
        pytest.importorskip("triton", reason="triton is not installed (Linux only)")
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton runs on CPU only under TRITON_INTERPRET=1 (set by conftest.py)")
    else:
        skip_unless_available(cls)
    name = str(dtype).removeprefix("torch.")
    layer = random_layer(cls, LayerSpec(160, 72, 4, 32, False, True, True, "cpu", name))
    fp32 = random_layer(QuantLinear, LayerSpec(160, 72, 4, 32, False, True, True, "cpu", "float32"))
    # the interpreter's bf16 tl.dot is wrong (the tiles serve 2+ rows): there Triton's bf16 is checked on its GEMV
    rows = 1 if cls is TritonQuantLinear and dtype == torch.bfloat16 else 5
    x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(0)).to(dtype)
    ref = fp32(x.float()).double()
    for kernel in layer.kernels:
        y = layer.run(kernel, x)
        assert y.dtype == dtype and y.shape == (rows, 72), (kernel, y.dtype)
        error = ((y.double() - ref).norm() / ref.norm()).item()
        assert error <= 1.6e-2, (kernel, error)  # bf16 weight tiles and outputs; fp16 far below
    assert layer(x).dtype == dtype


@pytest.mark.parametrize("cls", CPU_BACKENDS, ids=lambda c: c.backend)
def test_an_fp32_layer_with_a_bias_answers_a_16_bit_input_in_its_dtype(cls):
    """Every backend answers in the input's dtype; the oracle (``torch``) alone answered fp32, its fp32 bias promoting."""
    skip_unless_available(cls)
    layer = random_layer(cls, LayerSpec(160, 72, 4, 32, False, True, True, "cpu", "float32"))
    x = torch.randn(3, 160, generator=torch.Generator().manual_seed(0))
    for kernel in layer.kernels:
        y = layer.run(kernel, x.half())
        assert y.dtype == torch.float16, (kernel, y.dtype)
        assert torch.allclose(y.float(), layer.run(kernel, x), atol=3e-2, rtol=1e-2), kernel


@pytest.mark.parametrize("cls", [QuantLinear, CpuInt4QuantLinear, CpuPackedQuantLinear])
def test_backends_take_any_leading_dims_and_strided_inputs(cls):
    """Models call layers with [batch, seq, in] activations, sometimes views that are not contiguous: every
    kernel gives the same numbers as on the same rows as one contiguous [rows, in] matrix (the torch
    backend: up to fp32 summation order)."""
    spec = LayerSpec(100, 70, 4, 32, False, True, True)
    if cls.unsupported(spec):
        pytest.skip(f"{cls.backend} is unavailable here: {cls.unsupported(spec)}")
    layer = random_layer(cls, spec)
    gen = torch.Generator().manual_seed(3)
    for x in (torch.randn(2, 3, 100, generator=gen),  # batch, seq
              torch.randn(100, 2, 5, generator=gen).permute(1, 2, 0),  # strided
              torch.randn(2, 4, 200, generator=gen)[:, 1:3, ::2],  # strided, sliced
              torch.randn(100, generator=gen)):  # one vector
        for kernel in layer.kernels:
            y = layer.run(kernel, x)
            flat = layer.run(kernel, x.reshape(-1, 100).contiguous())
            assert y.shape == (*x.shape[:-1], 70)
            # the torch backend is torch.matmul, which may sum a strided input in another order (AVX2 machines)
            tolerance = dict(rtol=1e-5, atol=1e-6) if cls is QuantLinear else dict(rtol=0, atol=0)
            torch.testing.assert_close(y.reshape(-1, 70), flat, **tolerance)


def rounded_to_int8_runs(layer: CpuPackedQuantLinear, x: torch.Tensor, digits: int) -> torch.Tensor:
    """``x`` as the ``int8``/``int8x2`` kernels see it, written plainly: in the kernel's column order,
    zero-padded, each run of 32 inputs divided by its step max|x|/127 and rounded half to even (one
    digit), plus the remainder's 1/254ths rounded (second digit); then back in the layer's order."""
    perm = layer.k_perm if layer.k_perm is not None else torch.arange(layer.in_features)
    xp = F.pad(x[:, perm], (0, layer.k_pad - layer.in_features)).view(x.shape[0], -1, 32)  # fp32, as the kernel
    amax = xp.abs().amax(-1, keepdim=True)
    f = xp * torch.where(amax > 0, 127 / amax, 0)
    value = torch.round(f).double()
    if digits == 2:
        value += torch.round((f - torch.round(f)) * 254).double() / 254
    rounded = value * (amax / 127).double()
    out = torch.empty_like(x, dtype=torch.float64)
    out[:, perm] = rounded.view(x.shape[0], -1)[:, : layer.in_features]
    return out


@pytest.mark.parametrize("kernel", ["int8", "int8x2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,group_size,act_order", CASES)
def test_int8_kernels_are_the_exact_matmul_of_the_rounded_inputs(kernel, bits, shape, group_size, act_order):
    """The ``int8`` kernels' only rounding is of the activations: with the rounding done by hand, they match
    the fp64 oracle to fp32 precision (the stated tolerance would hide a wrong code or a lost run)."""
    if cpu_gemm.unavailable():
        pytest.skip(f"the C++ kernel is unavailable here: {cpu_gemm.unavailable()}")
    out_features, in_features = shape
    layer = random_layer(CpuPackedQuantLinear, LayerSpec(in_features, out_features, bits, group_size, False, act_order, True))
    gen = torch.Generator().manual_seed(7)
    for rows in (1, 2, 3, 4, 5, 9):
        x = torch.randn(rows, in_features, generator=gen) * torch.linspace(0.01, 3, in_features)  # uneven runs
        x[0, :40] = 0  # an all-zero run
        y = layer.run(kernel, x).double()
        ref = oracle(layer, rounded_to_int8_runs(layer, x, 2 if kernel == "int8x2" else 1))
        assert ((y - ref).norm() / ref.norm()).item() < 1e-5
        assert ((y - oracle(layer, x)).norm() / ref.norm()).item() < CpuPackedQuantLinear.tolerance_of(kernel)
    if kernel == "int8x2":  # the second digit takes the rounding from about 2^-8 to 2^-15
        assert ((y - oracle(layer, x)).norm() / ref.norm()).item() < 1e-4


@pytest.mark.parametrize("kernel", ["int8", "int8x2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("out_features", [16, 112, 1000])  # one tile, an odd count on one thread, tiles on two threads
def test_int8_kernels_two_tiles_at_once_equal_one_at_a_time(cpu_gemm_kernel, kernel, bits, out_features):
    """One-row calls compute two output tiles at once (``set_tile_streams(2)``, the AVX-512 default): the same
    arithmetic per tile as one at a time, so bit-identical outputs."""
    layer = random_layer(CpuPackedQuantLinear, LayerSpec(200, out_features, bits, 64, False, True, True))
    x = torch.randn(1, 200, generator=torch.Generator().manual_seed(bits))
    ext = cpu_gemm._load()
    previous = ext.set_tile_streams(1)
    try:
        one = layer.run(kernel, x)
        ext.set_tile_streams(2)
        two = layer.run(kernel, x)
    finally:
        ext.set_tile_streams(previous)
    assert torch.equal(one, two)
    assert ((one.double() - oracle(layer, x)).norm() / oracle(layer, x).norm()).item() < CpuPackedQuantLinear.tolerance_of(kernel)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,group_size,act_order", [((70, 100), 32, False), ((40, 96), -1, False),
                                                        ((72, 80), 16, True), ((24, 576), 128, True)])
def test_triton_kernels_equal_the_oracle_in_the_interpreter(bits, shape, group_size, act_order):
    """Tiles inside one group (g128, per-row) and across groups (g16, g32), act-order removed at load,
    ragged K; one row (the GEMV) and 5/16/33 (``tl.dot`` tiles of 16 and 64 rows)."""
    pytest.importorskip("triton", reason="triton is not installed (Linux only)")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs on CPU only under TRITON_INTERPRET=1 (set by conftest.py)")
    out_features, in_features = shape
    layer = random_layer(TritonQuantLinear, LayerSpec(in_features, out_features, bits, group_size, False, act_order, True))
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 5, 16, 33):
        x = torch.randn(rows, in_features, generator=gen)
        for kernel in layer.kernels:
            assert_matches_oracle(layer, kernel, x)
    assert TritonQuantLinear.unsupported(layer.spec()) == "cuda only"  # never an `auto` candidate on CPU
    oracle = random_layer(QuantLinear, layer.spec())
    state, expected = layer.state_dict(), oracle.state_dict()  # one copy in the kernel layout, the checkpoint's back
    assert layer.qweight is None and state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


@pytest.mark.parametrize("cls,bits", [(CpuInt4QuantLinear, 2), (CpuInt4QuantLinear, 3), (CpuInt4QuantLinear, 4),
                                      (CpuPackedQuantLinear, 3), (CpuPackedQuantLinear, 4)])
def test_converting_layers_keep_one_copy_and_save_the_checkpoint_layout(cls, bits):
    spec = LayerSpec(576, 192, bits, 128, False, True, True)
    if cls.unsupported(spec):
        pytest.skip(f"{cls.backend} is unavailable here: {cls.unsupported(spec)}")
    reference = random_layer(QuantLinear, spec)
    layer = cls(576, 192, bits=bits, group_size=128, sym=False, bias=True)
    layer.load_state_dict(reference.state_dict())
    assert layer.qweight is None and "qweight" not in dict(layer.named_buffers())
    state, expected = layer.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)  # bit-identical round trip
    assert torch.equal(layer.codes(), reference.codes())
    in_memory = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert in_memory < 0.2 * 576 * 192 * 4  # one 4-bit copy of the codes + scales, not two


def test_cpu_backends_decline_what_they_cannot_hold():
    assert CpuInt4QuantLinear.unsupported(LayerSpec(64, 64, 8, 32, False, False, False)) == "bits must be one of (2, 3, 4)"
    assert CpuPackedQuantLinear.unsupported(LayerSpec(64, 64, 5, 32, False, False, False)) == "bits must be one of (2, 3, 4, 8)"
    for cls in (CpuInt4QuantLinear, CpuPackedQuantLinear):
        assert "multiple of 32" in cls.unsupported(LayerSpec(64, 64, 4, 16, False, False, False))
        assert cls.unsupported(LayerSpec(64, 64, 4, 32, False, False, False, device="cuda")) == "cpu only"


# -- auto ------------------------------------------------------------------------------------------
def test_auto_times_the_candidates_and_dispatches_by_rows():
    spec = LayerSpec(256, 128, 4, 64, False, False, True)
    choice = choose(spec)
    assert choose(spec) is choice  # measured once per process
    expected = {"torch"} | ({"cpu-int4"} if cpu_int4.is_available() else set()) | \
        (set() if cpu_gemm.unavailable() else {"cpu-packed"})
    assert {k.split("/")[0] for k in choice.times} == expected
    # kernels that round more than AUTO_TOLERANCE are neither timed nor chosen (cpu-packed's one-digit int8)
    timed = {k for k in choice.times}
    assert all(quant_linear_class(k.split("/")[0]).tolerance_of(k.split("/")[1]) <= AUTO_TOLERANCE for k in timed)
    if not cpu_gemm.unavailable():
        assert "cpu-packed/int8x2" in timed and "cpu-packed/int8" not in timed
    assert set(choice.dense) == {r for r, _ in choice.dispatch}
    for rows, kernel in choice.dispatch:  # each row count takes the chosen backend's fastest kernel
        mine = {k.split("/")[1]: t[rows] for k, t in choice.times.items() if k.startswith(choice.backend + "/") and rows in t}
        assert mine[kernel] == min(mine.values())
        exact = dict(choice.exact_dispatch)[rows]
        assert mine[exact] == min(t for k, t in mine.items() if k in quant_linear_class(choice.backend).exact)
    layer = build(spec)
    assert layer.backend == choice.backend and layer.dispatch == choice.dispatch
    assert choice.to_dict()["backend"] == choice.backend and spec.describe() in choice.describe()


@pytest.fixture
def timing_cache(monkeypatch, tmp_path):
    """auto's on-disk timing cache switched on (conftest switches it off), in a fresh folder, with this
    process's memory of earlier choices cleared; yields a function that forgets them again ("a new process")."""
    from lightning_gptq.nn import autotune_cache

    monkeypatch.setenv("LIGHTNING_GPTQ_CACHE", str(tmp_path))
    monkeypatch.setenv(autotune_cache.ENV, "1")
    monkeypatch.setattr(selection, "_CACHE", {})
    monkeypatch.setattr(autotune_cache, "_files", {})
    monkeypatch.setattr(autotune_cache, "_warned", set())
    # the cores count as quiet while timing (other work on them decides what is stored: the test below)
    monkeypatch.setattr(selection.BusyElsewhere, "share", lambda self: 0.0)

    def new_process():
        selection._CACHE.clear()
        autotune_cache._files.clear()

    yield new_process


def _counting_measure(monkeypatch):
    """Replace ``measure`` by the real one, counting calls."""
    calls = []
    real = selection.measure

    def counted(spec, classes, rows=selection.ROWS):
        calls.append(spec)
        return real(spec, classes, rows=(1, 4))
    monkeypatch.setattr(selection, "measure", counted)
    return calls


def test_auto_reuses_the_timings_stored_on_this_machine(timing_cache, monkeypatch):
    from lightning_gptq.nn import autotune_cache

    calls = _counting_measure(monkeypatch)
    spec = LayerSpec(96, 64, 4, 32, False, False, True)
    first = choose(spec)
    assert len(calls) == 1 and not first.cached and first.to_dict()["from_cache"] is False
    file = autotune_cache.path("cpu")
    assert file.exists() and len(json.loads(file.read_text())) == 1
    assert cpu_gemm.SOURCE.resolve() in autotune_cache.source_files()  # a changed kernel is another fingerprint
    timing_cache()  # a later process on the same machine: nothing is timed, the same choice comes back
    again = choose(spec)
    assert len(calls) == 1 and again.cached and "autotune cache" in again.describe()
    assert (again.backend, again.dispatch, again.exact_dispatch, again.times, again.dense) == \
        (first.backend, first.dispatch, first.exact_dispatch, first.times, first.dense)
    layer = build(spec)
    assert layer.dispatch == first.dispatch
    # another layer spec, or the same spec with another thread count (another fingerprint), is timed
    choose(LayerSpec(96, 64, 3, 32, False, False, True))
    assert len(calls) == 2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        timing_cache()
        assert not choose(spec).cached and len(calls) == 3
        assert autotune_cache.path("cpu") != file
    finally:
        torch.set_num_threads(threads)
    # switched off: timed every process, nothing written
    monkeypatch.setenv(autotune_cache.ENV, "0")
    timing_cache()
    assert not choose(spec).cached and len(calls) == 4


def test_auto_does_not_store_timings_taken_while_other_work_used_the_cores(timing_cache, monkeypatch, caplog):
    from lightning_gptq.nn import autotune_cache

    calls = _counting_measure(monkeypatch)
    monkeypatch.setattr(selection.BusyElsewhere, "share", lambda self: 0.9)
    spec = LayerSpec(96, 64, 4, 32, False, False, True)
    with caplog.at_level(logging.WARNING, logger="lightning_gptq"):
        first = choose(spec)
    assert "90% of the CPUs busy" in caplog.text and not autotune_cache.path("cpu").exists()
    assert choose(spec) is first and len(calls) == 1  # this process keeps its choice
    timing_cache()
    monkeypatch.setattr(selection.BusyElsewhere, "share", lambda self: 0.1)  # a quiet process later: stored
    choose(spec)
    assert len(calls) == 2 and len(json.loads(autotune_cache.path("cpu").read_text())) == 1


def test_busy_elsewhere_reads_the_cpus_ticks():
    from lightning_gptq.nn.timing import BusyElsewhere

    busy = BusyElsewhere()
    share = busy.share()
    assert share is None or 0.0 <= share  # None only where /proc is missing
    if busy.start is not None:
        assert len(busy.start) == 2 and busy.start[1] > 0  # this process has run


def test_auto_times_again_when_the_stored_timing_is_unreadable_or_does_not_fit(timing_cache, monkeypatch, caplog):
    from lightning_gptq.nn import autotune_cache

    calls = _counting_measure(monkeypatch)
    spec = LayerSpec(96, 64, 4, 32, False, False, False)
    choose(spec)
    file = autotune_cache.path("cpu")
    file.write_text('{"truncated": ')  # e.g. a disk that filled up
    timing_cache()
    with caplog.at_level("WARNING", logger="lightning_gptq"):
        assert not choose(spec).cached
    assert len(calls) == 2 and "unreadable timing cache" in caplog.text
    (key, record), = json.loads(file.read_text()).items()  # rewritten whole
    record["dispatch"] = [[1, "no-such-kernel"]]  # e.g. a kernel since renamed
    file.write_text(json.dumps({key: record}))
    timing_cache()
    caplog.clear()
    with caplog.at_level("WARNING", logger="lightning_gptq"):
        assert not choose(spec).cached
    assert len(calls) == 3 and "cannot be used" in caplog.text and "no-such-kernel" not in file.read_text()
    # a cache folder that cannot be made (here: under a file) leaves timing per process, with one warning
    blocker = file.parent / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LIGHTNING_GPTQ_CACHE", str(blocker / "cache"))
    timing_cache()
    caplog.clear()
    with caplog.at_level("WARNING", logger="lightning_gptq"):
        assert not choose(spec).cached and not choose(LayerSpec(96, 64, 2, 32, False, False, False)).cached
    assert len(calls) == 5 and caplog.text.count("no timing cache") == 1


def test_auto_times_few_rows_with_the_weights_coming_from_memory(monkeypatch):
    """Up to COLD_ROWS rows each timed call takes the next of enough copies of the layer, and of the dense weight,
    to span twice the last-level cache (as in a model's forward pass, where every other layer was read since);
    more rows are timed on one layer."""
    seen: dict[int, set[int]] = {}

    class Recording(QuantLinear):
        kernels, exact = ("dequant",), ("dequant",)

        def run(self, kernel, x):
            seen.setdefault(x.shape[0], set()).add(id(self))
            return super().run(kernel, x)

    dense_seen: dict[int, set[int]] = {}

    class RecordingDense:
        @staticmethod
        def linear(x, w):
            dense_seen.setdefault(x.shape[0], set()).add(id(w))
            return F.linear(x, w)

    assert timing.cache_bytes() >= 2**20  # the machine's (sysfs), or 32 MiB where unreadable
    spec = LayerSpec(256, 64, 4, 32, False, False, False)
    layer_bytes = timing._layer_bytes(random_layer(Recording, spec))
    monkeypatch.setattr(timing, "cache_bytes", lambda: 4 * layer_bytes)  # 8 copies span twice the "cache"
    monkeypatch.setattr(timing, "F", RecordingDense)
    # each timing makes 8 calls: the real harness makes as many as fit its time budget, which on a busy machine
    # can be fewer than there are copies (this test then saw 6 of the 8)
    monkeypatch.setattr(timing, "time_call", lambda fn, *args, **kwargs: [fn() for _ in range(8)] and 1e-3)
    assert timing.COLD_ROWS >= 16
    measure(spec, {"rec": Recording}, rows=(1, 16, 64))
    assert len(seen[1]) == len(seen[16]) == 8 and seen[1] == seen[16] and len(seen[64]) == 1
    dense_bytes = 64 * 256 * 4  # dense copies: ceil(2 * cache / dense bytes)
    assert len(dense_seen[1]) == -(-8 * layer_bytes // dense_bytes) and len(dense_seen[64]) == 1


def test_auto_stops_timing_a_hopeless_kernel_as_rows_grow(monkeypatch):
    """A kernel far slower than dense and falling further behind is not timed at larger row counts (on AVX2
    CPUs a bf16 matmul of 1,024 rows of a 7B layer would take minutes to time); the others still are."""
    assert worth_timing([0.05])  # one point: no trend yet
    assert not worth_timing([0.08, 0.05])  # below HOPELESS and falling
    assert worth_timing([0.02, 0.05])  # below HOPELESS but catching up (dense paths at many rows)
    assert worth_timing([0.9, 0.5])  # falling but not hopeless
    assert worth_timing([0.29, 0.01])  # one bad timing (other work on the cores) after a good one: keep it

    cost: dict[str, float] = {}  # seconds each call "takes": a model of the times, so that the test cannot
    # depend on what else runs on the machine

    class Slow(QuantLinear):
        kernels, exact = ("dequant", "slow"), ("dequant",)
        calls: dict[int, int] = {}

        def run(self, kernel, x):
            rows = x.shape[0]
            if kernel == "slow":
                Slow.calls[rows] = Slow.calls.get(rows, 0) + 1
                cost["s"] = 0.005 * rows ** 2  # 5 ms at 1 row, 80 ms at 4: far behind dense, and falling
            else:
                cost["s"] = 1e-4 * rows
            return super().run(kernel, x)

    class ModelledDense:
        @staticmethod
        def linear(x, w):
            cost["s"] = 2e-4
            return F.linear(x, w)

    def modelled_time(fn, *args, **kwargs):
        fn()
        return cost["s"]

    monkeypatch.setattr(timing, "F", ModelledDense)
    monkeypatch.setattr(timing, "time_call", modelled_time)
    spec = LayerSpec(64, 32, 4, 32, False, False, False)
    choice = measure(spec, {"slow": Slow}, rows=(1, 4, 16, 64))
    assert set(Slow.calls) == {1, 4}  # given up on after two row counts
    assert set(choice.times["slow/slow"]) == {1, 4} and set(choice.times["slow/dequant"]) == {1, 4, 16, 64}
    assert choice.dispatch == ((1, "dequant"), (4, "dequant"), (16, "dequant"), (64, "dequant"))


def test_dispatch_picks_the_nearest_measured_row_count_on_a_log_scale():
    layer = QuantLinear(8, 8, bits=4, group_size=-1, sym=True, bias=False)
    layer.kernels, layer.exact = ("a", "b", "c"), ("a", "c")
    layer.set_dispatch([(1, "a"), (16, "b"), (256, "c")], [(1, "a"), (64, "c")])
    assert [layer.kernel_for(m) for m in (1, 4, 5, 16, 63, 65, 4096)] == ["a", "a", "b", "b", "b", "c", "c"]
    with exact_kernels():  # calibration: only kernels that round nothing beyond fp32
        assert [layer.kernel_for(m) for m in (1, 7, 9, 4096)] == ["a", "a", "c", "c"]
    assert layer.kernel_for(16) == "b"
    with pytest.raises(ValueError, match="dispatch names"):
        layer.set_dispatch([(1, "nope")])
    with pytest.raises(ValueError, match="dispatch names"):
        layer.set_dispatch([(1, "a")], [(1, "b")])  # b rounds: not allowed for calibration


def test_exact_kernels_in_one_thread_leaves_another_threads_dispatch_alone():
    """``exact_kernels()`` is per thread: while one thread calibrates inside it, another running the same layer
    keeps its own dispatch; the block nests, and ends where it was entered."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from lightning_gptq.nn import quant_linear

    layer = QuantLinear(8, 8, bits=4, group_size=-1, sym=True, bias=False)
    layer.kernels, layer.exact = ("a", "b"), ("a",)
    layer.set_dispatch([(1, "b")], [(1, "a")])
    inside, checked = threading.Event(), threading.Event()

    def calibrating():
        with exact_kernels():
            with exact_kernels():
                assert quant_linear.exact_depth() == 2
            inside.set()
            assert checked.wait(30)
            return layer.kernel_for(4), quant_linear.exact_depth()

    with ThreadPoolExecutor(1) as pool:
        calibration = pool.submit(calibrating)
        assert inside.wait(30)
        seen_here = layer.kernel_for(4), quant_linear.exact_depth()  # while the other thread is inside
        checked.set()
        assert calibration.result(30) == ("a", 1)
        assert pool.submit(lambda: (layer.kernel_for(4), quant_linear.exact_depth())).result(30) == ("b", 0)
    assert seen_here == ("b", 0)
    with exact_kernels():  # and the other way round: a thread started while this one is inside is not
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(lambda: layer.kernel_for(4)).result(30) == "b"
        assert layer.kernel_for(4) == "a"


def test_a_quantized_model_runs_from_two_threads_at_once(cpu_gemm_kernel):
    """Two threads run one model of packed CPU layers at once, one of them inside ``exact_kernels()``, on different
    inputs: every output equals the same call run alone. The layers take the dense kernels (their dense weight
    goes into a reusable buffer, one per thread) and rounding ones outside ``exact_kernels()``, so a shared
    buffer or a shared ``exact_kernels()`` flag would show as a wrong output."""
    import contextlib
    from concurrent.futures import ThreadPoolExecutor

    model = nn.Sequential(*[random_layer(CpuPackedQuantLinear, LayerSpec(i, o, 4, 64, False, act_order, True), seed=s)
                            for s, (i, o, act_order) in enumerate([(256, 640, True), (640, 192, False), (192, 256, True)])])
    for layer in model:  # outside exact_kernels(), up to 45 rows: int8 and bf16, which differ from the exact ones by ~1e-3
        layer.set_dispatch([(1, "int8"), (16, "dense-bf16"), (128, "dense-fp32")], [(1, "gemm"), (16, "dense-fp32")])
    gen = torch.Generator().manual_seed(11)
    inputs = [torch.randn(rows, 256, generator=gen) for rows in (1, 3, 16, 40, 96, 200)]

    @torch.no_grad()
    def forward(x, exact):
        with exact_kernels() if exact else contextlib.nullcontext():
            return model(x)

    alone = {(i, exact): forward(x, exact) for i, x in enumerate(inputs) for exact in (False, True)}
    for i, x in enumerate(inputs):
        differ = ((alone[i, False] - alone[i, True]).norm() / alone[i, True].norm()).item()
        assert differ > 1e-4 if x.shape[0] < 45 else differ == 0, (x.shape[0], differ)
    jobs = [(i, exact) for _ in range(3) for i in range(len(inputs)) for exact in (False, True)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda job: forward(inputs[job[0]], job[1]), jobs))
    for job, y in zip(jobs, results):  # the same kernels on the same rows: equal up to how a library matmul may
        # split its sums when two threads call it at once (a shared buffer or flag is off by 1e-3 or far more)
        error = ((y - alone[job]).norm() / alone[job].norm()).item()
        assert error <= 1e-6, (job, error)


def test_make_quant_linear_auto_then_switch_backends():
    qw = rtn_quantize(torch.randn(64, 128), QuantConfig(bits=4, group_size=32, sym=False))
    model = nn.Sequential(nn.Linear(128, 64))
    model[0] = make_quant_linear(model[0], qw, backend="torch")
    x = torch.randn(2, 128)
    before = model(x)
    chosen = to_backend(model, "auto")
    assert chosen == {"0": model[0].backend}
    assert ((model(x) - before).norm() / before.norm()).item() <= type(model[0]).tolerance
    assert torch.equal(model[0].codes(), qw.codes)


def test_backend_errors_are_clear():
    with pytest.raises(ValueError, match="unknown quantized-linear backend 'nope'"):
        quant_linear_class("nope")
    with pytest.raises(ValueError, match=r"backend 'cpu-int4' cannot hold a .* bits must be one of \(2, 3, 4\)"):
        choose(LayerSpec(64, 64, 8, 32, False, False, False), backend="cpu-int4")


def test_backend_registry(monkeypatch):
    # The registry is process-wide and `auto` times every registered backend: a backend left registered here
    # (it doubles its output) was an `auto` candidate in every later test, and won now and then on timing noise,
    # so later fits' codes changed (tests/test_lightning.py after this file). Register into a copy, restored after.
    from lightning_gptq.nn import quant_linear

    monkeypatch.setattr(quant_linear, "_BACKENDS", dict(quant_linear._BACKENDS))
    monkeypatch.setattr(selection, "_CACHE", dict(selection._CACHE))

    @register_quant_linear("test-backend")
    class Doubling(QuantLinear):
        def run(self, kernel, x):
            return 2 * super().run(kernel, x)

    qw = rtn_quantize(torch.randn(4, 8), QuantConfig(bits=8, group_size=-1))
    layer = make_quant_linear(nn.Linear(8, 4, bias=False), qw, backend="test-backend")
    assert isinstance(layer, Doubling) and layer.backend == "test-backend" and layer.bias is None
    torch.testing.assert_close(layer(torch.ones(1, 8)), 2 * F.linear(torch.ones(1, 8), qw.dequantize()))


# -- the LM head's decode GEMV ----------------------------------------------------------------------
def test_dense_gemv_equals_f_linear_for_few_rows_and_odd_shapes(cpu_gemm_kernel):
    gen = torch.Generator().manual_seed(5)
    for n, k in ((49, 576), (300, 37), (1024, 1000), (7, 16)):  # K off 16, N off every chunk
        w = torch.randn(n, k, generator=gen)
        for x in (torch.randn(k, generator=gen), torch.randn(1, 1, k, generator=gen), torch.randn(3, k, generator=gen),
                  torch.randn(4, 2 * k, generator=gen)[:, ::2]):  # strided
            y, ref = cpu_gemm.dense_gemv(x, w), F.linear(x.double(), w.double())
            assert y.shape == ref.shape and y.dtype == torch.float32
            assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6  # fp32 summation order only
    with pytest.raises(RuntimeError, match="K"):
        cpu_gemm.dense_gemv(torch.randn(1, 5), torch.randn(3, 4))


def test_speed_up_head_keeps_the_weight_tie_and_state_and_is_decided_by_timing(monkeypatch, cpu_gemm_kernel):
    from lightning_gptq.nn import GemvHead, head as head_module, speed_up_head

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(300, 64)
            self.lm_head = nn.Linear(64, 300, bias=False)
            self.lm_head.weight = self.embed.weight  # tied, as SmolLM2's

        def get_output_embeddings(self):
            return self.lm_head

    # the decision follows the timing: ours "slower" -> unchanged; ours "faster" -> switched
    speeds = iter([1.0, 1.0, 1.0, 0.5, 0.5, 0.5])  # 3 timings of ours, then 3 of F.linear
    monkeypatch.setattr("lightning_gptq.nn.timing.time_call", lambda fn, **kw: (fn(), next(speeds))[1])
    model = TinyLM()
    assert "left on F.linear" in speed_up_head(model) and type(model.lm_head) is nn.Linear
    speeds = iter([0.5, 0.5, 0.5, 1.0, 1.0, 1.0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert "use our GEMV" in speed_up_head(model) and type(model.lm_head) is GemvHead
    assert model.lm_head.weight is model.embed.weight  # still tied
    assert model.state_dict().keys() == before.keys() and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(x), F.linear(x, model.embed.weight), rtol=1e-5, atol=1e-5)
        many = torch.randn(2, 9, 64)  # more rows than max_rows: F.linear, bit for bit
        assert torch.equal(model.lm_head(many), F.linear(many, model.embed.weight))
    assert head_module.MARGIN > 1
