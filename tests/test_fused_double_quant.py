"""quantize_nf4's two-launch double quantization (``_C_cuda.quantize_nf4_double``): the block pass,
then one kernel that replays torch.mean's CUDA reduction order for the offset and runs the nested
pass.

CPU: the route's choice and its once-per-size check against torch.mean, with a stand-in extension.
GPU (``-m gpu``): the replay's bits against torch.mean over many sizes (and through the barrier's
timeout path), the two-launch route against the three-kernel one field by field, fresh tables,
CUDA-graph capture.  bitsandbytes equality of the route is test_gpu_nf4's (its >= 2048-block
shapes take it)."""

import os
import types

import pytest
import torch

import lora_kernels as lk
from lora_kernels import library
from lora_kernels.codes import dynamic_code, nf4_code, shared_table


@pytest.fixture
def fresh_orders(monkeypatch):
    monkeypatch.setattr(library, "_mean_replay_orders", {})
    return library._mean_replay_orders


def _stand_in(wrong_for: set):
    """An extension whose torch_order_mean is torch's mean for the orders not in ``wrong_for``."""
    calls = []

    def torch_order_mean(x, shfl_up, wait_ns=-1):
        calls.append(shfl_up)
        m = x.mean()
        return m * 1.0000001 + 1e-3 if shfl_up in wrong_for else m

    return types.SimpleNamespace(torch_order_mean=torch_order_mean), calls


@pytest.mark.parametrize("wrong_for, expected", [(set(), False), ({False}, True), ({False, True}, None)],
                         ids=["first-order", "second-order", "neither"])
def test_mean_replay_order_is_checked_once_per_size(fresh_orders, wrong_for, expected):
    ext, calls = _stand_in(wrong_for)
    cpu = torch.device("cpu")
    assert library.mean_replay_order(ext, cpu, 4099) is expected
    n_first = len(calls)
    assert n_first == 3 * (1 if expected is False else 2)
    assert library.mean_replay_order(ext, cpu, 4099) is expected
    assert len(calls) == n_first                      # cached: no second check for the same size
    assert fresh_orders[(cpu, 4099)] is expected
    library.mean_replay_order(ext, cpu, 4100)
    assert len(calls) == 2 * n_first                  # another size is checked again


def test_mean_replay_order_during_capture_answers_none_and_stays_unchecked(fresh_orders, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    ext, calls = _stand_in(set())
    assert library.mean_replay_order(ext, "cuda", 5000) is None
    assert calls == [] and fresh_orders == {}


def test_fused_route_taken_only_where_it_may(monkeypatch):
    ext = types.SimpleNamespace(quantize_nf4_double=object())
    monkeypatch.setattr(library, "mean_replay_order", lambda e, d, nb: True)
    cpu = torch.empty(64 * 4096)
    assert library._fused_double_quant_order(ext, cpu, 64) is None            # not a CUDA tensor
    fake_cuda = types.SimpleNamespace(is_cuda=True, numel=lambda: 64 * 2048, device="cuda:0")
    assert library._fused_double_quant_order(ext, fake_cuda, 64) is True     # 2048 blocks: taken
    short = types.SimpleNamespace(is_cuda=True, numel=lambda: 64 * 2047 + 1, device="cuda:0")
    assert library._fused_double_quant_order(ext, short, 64) is True         # ceil: 2048 blocks
    shorter = types.SimpleNamespace(is_cuda=True, numel=lambda: 64 * 2047, device="cuda:0")
    assert library._fused_double_quant_order(ext, shorter, 64) is None       # 2047 blocks
    assert library._fused_double_quant_order(types.SimpleNamespace(), fake_cuda, 64) is None  # old build
    monkeypatch.setattr(library, "FUSED_DOUBLE_QUANT", False)
    assert library._fused_double_quant_order(ext, fake_cuda, 64) is None
    monkeypatch.setattr(library, "FUSED_DOUBLE_QUANT", True)
    monkeypatch.setattr(library, "mean_replay_order", lambda e, d, nb: None)
    assert library._fused_double_quant_order(ext, fake_cuda, 64) is None     # the replay did not match


def test_shared_tables_are_the_cache_and_the_public_ones_are_fresh():
    a, b = shared_table("nf4", "cpu"), shared_table("nf4", "cpu")
    assert a is b and torch.equal(a, nf4_code("cpu")) and nf4_code("cpu").data_ptr() != a.data_ptr()
    d = shared_table("dynamic", "cpu")
    assert d.numel() == 256 and torch.equal(d, dynamic_code("cpu")) and dynamic_code("cpu").data_ptr() != d.data_ptr()


# ------------------------------------------------------------------------------------------ GPU
def _ext():
    # (without a GPU, conftest skips these gpu-marked tests before they run)
    ext = lk._ext.cuda_ext()
    if ext is None or not hasattr(ext, "quantize_nf4_double"):
        pytest.skip("the CUDA extension is not built here (test_gpu_nf4.test_gpu_backends_present fails "
                    "for that), or was built before quantize_nf4_double")
    return ext


def _bits(t):
    return t.reshape(1).view(torch.int32).item()


REPLAY_SIZES = [2048, 2049, 2050, 2051, 3001, 7680, 7681, 8191, 65536, 131071, 131072, 131073, 262144, 262147,
                1_000_003, 3_670_016]


# $LORA_KERNELS_DQ_VARIANT (csrc/cuda/nf4_cuda.cu launch_absmax_mean_nested): bit 1 the v2 kernel,
# bit 0 a programmatic dependent launch of it, bit 2 one of the block pass; every variant must give
# the same bits.
DQ_VARIANTS = ["0", "1", "2", "3", "7"]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["0", "2"], ids=["v1", "v2"])
def test_replay_reproduces_torch_mean_bits(variant, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_DQ_VARIANT", variant)
    ext = _ext()
    dev = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=dev).manual_seed(int.from_bytes(os.urandom(4), "little"))
    other_order_differs = False
    for nb in REPLAY_SIZES:
        order = library.mean_replay_order(ext, dev, nb)
        assert order is not None, f"the replay matches torch.mean for neither warp order at nb={nb} (torch {torch.__version__})"
        for kind in ("absmax-like", "wide"):
            if kind == "wide":
                x = torch.rand(nb, device=dev, generator=gen) * torch.exp2(
                    torch.randint(-30, 20, (nb,), device=dev, generator=gen).float())
            else:
                x = torch.randn(nb, 64, device=dev, generator=gen).abs().amax(1) * float(torch.rand(1) * 3 + 0.01)
            ref = _bits(x.mean())
            assert _bits(ext.torch_order_mean(x, order)) == ref, (nb, kind)
            assert _bits(ext.torch_order_mean(x, order, 0)) == ref, (nb, kind, "timeout path")
            other_order_differs |= _bits(ext.torch_order_mean(x, not order)) != ref
    assert other_order_differs, "the two warp orders never differ: the check could not tell them apart"


