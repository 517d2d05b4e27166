"""Autograd of the LoRA / QLoRA linear (lora_kernels/autograd.py over lora_kernels/ops.py), CPU.

Every gradient is compared with autograd through ``lora_linear_reference`` on the dequantized
weight in float32; gradcheck runs in float64 (dense and NF4 bases: the ops take float64 x).
"""

import pytest
import torch
import torch.utils.checkpoint

from lora_kernels import quantize_nf4
from lora_kernels.autograd import dropout_mask, qlora_linear
from lora_kernels.reference import lora_linear_reference

from .conftest import bad_dtype_cases, randn

K = 128
N = 13  # odd


def _base(kind, gen, dtype=torch.float32):
    w = randn((N, K), torch.float32, gen, scale=0.1)
    if kind == "dense":
        return w.to(dtype), w.to(dtype)
    q = quantize_nf4(w, blocksize=64, double_quant=(kind == "nf4-dq"))
    return q, q.dequantize(torch.float32).to(dtype)


def _params(gen, r, vector_scale, bias, dtype=torch.float32):
    a = randn((r, K), dtype, gen, scale=0.1).requires_grad_()
    b = randn((N, r), dtype, gen, scale=0.1).requires_grad_()
    s = (torch.rand(r, generator=gen, dtype=torch.float32) + 0.5).to(dtype).requires_grad_() if vector_scale else 2.0
    bb = randn((N,), dtype, gen).requires_grad_() if bias else None
    return a, b, s, bb


def _leaves(x, a, b, s, bb):
    return [t for t in (x, a, b, s, bb) if isinstance(t, torch.Tensor) and t.requires_grad]


