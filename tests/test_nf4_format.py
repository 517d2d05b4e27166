"""The storage format against bitsandbytes (its CPU backend here; its CUDA backend in test_gpu_nf4.py).

Every CPU backend of ours is checked: the plain reference, the C++ extension when built, and the
Triton kernels under the interpreter (fp16/fp32 only: the interpreter gets bf16 wrong).
"""

import io
import math

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference
from lora_kernels.codes import VALID_BLOCKSIZES

from .conftest import bnb_cpu_available, randn

pytestmark = pytest.mark.skipif(not bnb_cpu_available(), reason="bitsandbytes is not installed")

CPU_BACKENDS = lk.available_backends("cpu")
SHAPES = [(1, 1), (1, 3), (7, 9), (33, 64), (64, 129), (100, 130), (5, 4097)]


def _dtypes_for(backend):
    # the Triton interpreter mishandles bf16 arithmetic; bf16 Triton runs in the GPU suite
    return [torch.float32, torch.float16] if backend == "triton" else [torch.float32, torch.bfloat16, torch.float16]


def _cases():
    for backend in CPU_BACKENDS:
        for dtype in _dtypes_for(backend):
            yield pytest.param(backend, dtype, id=f"{backend}-{str(dtype)[6:]}")


def _bnb_quantize(w, blocksize, double_quant):
    import bitsandbytes.functional as F

    return F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def test_backends_listed():
    assert "reference" in CPU_BACKENDS


@pytest.mark.usefixtures("no_dynamo")
@pytest.mark.parametrize("backend,dtype", list(_cases()))
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
def test_quantize_matches_bitsandbytes(backend, dtype, double_quant, rng):
    import bitsandbytes.functional as F

    shapes = SHAPES if backend != "triton" else SHAPES[:5]
    for shape in shapes:
        for blocksize in (64, 128, 32, 4096):
            w = randn(shape, dtype, rng, scale=float(torch.rand(1, generator=rng)) * 10 + 1e-3)
            ours = lk.quantize_nf4(w, blocksize, double_quant, backend=backend)
            qb, sb = _bnb_quantize(w, blocksize, double_quant)
            ctx = f"{shape} bs={blocksize}"
            assert torch.equal(ours.packed, qb), ctx
            if double_quant:
                assert torch.equal(ours.offset, sb.offset), ctx
                assert torch.equal(ours.nested_absmax, sb.state2.absmax), ctx
                assert torch.equal(ours.nested_code, sb.state2.code), ctx
                # bitsandbytes' CPU backend finds the 8-bit code through a lookup table that can
                # pick a neighbouring code: one code where the dynamic map is sparse (spacing 0.014
                # near +-1), several where it is dense (near 0, codes 1e-6 apart); over 9000 random
                # cases the decoded values never differed by more than 0.0141 (one sparse step).
                # Ours is the exact nearest code (what its CUDA kernel computes).
                exact = reference.quantize_reference(w, blocksize, True)
                assert torch.equal(ours.absmax, exact["absmax"]), ctx
                differ = ours.absmax != sb.absmax  # up to ~12% of the values on small tensors
                dyn = ours.nested_code
                gap = (dyn[ours.absmax[differ].long()] - dyn[sb.absmax[differ].long()]).abs()
                assert gap.numel() == 0 or float(gap.max()) <= 0.015, (ctx, gap.max())
            else:
                assert torch.equal(ours.absmax, sb.absmax), ctx
            # dequantized values: ours of ours == bitsandbytes' of ours, and ours of theirs == theirs
            d_ours = lk.dequantize_nf4(ours, backend=backend)
            assert d_ours.shape == w.shape and d_ours.dtype == dtype
            assert torch.equal(d_ours, F.dequantize_4bit(ours.packed, ours.to_bnb_quant_state())), ctx
            theirs = lk.NF4Weight.from_bnb(qb, sb)
            assert torch.equal(lk.dequantize_nf4(theirs, backend=backend), F.dequantize_4bit(qb, sb)), ctx


@pytest.mark.parametrize("backend,dtype", list(_cases()))
def test_dequantize_output_dtypes_and_out(backend, dtype, rng):
    w = randn((37, 96), torch.float32, rng)
    q = lk.quantize_nf4(w, 64, True, backend="reference")
    ref = reference.dequantize_reference(q.packed, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code,
                                         q.numel, q.blocksize, dtype)
    out = torch.full((q.numel,), float("nan"), dtype=dtype)
    got = lk.dequantize_nf4(q, dtype, backend=backend, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got.reshape(-1), ref)


@pytest.mark.parametrize("blocksize", VALID_BLOCKSIZES)
def test_every_blocksize_roundtrips(blocksize, rng):
    w = randn((3, 1000), torch.float32, rng)
    q = lk.quantize_nf4(w, blocksize)
    assert q.absmax.numel() == math.ceil(3000 / blocksize)
    err = (q.dequantize() - w).abs().max() / w.abs().max()
    assert err < 0.2  # 4-bit levels: at worst half the widest gap (0.15) of the scaled range


def test_error_is_nf4_sized(rng):
    w = randn((256, 256), torch.float32, rng)
    d = lk.quantize_nf4(w, 64, True).dequantize()
    rel = ((d - w).norm() / w.norm()).item()
    assert 0.05 < rel < 0.12, rel  # NF4 on Gaussian data is about 9-10% relative RMS error