def _poison_allocator(*like):
    # Blocks the caching allocator will hand out next hold 0xFF bytes, so an output element the
    # kernels never write cannot pass by holding an earlier result.
    bufs = [torch.full((t.numel() * t.element_size() + 512,), 255, dtype=torch.uint8, device=t.device) for t in like]
    del bufs


FUSED_CASES = [((4096, 4096), 64), ((1000, 1001), 64), ((11, 64 * 1023 + 7), 32), ((333, 4096), 128),
               ((4096, 4096), 4096), ((2048, 4097), 256)]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", DQ_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_two_launch_route_equals_three_kernel_route(dtype, variant, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_DQ_VARIANT", variant)
    ext = _ext()
    gen = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    # the random cases, then a constant weight (every absmax equals the offset: nested blocks with
    # max |absmax - offset| == 0, the index-0 path) and one with a few large outliers
    cases = [(shape, bs, None) for shape, bs in FUSED_CASES] + [((4096, 4096), 64, "constant"),
                                                               ((2049, 1000), 64, "outliers")]
    for shape, bs, kind in cases:
        w = torch.randn(shape, device="cuda", generator=gen) * float(torch.rand(1) * 4 + 0.01)
        if kind == "constant":
            w = torch.full(shape, 0.75, device="cuda")
        elif kind == "outliers":
            w.view(-1)[torch.randint(0, w.numel(), (40,), device="cuda", generator=gen)] = 300.0
        w = w.to(dtype)
        assert library._fused_double_quant_order(ext, w.reshape(-1), bs) is not None, (shape, bs)
        monkeypatch.setattr(library, "FUSED_DOUBLE_QUANT", False)
        ref = lk.quantize_nf4(w, bs, backend="cuda")
        monkeypatch.setattr(library, "FUSED_DOUBLE_QUANT", True)
        _poison_allocator(ref.packed, ref.absmax, ref.nested_absmax, ref.offset, ref.code, ref.nested_code)
        ours = lk.quantize_nf4(w, bs, backend="cuda")
        ctx = f"{shape} bs={bs} {kind} {dtype} variant {variant}"
        assert torch.equal(ours.packed, ref.packed), ctx
        assert ours.absmax.dtype == torch.uint8 and torch.equal(ours.absmax, ref.absmax), ctx
        assert torch.equal(ours.nested_absmax, ref.nested_absmax), ctx
        assert ours.offset.shape == ref.offset.shape == () and _bits(ours.offset) == _bits(ref.offset), ctx
        assert torch.equal(ours.code, nf4_code("cuda")) and torch.equal(ours.nested_code, dynamic_code("cuda")), ctx
        for t, name in ((ours.code, "nf4"), (ours.nested_code, "dynamic")):
            assert t.data_ptr() != shared_table(name, t.device).data_ptr(), f"{ctx}: {name} table not fresh"
        assert torch.equal(lk.dequantize_nf4(ours), lk.dequantize_nf4(ref)), ctx


@pytest.mark.gpu
@pytest.mark.parametrize("variant", DQ_VARIANTS)
def test_two_launch_route_under_cuda_graph_capture(variant, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_DQ_VARIANT", variant)
    ext = _ext()
    w = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16)     # 32768 blocks
    expected = lk.quantize_nf4(w, check_finite=False)                   # checks the size's order first
    assert library._fused_double_quant_order(ext, w.reshape(-1), 64) is not None
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g):
            out = lk.quantize_nf4(w, check_finite=False)
    torch.cuda.current_stream().wait_stream(s)
    w.copy_(torch.randn_like(w) * 3)
    g.replay()
    torch.cuda.synchronize()
    fresh = lk.quantize_nf4(w, check_finite=False)
    assert not torch.equal(fresh.packed, expected.packed)
    for a, b in ((out.packed, fresh.packed), (out.absmax, fresh.absmax), (out.nested_absmax, fresh.nested_absmax)):
        assert torch.equal(a, b)
    assert _bits(out.offset) == _bits(fresh.offset)
