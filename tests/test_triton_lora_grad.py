"""``triton/lora_grad.lora_dy_pass``: U = dY·B and dB = s·dYᵀ·T from one read of dY, against a
float64 reference; fp16 / fp32 under the interpreter (CPU), bf16 and large shapes on the GPU."""
import os

import pytest
import torch

from tests.conftest import randn

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs a CUDA GPU or TRITON_INTERPRET=1")
gpu = pytest.mark.gpu


def _grad_mod(monkeypatch):
    pytest.importorskip("triton")
    from lora_kernels.triton import lora_grad
    monkeypatch.setattr(lora_grad, "_POISON", True)
    return lora_grad


def _check(mod, rng, M, N, r, dtype, dev, splits=None, scale=2.0, tol=None, db_dtype=None):
    dy = randn((M, N), dtype, rng, device=dev)
    b = randn((N, r), dtype, rng, device=dev, scale=0.1)
    t = randn((M, r), dtype, rng, device=dev)
    u, db = mod.lora_dy_pass(dy, b, t, scale, splits=splits, db_dtype=db_dtype)
    assert u.shape == (M, r) and db.shape == (N, r)
    assert u.dtype == dtype and db.dtype == (db_dtype or dtype)
    u_ref = dy.double() @ b.double()
    db_ref = scale * dy.double().t() @ t.double()
    eps = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] if tol is None else tol
    for got, ref in ((u, u_ref), (db, db_ref)):
        assert torch.isfinite(got).all()
        err = (got.double() - ref).abs().max().item()
        bound = eps * ref.abs().max().item() + 1e-6
        assert err <= bound, (err, bound)


@pytest.mark.parametrize("M,N,r,splits", [(1, 17, 1, None), (37, 333, 5, 3), (300, 129, 16, None),
                                          (257, 70, 32, 2), (64, 200, 64, 1)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_dy_pass_matches_float64(rng, monkeypatch, M, N, r, splits, dtype):
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        dev = "cuda"
    else:
        dev = "cpu"
    _check(_grad_mod(monkeypatch), rng, M, N, r, dtype, dev, splits=splits)


def test_dy_pass_fp32_db_from_half_inputs(rng, monkeypatch):
    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    _check(_grad_mod(monkeypatch), rng, 40, 90, 8, torch.float16, dev, db_dtype=torch.float32)


def test_dy_pass_rejects_bad_input(monkeypatch):
    mod = _grad_mod(monkeypatch)
    dy, b, t = torch.zeros(4, 8), torch.zeros(8, 2), torch.zeros(4, 2)
    with pytest.raises(ValueError, match="r must be"):
        mod.lora_dy_pass(dy, torch.zeros(8, 0), torch.zeros(4, 0), 1.0)
    with pytest.raises(ValueError, match="lora_b"):
        mod.lora_dy_pass(dy, torch.zeros(7, 2), t, 1.0)
    with pytest.raises(ValueError, match="share one of"):
        mod.lora_dy_pass(dy.double(), b.double(), t.double(), 1.0)
    with pytest.raises(ValueError, match="share one of"):
        mod.lora_dy_pass(dy, b.half(), t, 1.0)
    with pytest.raises(ValueError, match="2-D"):
        mod.lora_dy_pass(dy[None], b, t, 1.0)
    with pytest.raises(TypeError, match="Python float"):
        mod.lora_dy_pass(dy, b, t, torch.tensor(1.0))


def test_dy_pass_non_contiguous_and_empty(rng, monkeypatch):
    mod = _grad_mod(monkeypatch)
    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    dy = randn((40, 60), torch.float32, rng, device=dev).t()          # [60, 40], column-major
    b = randn((40, 4), torch.float32, rng, device=dev)
    t = randn((60, 4), torch.float32, rng, device=dev)
    u, db = mod.lora_dy_pass(dy, b, t, 0.5)
    torch.testing.assert_close(u, dy @ b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, 0.5 * dy.t() @ t, rtol=1e-5, atol=1e-5)
    u, db = mod.lora_dy_pass(dy[:0], b, t[:0], 1.0)
    assert u.shape == (0, 4) and db.shape == (40, 4) and (db == 0).all()


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("M,N,r", [(4096, 14336, 16), (1000, 4096, 8), (8191, 1024, 32)], ids=str)
def test_dy_pass_bf16_gpu(rng, monkeypatch, M, N, r):
    _check(_grad_mod(monkeypatch), rng, M, N, r, torch.bfloat16, "cuda")


def test_worth_it_rule(monkeypatch):
    """Where the backward may use the fused pass: small r, a large dY, a wide N (session 18's H100
    numbers: slower than cuBLAS at N = 4096)."""
    mod = _grad_mod(monkeypatch)
    assert mod.worth_it(4096, 28672, 16) and mod.worth_it(4096, 8192, 32)
    assert not mod.worth_it(4096, 4096, 16)            # N too narrow
    assert not mod.worth_it(4096, 28672, 64)           # r too large
    assert not mod.worth_it(16, 28672, 16)             # dY too small