def test_all_zero_blocks_and_constant_absmax():
    w = torch.zeros(4, 64)
    w[1, 5] = 3.0
    q = lk.quantize_nf4(w, 64, True)
    assert torch.equal(q.dequantize(), w)  # zero blocks stay exactly zero
    # all blocks with the same absmax: nested absmax is 0, every code 0, decodes to the offset
    w = torch.ones(8, 64)
    q = lk.quantize_nf4(w, 64, True)
    assert float(q.nested_absmax.max()) == 0.0 and int(q.absmax.max()) == 0
    assert torch.equal(q.dequantize(), w)


def test_dynamic_code_is_bitsandbytes():
    import bitsandbytes.functional as F

    assert torch.equal(lk.dynamic_code(), F.create_dynamic_map().float())
    assert torch.equal(lk.nf4_code(), F.get_4bit_type("nf4", device="cpu").float())


def test_quant_state_json_is_byte_identical(rng):
    w = randn((48, 80), torch.bfloat16, rng)
    ours = lk.quantize_nf4(w, 64, True)
    _, sb = _bnb_quantize(w, 64, True)
    key = "quant_state.bitsandbytes__nf4"
    assert torch.equal(ours.state_dict()["weight." + key], sb.as_dict(packed=True)[key])


@pytest.mark.usefixtures("no_dynamo")
@pytest.mark.parametrize("bias", [True, False])
def test_linear4bit_state_dict_both_ways(bias, rng, tmp_path):
    """A bnb.nn.Linear4bit checkpoint loads into NF4Linear and back, through safetensors too."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file, save_file

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    dense = torch.nn.Linear(130, 70, bias=bias, dtype=torch.bfloat16)
    ours = lk.NF4Linear.from_linear(dense, blocksize=64)
    x = randn((5, 130), torch.bfloat16, rng)
    y_ours = ours(x)

    # ours -> safetensors -> bitsandbytes
    sd = ours.state_dict()
    assert set(sd) == {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"} | ({"bias"} if bias else set())
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "ours.safetensors")
    loaded = load_file(tmp_path / "ours.safetensors")
    theirs = bnb.nn.Linear4bit(130, 70, bias=bias, compute_dtype=torch.bfloat16, quant_type="nf4",
                               compress_statistics=True)
    # how transformers loads a pre-quantized bitsandbytes checkpoint
    stats = {k[len("weight."):]: v for k, v in loaded.items() if k.startswith("weight.")}
    theirs.weight = bnb.nn.Params4bit.from_prequantized(loaded["weight"], stats, device="cpu", module=theirs)
    if bias:
        theirs.bias = torch.nn.Parameter(loaded["bias"])
    assert torch.equal(theirs(x), y_ours)
    w_theirs = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    assert torch.equal(w_theirs, ours.weight.dequantize())

    # bitsandbytes -> torch.save -> ours
    buf = io.BytesIO()
    torch.save(theirs.state_dict(), buf)
    buf.seek(0)
    fresh = lk.NF4Linear(lk.quantize_nf4(torch.zeros(70, 130, dtype=torch.bfloat16)),
                         torch.zeros(70, dtype=torch.bfloat16) if bias else None)
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh(x), y_ours)


def test_params4bit_roundtrip_and_quant_storage(rng):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    w = randn((64, 96), torch.float16, rng)
    q = lk.quantize_nf4(w)
    p = q.to_bnb_params()
    assert isinstance(p, bnb.nn.Params4bit) and p.quant_type == "nf4" and p.compress_statistics
    back = lk.NF4Weight.from_bnb(p)
    assert torch.equal(back.dequantize(), q.dequantize())
    # quant_storage=bf16: the same bytes viewed as bf16 (FSDP-shardable form)
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                 quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    assert torch.equal(lk.NF4Weight.from_bnb(packed, qs).packed, q.packed)


def test_dequantize_backend_choice(monkeypatch):
    """The one size rule of the dequantize dispatch: on CUDA, Triton from TRITON_DEQUANTIZE_MIN_NUMEL
    elements up (measured faster there), the CUDA extension below; an explicit backend or
    $LORA_KERNELS_BACKEND always wins."""
    from lora_kernels import library

    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
    monkeypatch.setattr(library, "select_backend", lambda device, requested=None: requested or "cuda")
    monkeypatch.setattr(library, "_triton_on", lambda device: True)
    dev = torch.device("cuda")
    big = library.TRITON_DEQUANTIZE_MIN_NUMEL
    assert library._dequantize_backend(dev, big, None) == "triton"
    assert library._dequantize_backend(dev, big - 1, None) == "cuda"
    assert library._dequantize_backend(dev, big, "cuda") == "cuda"
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "cuda")
    assert library._dequantize_backend(dev, big, None) == "cuda"
    monkeypatch.delenv("LORA_KERNELS_BACKEND")
    monkeypatch.setattr(library, "_triton_on", lambda device: False)
    assert library._dequantize_backend(dev, big, None) == "cuda"
    monkeypatch.undo()
    assert library._dequantize_backend(torch.device("cpu"), big, None) in ("cpp", "reference")