def _grads(fn, leaves, gy):
    for t in leaves:
        t.grad = None
    y = fn()
    y.backward(gy)
    return y.detach(), [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("lead", [(1,), (3,), (17,), (2, 5)], ids=lambda s: "x" + "x".join(map(str, s)))
@pytest.mark.parametrize("r", [1, 8, 64], ids=lambda r: f"r{r}")
@pytest.mark.parametrize("kind", ["nf4-dq", "nf4", "dense"])
@pytest.mark.parametrize("vector_scale", [False, True], ids=["s-float", "s-vector"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_grads_match_reference(rng, lead, r, kind, vector_scale, bias):
    weight, dense = _base(kind, rng)
    x = randn((*lead, K), torch.float32, rng).requires_grad_()
    a, b, s, bb = _params(rng, r, vector_scale, bias)
    leaves = _leaves(x, a, b, s, bb)
    gy = randn((*lead, N), torch.float32, rng)
    y, got = _grads(lambda: qlora_linear(x, weight, a, b, s, bb), leaves, gy)
    y_ref, want = _grads(lambda: lora_linear_reference(x, dense, a, b, s, bb), leaves, gy)
    assert y.shape == (*lead, N)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["dense", "nf4-dq", "nf4"])
@pytest.mark.parametrize("vector_scale", [False, True], ids=["s-float", "s-vector"])
def test_gradcheck_float64(rng, kind, vector_scale):
    weight, _ = _base(kind, rng, torch.float64)
    x = randn((3, K), torch.float64, rng).requires_grad_()
    a, b, s, bb = _params(rng, 4, vector_scale, True, torch.float64)
    if vector_scale:
        fn = lambda x, a, b, s, bb: qlora_linear(x, weight, a, b, s, bb)  # noqa: E731
        inputs = (x, a, b, s, bb)
    else:
        fn = lambda x, a, b, bb: qlora_linear(x, weight, a, b, s, bb)  # noqa: E731
        inputs = (x, a, b, bb)
    assert torch.autograd.gradcheck(fn, inputs)


def _function_node(y):
    node = y.grad_fn
    while type(node).__name__ not in ("QLoRAFunctionBackward", "LoRAFunctionBackward"):
        node = node.next_functions[0][0]
    return node


@pytest.mark.parametrize("kind", ["nf4-dq", "dense"])
def test_dropout(rng, kind):
    weight, dense = _base(kind, rng)
    p = 0.3
    x = randn((2, 9, K), torch.float32, rng).requires_grad_()
    a, b, s, bb = _params(rng, 8, True, True)
    leaves = _leaves(x, a, b, s, bb)
    gy = randn((2, 9, N), torch.float32, rng)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    torch.manual_seed(seed)
    y, got = _grads(lambda: qlora_linear(x, weight, a, b, s, bb, dropout=p), leaves, gy)
    torch.manual_seed(seed)
    mask = dropout_mask(x.detach().reshape(-1, K), p).reshape(x.shape)
    assert 0 < mask.sum() < mask.numel()

    def ref():
        xd = x * mask / (1 - p)
        return lora_linear_reference(x, dense, None, None, 1.0, bb) + lora_linear_reference(xd, dense * 0, a, b, s)

    y_ref, want = _grads(ref, leaves, gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    # the mask is saved as bool, x once; no dropped-out copy of x
    saved = [t for t in _function_node(qlora_linear(x, weight, a, b, s, bb, dropout=p)).saved_tensors
             if t is not None]
    assert sum(t.dtype == torch.bool and t.numel() == x.numel() for t in saved) == 1
    assert sum(t.dtype != torch.bool and t.numel() == x.numel() for t in saved) == 1
    # eval mode: no dropout
    torch.testing.assert_close(qlora_linear(x, weight, a, b, s, bb, dropout=p, training=False),
                               lora_linear_reference(x, dense, a, b, s, bb), rtol=1e-5, atol=1e-5)


def test_saved_tensors_p0_and_needs_input_grad(rng):
    weight, _ = _base("nf4-dq", rng)
    x = randn((17, K), torch.float32, rng).requires_grad_()
    a, b, s, bb = _params(rng, 8, False, True)
    saved = [t for t in _function_node(qlora_linear(x, weight, a, b, s, bb, dropout=0.3, training=False)).saved_tensors
             if t is not None]
    assert not any(t.dtype == torch.bool for t in saved)
    assert sum(t.numel() == x.numel() for t in saved) == 1  # x itself, once
    assert any(t.data_ptr() == x.data_ptr() for t in saved)  # a view of x, not a copy
    assert not any(t.numel() == N * K for t in saved)  # no dequantized weight
    # the NF4 weight's tensors are held on ctx (module state), never packed as saved tensors;
    # without dropout T = x·Aᵀ is not saved: the backward recomputes it from x (kept for dA) and A
    node = _function_node(qlora_linear(x, weight, a, b, s, bb))
    assert not any(t is not None and t.dtype == torch.uint8 for t in node.saved_tensors)
    assert node.base is not None and node.base[0] is weight
    assert node.defer_t and not any(t is not None and t.shape == (17, 8) for t in node.saved_tensors)
    # x needs no grad: the weight is not kept and dx is not computed (A only for T)
    xn = x.detach()
    node = _function_node(qlora_linear(xn, weight, a, b, s, bb))
    saved = [t for t in node.saved_tensors if t is not None]
    assert not any(t.dtype == torch.uint8 for t in saved)
    assert node.base is None                                # no dx: the weight is not kept either
    # only B needs grad: x is not kept either (T [M, r] is, computed in the forward), nor A
    a2 = a.detach()
    node = _function_node(qlora_linear(xn, weight, a2, b, s, None))
    saved = [t for t in node.saved_tensors if t is not None]
    assert not node.defer_t and not any(t.numel() == x.numel() for t in saved)
    assert not any(t is a2 for t in saved) and any(t.shape == (17, 8) for t in saved)
    y = qlora_linear(xn, weight, a2, b, s, None)
    y.sum().backward()
    assert b.grad is not None and a2.grad is None


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
def test_checkpoint(rng, reentrant, p):
    weight, _ = _base("nf4-dq", rng)
    x = randn((3, 7, K), torch.float32, rng).requires_grad_()
    a, b, s, bb = _params(rng, 8, True, True)
    leaves = _leaves(x, a, b, s, bb)
    gy = randn((3, 7, N), torch.float32, rng)
    f = lambda x, a, b, s, bb: qlora_linear(x, weight, a, b, s, bb, dropout=p)  # noqa: E731
    torch.manual_seed(0)
    y, want = _grads(lambda: f(x, a, b, s, bb), leaves, gy)
    torch.manual_seed(0)
    y_c, got = _grads(lambda: torch.utils.checkpoint.checkpoint(f, x, a, b, s, bb, use_reentrant=reentrant),
                      leaves, gy)
    torch.testing.assert_close(y_c, y, rtol=0, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_saved_tensor_hooks_see_activations_only(rng):
    """Saved-tensor hooks (checkpointing's, save_on_cpu's) pack x, T, A and B -- never the frozen
    NF4 weight's tensors -- and gradients under save_on_cpu equal the plain ones."""
    weight, _ = _base("nf4-dq", rng)
    x = randn((2, 5, K), torch.float32, rng).requires_grad_()
    a, b, s, bb = _params(rng, 8, False, True)
    gy = randn((2, 5, N), torch.float32, rng)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = qlora_linear(x, weight, a, b, s, bb)
    assert packed and not any(t.dtype == torch.uint8 for t in packed)
    assert not any(t is w for t in packed for w in (weight.absmax, weight.nested_absmax, weight.code))
    assert {id(t) for t in packed} >= {id(a), id(b)}
    want = torch.autograd.grad(y, (x, a, b, bb), gy)
    with torch.autograd.graph.save_on_cpu():
        y2 = qlora_linear(x, weight, a, b, s, bb)
    got = torch.autograd.grad(y2, (x, a, b, bb), gy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_autocast_like_linear(rng):
    weight, dense = _base("nf4-dq", rng)
    x = randn((5, K), torch.float32, rng).requires_grad_()
    a, b, s, bb = _params(rng, 8, False, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = qlora_linear(x, weight, a, b, s, bb)
        assert y.dtype == torch.nn.functional.linear(x, dense, bb).dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == a.grad.dtype == b.grad.dtype == bb.grad.dtype == torch.float32
    ref = lora_linear_reference(x.detach(), dense, a.detach(), b.detach(), s, bb.detach())
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


def test_bf16_grads(rng):
    weight, dense = _base("nf4", rng)
    x = randn((6, K), torch.bfloat16, rng).requires_grad_()
    a, b, s, bb = _params(rng, 8, True, True, torch.bfloat16)
    s = s.detach().float().requires_grad_()
    leaves = _leaves(x, a, b, s, bb)
    gy = randn((6, N), torch.bfloat16, rng)
    _, got = _grads(lambda: qlora_linear(x, weight, a, b, s, bb), leaves, gy)
    f32 = [t.detach().float().requires_grad_() for t in leaves]
    _, want = _grads(lambda: lora_linear_reference(*f32[:1], dense, *f32[1:]), f32, gy.float())
    for g, w, t in zip(got, want, leaves):
        assert g.dtype == t.dtype
        torch.testing.assert_close(g.float(), w, rtol=3e-2, atol=3e-2 * w.abs().max().item())


def _inductor_ok():
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _inductor_ok(), reason="inductor's C++ toolchain is not available")
def test_torch_compile_fullgraph(rng):
    weight, _ = _base("nf4-dq", rng)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = weight
            self.a = torch.nn.Parameter(randn((4, K), torch.float32, rng, scale=0.1))
            self.b = torch.nn.Parameter(randn((N, 4), torch.float32, rng, scale=0.1))

        def forward(self, x):
            return qlora_linear(x, self.weight, self.a, self.b, 0.5)

    m = Tiny()
    x = randn((2, 3, K), torch.float32, rng).requires_grad_()
    compiled = torch.compile(m, fullgraph=True, backend="inductor")
    y_c = compiled(x)
    y_c.sum().backward()
    got = [x.grad.clone(), m.a.grad.clone(), m.b.grad.clone()]
    x.grad = m.a.grad = m.b.grad = None
    y = m(x)
    y.sum().backward()
    torch.testing.assert_close(y_c, y, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, [x.grad, m.a.grad, m.b.grad]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["nf4-dq", "nf4", "dense"])
@pytest.mark.parametrize("lora", ["lora", "lora-dropout", "nolora"])
def test_opcheck(rng, dtype, kind, lora):
    weight, dense = _base(kind, rng, dtype)
    M, r = 5, 4
    x = randn((M, K), dtype, rng)
    a = randn((r, K), dtype, rng) if lora != "nolora" else None
    b = randn((N, r), dtype, rng) if lora != "nolora" else None
    s = torch.rand(r, generator=rng)
    bias = randn((N,), dtype, rng)
    x_lora = x * (torch.rand(M, K, generator=rng) > 0.5) if lora == "lora-dropout" else None
    dy = randn((M, N), dtype, rng)
    ops = torch.ops.lora_kernels
    if kind == "dense":
        cases = [(ops.dense_lora_forward.default, (x, dense, a, b, s, bias, x_lora)),
                 (ops.dense_lora_backward_dx.default, (dy, dense, a, b, s))]
    else:
        wt = (weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code, weight.offset, weight.code,
              N, K, weight.blocksize)
        cases = [(ops.nf4_lora_forward.default, (x, *wt, a, b, s, bias, x_lora)),
                 (ops.nf4_lora_backward_dx.default, (dy, *wt, a, b, s))]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_ops_values(rng):
    weight, dense = _base("nf4-dq", rng)
    x = randn((4, K), torch.float32, rng)
    a, b = randn((3, K), torch.float32, rng), randn((N, 3), torch.float32, rng)
    s = torch.tensor(0.5)
    y, t = torch.ops.lora_kernels.nf4_lora_forward(x, weight.packed, weight.absmax, weight.nested_absmax,
                                                   weight.nested_code, weight.offset, weight.code, N, K,
                                                   weight.blocksize, a, b, s, None)
    torch.testing.assert_close(y, lora_linear_reference(x, dense, a, b, s))
    torch.testing.assert_close(t, x @ a.t())
    dy = randn((4, N), torch.float32, rng)
    dx = torch.ops.lora_kernels.dense_lora_backward_dx(dy, dense, a, b, s)
    torch.testing.assert_close(dx, dy @ dense + ((dy @ b) * s) @ a)
    s_vec = torch.rand(3, generator=rng)
    dx = torch.ops.lora_kernels.nf4_lora_backward_dx(dy, weight.packed, weight.absmax, weight.nested_absmax,
                                                     weight.nested_code, weight.offset, weight.code, N, K,
                                                     weight.blocksize, a, b, s_vec)
    torch.testing.assert_close(dx, dy @ dense + ((dy @ b) * s_vec) @ a)
    y0, t0 = torch.ops.lora_kernels.dense_lora_forward(x, dense, None, None, s, None)
    assert t0.shape == (4, 0)
    torch.testing.assert_close(y0, x @ dense.t())


# ---------------------------------------------------------------------------------------------
def test_bad_input(rng):
    weight, dense = _base("nf4-dq", rng)
    x = randn((3, K), torch.float32, rng)
    a, b = randn((4, K), torch.float32, rng), randn((N, 4), torch.float32, rng)
    for p in (1.0, -0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="dropout must be a float in"):
            qlora_linear(x, weight, a, b, dropout=p)
    with pytest.raises(ValueError, match="x's last dim is 64, the weight expects K=128"):
        qlora_linear(x[:, :64], weight, a, b)
    with pytest.raises(ValueError, match=r"lora_a must be \[r, K=128\]"):
        qlora_linear(x, weight, a[:, :64], b)
    with pytest.raises(ValueError, match=r"lora_b must be \[N=13, r=4\]"):
        qlora_linear(x, weight, a, b[:, :3])
    with pytest.raises(ValueError, match="give both lora_a and lora_b"):
        qlora_linear(x, weight, a, None)
    for grad in (True, False):     # rank 0: an error on both paths, never a silent base-only result
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="rank r must be >= 1"):
            qlora_linear(x.requires_grad_(grad), weight, a[:0].requires_grad_(), b[:, :0].requires_grad_())
    with pytest.raises(ValueError, match=r"scale must be a float, a 0-d tensor or an \[r=4\]"):
        qlora_linear(x, weight, a, b, torch.ones(3))
    with pytest.raises(TypeError, match="scale must be a float or a tensor"):
        qlora_linear(x, weight, a, b, "2")
    with pytest.raises(ValueError, match=r"bias must be \[N=13\]"):
        qlora_linear(x, weight, a, b, bias=torch.zeros(N + 1))
    with pytest.raises(ValueError, match="base weight is frozen"):
        qlora_linear(x, dense.clone().requires_grad_(), a, b)
    with pytest.raises(TypeError, match="weight must be an NF4Weight or a 2-D tensor"):
        qlora_linear(x, dense[0], a, b)
    with pytest.raises(ValueError, match=r"x must be 2-D \[M, 128\]"):
        torch.ops.lora_kernels.dense_lora_forward(x[:, :5], dense, None, None, torch.tensor(1.0), None)
    for grad in (True, False):     # integer operands and a non-finite scale: named, never cast silently
        with torch.set_grad_enabled(grad):
            for args, kw, err, msg in bad_dtype_cases(x, weight, dense, a, b):
                with pytest.raises(err, match=f"qlora_linear: {msg}"):
                    qlora_linear(*args, **kw)
