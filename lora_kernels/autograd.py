"""Autograd for the LoRA / QLoRA linear: thin ``torch.autograd.Function``s over ``ops.py``.

    y = x · Ŵᵀ + ((xd · Aᵀ) ⊙ s) · Bᵀ + bias,   xd = dropout(x)  (the base path sees x itself)

The base weight Ŵ (NF4 or dense) is frozen: it gets no gradient.  With T = xd · Aᵀ [M, r] and
U = dY · B [M, r]:

    dX    = dY · (Ŵ + (B ⊙ s) · A)                     (p = 0: one merged GEMM, library.lora_linear_dx)
          = dY · Ŵ + ((s ⊙ U) · A) ⊙ mask / (1 - p)    (dropout p > 0)
    dA    = (s ⊙ U)ᵀ · xd          dB = dYᵀ · (s ⊙ T)          dbias = Σ_m dY
    ds    = Σ_m T ⊙ U  (vector s, AdaLoRA)   or  Σ T ⊙ U  (0-d tensor s)

Saved for backward (``ctx.save_for_backward``, each only when a gradient needs it): x (2-D
view; for dA), the dropout mask as bool (only when p > 0; xd is rebuilt from x and the mask,
never stored), T (for dB, ds; eager calls without dropout whose x is kept for dA keep A instead
and recompute T = x · Aᵀ in the backward: one GEMM fewer per forward, and under checkpointing the
forward runs twice), A (for dX), B (for dX, dA, ds), s (a tensor scale; a float one is a ctx
attribute), and a dense base weight (for dX).  Never y, never a dequantized weight (on the GPU
neither pass ever holds the whole dense weight: ``library``'s merge-cublas routes stream it
through a workspace in chunks).

``ctx`` attributes hold Python scalars (N, K, blocksize, p, flags, the device type, the adapters'
dtypes) and, in eager mode, a reference to the NF4 base weight (the ``NF4Weight`` object; for dX).
Its tensors are frozen module state, not activations: recomputation (``torch.utils.checkpoint``)
has nothing to rebuild and saved-tensor hooks (checkpointing's, ``save_on_cpu``'s) have nothing
to pack -- saving them would run six hooks per layer and pass for nothing, or copy the whole
4-bit weight to the CPU under ``save_on_cpu``.  Traced by ``torch.compile`` (``QLoRAFunction``)
they are saved like the rest.

Public entry: ``qlora_linear``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from . import library, ops  # noqa: F401  (ops registers torch.ops.lora_kernels.*)
from .nf4 import NF4Weight

__all__ = ["qlora_linear", "QLoRAFunction", "LoRAFunction", "dropout_mask"]


def dropout_mask(x2d: Tensor, p: float) -> Tensor:
    """The keep-mask (bool, x2d's shape) the Functions draw for dropout probability ``p``, from the
    default generator of x's device: reseeding and calling this reproduces a forward's mask."""
    return torch.empty(x2d.shape, dtype=torch.bool, device=x2d.device).bernoulli_(1.0 - p)


def _apply_mask(t: Tensor, mask: Tensor, p: float) -> Tensor:
    # One expression for the forward's xd and the backward's rebuilt xd / masked dX (bit-identical).
    return t * mask * (1.0 / (1.0 - p))


def _forward_common(ctx, x2d, lora_a, lora_b, scale, dropout_p, training, needs, weight_tensors, run_op,
                    hold_weight: bool = False, eager: bool = False):
    """Run the forward op and save what backward needs.  ``needs``: (x, A, B, scale, bias) flags.
    ``hold_weight``: ``weight_tensors`` is the module's own frozen base weight (an ``NF4Weight``):
    keep a reference on ``ctx.base`` instead of saving it (see the module docstring).  ``eager``
    (not traced): without dropout, when x is saved for dA anyway, T = x · Aᵀ is left to the
    backward (``run_op(x_lora, want_t=False)``) -- under checkpointing the forward runs twice and
    only the recomputation's T was ever used."""
    nx, nA, nB, ns, nbias = needs
    has_lora = lora_a is not None
    p = float(dropout_p) if (training and has_lora) else 0.0
    mask = x_lora = None
    if p > 0.0:
        mask = dropout_mask(x2d, p)
        x_lora = _apply_mask(x2d, mask, p)
    defer_t = eager and has_lora and p == 0.0 and nA and (nB or ns)
    y, t = run_op(x_lora, not defer_t)
    ctx.defer_t = defer_t
    need_u = has_lora and (nx or nA or ns)
    ctx.has_lora = has_lora
    ctx.p = p
    ctx.device_type = x2d.device.type
    ctx.needs = (nx, nA and has_lora, nB and has_lora, ns and has_lora, nbias)
    scale_is_tensor = isinstance(scale, Tensor)
    ctx.scale_float = None if scale_is_tensor else float(scale)   # a Python float, never a tensor
    ctx.adapter_dtypes = (lora_a.dtype, lora_b.dtype) if has_lora else None
    ctx.base = tuple(weight_tensors) if (hold_weight and nx) else None
    if hold_weight:
        weight_tensors = ()
    ctx.save_for_backward(
        x2d if (has_lora and nA) else None,
        mask if (p > 0.0 and (nA or nx)) else None,
        t if (has_lora and (nB or ns) and not defer_t) else None,
        lora_a if (has_lora and (nx or defer_t)) else None,
        lora_b if need_u else None,
        scale if (has_lora and scale_is_tensor) else None,
        *(w if nx else None for w in weight_tensors),
    )
    return y


def _backward_common(ctx, dy, run_dx):
    """(dx, dA, dB, ds, dbias) from the saved tensors; ``run_dx(dy, weights, lora_a, lora_b, scale)``
    returns dy · (Ŵ + (B ⊙ s) · A) (lora_a = lora_b = None: dy · Ŵ)."""
    nx, nA, nB, ns, nbias = ctx.needs
    x2d, mask, t, lora_a, lora_b, scale, *weights = ctx.saved_tensors
    if ctx.base is not None:
        weights = ctx.base
    if scale is None:
        scale = ctx.scale_float
    p = ctx.p
    dx = dA = dB = ds = dbias = None
    with _no_autocast(ctx.device_type):
        dy = dy.contiguous()
        u = None
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32  # scale math precision
        if ctx.defer_t:   # T = x · Aᵀ exactly as the forward computes it (ops._forward_impl)
            t = x2d @ lora_a.to(x2d.dtype).t()
        if (ctx.has_lora and nB and (nA or (nx and p > 0.0))
                and library.fused_dy_pass_takes(dy, lora_b.shape[1], scale)):   # one read of dY for both
            u, dB = library.lora_dy_pass(dy, lora_b.to(dy.dtype), t.to(dy.dtype), scale, ctx.adapter_dtypes[1])
        elif ctx.has_lora and (nA or ns or (nx and p > 0.0)):
            u = dy @ lora_b.to(dy.dtype)                                  # U [M, r]
        if nx:
            if not ctx.has_lora:
                dx = run_dx(dy, weights, None, None, scale)
            elif p == 0.0:  # the low-rank term rides inside the merged weight
                dx = run_dx(dy, weights, lora_a, lora_b, scale)
            else:  # the low-rank term saw dropout(x): its gradient goes through the mask
                dx = run_dx(dy, weights, None, None, scale)
                dx = dx + _apply_mask(_scaled(u, scale, acc) @ lora_a.to(dy.dtype), mask, p)
        if nA:
            xd = x2d if p == 0.0 else _apply_mask(x2d, mask, p)
            if isinstance(scale, Tensor):
                dA = _scaled(u, scale, acc).t() @ xd.to(dy.dtype)
            else:  # a float scale: the GEMM's alpha (one launch, one rounding), in A's dtype
                dA = _mm_scaled(u.t(), xd.to(dy.dtype), scale, ctx.adapter_dtypes[0])
        if nB and dB is None:   # (the fused dY pass above may have made it)
            if isinstance(scale, Tensor):
                dB = dy.t() @ _scaled(t, scale, acc)
            else:
                dB = _mm_scaled(dy.t(), t.to(dy.dtype), scale, ctx.adapter_dtypes[1])
        if ns:
            tu = t.to(acc) * u.to(acc)
            ds = (tu.sum(0) if scale.dim() == 1 else tu.sum()).to(scale.dtype)
        if nbias:
            dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, dA, dB, ds, dbias


def _mm_scaled(a: Tensor, b: Tensor, alpha: float, out_dtype: torch.dtype | None = None) -> Tensor:
    """alpha · (a @ b) as one GEMM (beta = 0: the result's uninitialised memory is ignored), in
    ``out_dtype`` (default: a's dtype).  fp32 from bf16/fp16 a, b on CUDA -- the gradient of an fp32
    adapter (PEFT's default) -- is written by the GEMM itself (torch's ``addmm(..., out_dtype=)``:
    fp32 accumulator, no rounding to bf16, and no cast launch by the autograd engine afterwards);
    where torch cannot, the product is cast."""
    shape = (a.shape[0], b.shape[1])
    if out_dtype is None or out_dtype == a.dtype:
        return a.new_empty(shape).addmm_(a, b, beta=0, alpha=alpha)
    if (out_dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16)
            and not torch.compiler.is_compiling() and _out_dtype_gemm(a.device)):
        return torch.addmm(a.new_empty(shape, dtype=out_dtype), a, b, out_dtype=out_dtype, beta=0, alpha=alpha)
    return a.new_empty(shape).addmm_(a, b, beta=0, alpha=alpha).to(out_dtype)


_OUT_DTYPE_GEMM: dict = {}


def _out_dtype_gemm(device: torch.device) -> bool:
    """Whether this torch computes a bf16 x bf16 -> fp32 ``addmm(out_dtype=)`` on ``device``
    (CUDA in torch >= 2.8; not on the CPU), tried once per device type on 1x1 tensors."""
    ok = _OUT_DTYPE_GEMM.get(device.type)
    if ok is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False     # the probe reads a result back: not while a CUDA graph is captured
        try:
            one = torch.ones((1, 1), dtype=torch.bfloat16, device=device)
            r = torch.addmm(torch.empty((1, 1), device=device), one, one, out_dtype=torch.float32, beta=0, alpha=2.0)
            ok = r.dtype == torch.float32 and float(r) == 2.0
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _OUT_DTYPE_GEMM[device.type] = ok
    return ok


def _autocast_on(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``; False on devices autocast does not know (meta)."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def _no_autocast(device_type: str):
    """``torch.autocast(device_type, enabled=False)`` when autocast is on, else a no-op context (the
    autocast context manager costs host time on every call even when there is nothing to turn off).
    Used in a ``with`` statement, the form torch.compile traces (a hand-called ``__enter__`` is not)."""
    if _autocast_on(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _scaled(v: Tensor, scale, acc: torch.dtype) -> Tensor:
    """v ⊙ s in v's dtype, the product formed in ``acc`` (s a float or a 0-d / [r] tensor)."""
    s = scale.to(acc) if isinstance(scale, Tensor) else scale
    return (v.to(acc) * s).to(v.dtype)


def _op_scale(scale, x: Tensor) -> Tensor:
    # The torch.library ops take the scale as a tensor (traced graphs only; eager passes floats).
    if isinstance(scale, Tensor):
        return scale
    return torch.tensor(scale, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)


class QLoRAFunction(torch.autograd.Function):
    """y [M, N] for 2-D x [M, K] and an NF4 base weight given as its tensors + (N, K, blocksize):
    the form ``torch.compile`` traces (the ops of ``ops.py``, one graph node each).  Eager calls
    take ``LoRAFunction`` with the ``NF4Weight`` object itself (half the arguments, no per-call view).

    ``apply(x, packed, absmax, nested_absmax, nested_code, offset, code, N, K, blocksize,
    lora_a, lora_b, scale, bias, dropout_p, training)``; A, B, bias in x's dtype, scale an fp32
    tensor (0-d or [r]; float64 with float64 x).  Prefer ``qlora_linear``, which checks and casts its arguments.
    """

    @staticmethod
    def forward(ctx, x, packed, absmax, nested_absmax, nested_code, offset, code, N, K, blocksize,
                lora_a, lora_b, scale, bias, dropout_p, training):
        ni = ctx.needs_input_grad
        ctx.N, ctx.K, ctx.blocksize = N, K, blocksize
        wt = (packed, absmax, nested_absmax, nested_code, offset, code)
        if torch.compiler.is_compiling():   # through the registered op: one node, no graph break
            run = lambda x_lora, want_t: torch.ops.lora_kernels.nf4_lora_forward(  # noqa: E731
                x, *wt, N, K, blocksize, lora_a, lora_b, _op_scale(scale, x), bias, x_lora)
        else:   # called directly: the op's implementation without the dispatcher's cost
            w = ops._nf4_view(*wt, N, K, blocksize, x.dtype, checked=False)
            run = lambda x_lora, want_t: ops._forward_impl(x, w, lora_a, lora_b, scale, bias, x_lora,  # noqa: E731
                                                           None, checked=False)
        return _forward_common(ctx, x, lora_a, lora_b, scale, dropout_p, training,
                               (ni[0], ni[10], ni[11], ni[12], ni[13]), wt, run)

    @staticmethod
    def backward(ctx, dy):
        N, K, bs = ctx.N, ctx.K, ctx.blocksize
        if torch.compiler.is_compiling():
            run_dx = lambda dy_, w, a, b, s: torch.ops.lora_kernels.nf4_lora_backward_dx(  # noqa: E731
                dy_, *w, N, K, bs, a, b, _op_scale(s, dy_))
        else:
            run_dx = lambda dy_, w, a, b, s: library.dx_2d(  # noqa: E731
                dy_, ops._nf4_view(*w, N, K, bs, dy_.dtype, checked=False), a, b, 1.0 if s is None else s)
        dx, dA, dB, ds, dbias = _backward_common(ctx, dy, run_dx)
        return (dx, None, None, None, None, None, None, None, None, None, dA, dB, ds, dbias, None, None)


class LoRAFunction(torch.autograd.Function):
    """y [M, N] for 2-D x [M, K] and a frozen base weight: a dense [N, K] tensor (x's dtype, saved),
    or -- eager mode only -- an ``NF4Weight`` (held on ctx, see the module docstring).

    ``apply(x, weight, lora_a, lora_b, scale, bias, dropout_p, training)``; see ``QLoRAFunction``.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scale, bias, dropout_p, training):
        ni = ctx.needs_input_grad
        compiling = torch.compiler.is_compiling()
        if compiling and not isinstance(weight, NF4Weight):
            run = lambda x_lora, want_t: torch.ops.lora_kernels.dense_lora_forward(  # noqa: E731
                x, weight, lora_a, lora_b, _op_scale(scale, x), bias, x_lora)
        else:   # eager (an NF4 weight arrives here as the NF4Weight object itself, not its tensors)
            run = lambda x_lora, want_t: ops._forward_impl(x, weight, lora_a, lora_b, scale, bias,  # noqa: E731
                                                           x_lora, None, checked=False, want_t=want_t)
        return _forward_common(ctx, x, lora_a, lora_b, scale, dropout_p, training,
                               (ni[0], ni[2], ni[3], ni[4], ni[5]), (weight,), run,
                               hold_weight=isinstance(weight, NF4Weight), eager=not compiling)

    @staticmethod
    def backward(ctx, dy):
        if torch.compiler.is_compiling():
            run_dx = lambda dy_, w, a, b, s: torch.ops.lora_kernels.dense_lora_backward_dx(  # noqa: E731
                dy_, w[0], a, b, _op_scale(s, dy_))
        else:
            run_dx = lambda dy_, w, a, b, s: library.dx_2d(dy_, w[0], a, b, 1.0 if s is None else s)  # noqa: E731
        dx, dA, dB, ds, dbias = _backward_common(ctx, dy, run_dx)
        return dx, None, dA, dB, ds, dbias, None, None


# ---------------------------------------------------------------------------------------------
def qlora_linear(x: Tensor, weight: NF4Weight | Tensor, lora_a: Tensor | None = None,
                 lora_b: Tensor | None = None, scale: float | Tensor = 1.0, bias: Tensor | None = None,
                 dropout: float = 0.0, training: bool = True) -> Tensor:
    """y = x · Ŵᵀ + ((dropout(x) · Aᵀ) ⊙ s) · Bᵀ + bias, differentiable in x, A, B, s, bias.

    x: [..., K] fp32/bf16/fp16 (float64 too, for gradcheck); weight: ``NF4Weight`` (N, K) or a
    dense frozen [N, K] tensor (no gradient: it must not require grad); lora_a [r, K], lora_b
    [N, r] (or both None); scale: a float (alpha / r, alpha / sqrt(r)) or an fp32 tensor, 0-d or
    [r] (AdaLoRA: E ⊙ mask · scaling; its gradient is Σ_m T ⊙ U); bias [N] or None; dropout: the
    LoRA dropout probability in [0, 1), applied to the low-rank path only and only when
    ``training``.  Returns [..., N] in the compute dtype.

    Compute dtype: x's dtype, or under autocast the autocast dtype (as ``nn.Linear``); bias and a
    dense weight are cast to it (their gradients flow back through the cast).  A and B may be in
    another float dtype (PEFT keeps adapters in fp32): the kernels round them to the compute dtype
    where they read them (no cast node per call), and their gradients come back in their dtype.
    """
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError("qlora_linear: x must be a tensor [..., K]")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"qlora_linear: dropout must be a float in [0, 1), got {dropout!r}")
    if isinstance(weight, NF4Weight):
        if len(weight.shape) != 2:
            raise ValueError(f"qlora_linear: weight must be 2-D (N, K), got {tuple(weight.shape)}")
        N, K = weight.shape
    elif isinstance(weight, Tensor) and weight.dim() == 2:
        N, K = weight.shape
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError("qlora_linear: the base weight is frozen (it gets no gradient); "
                             "call weight.requires_grad_(False) or pass weight.detach()")
    else:
        raise TypeError(f"qlora_linear: weight must be an NF4Weight or a 2-D tensor [N, K], got "
                        f"{type(weight).__name__}{tuple(weight.shape) if isinstance(weight, Tensor) else ''}")
    if x.shape[-1] != K:
        raise ValueError(f"qlora_linear: x's last dim is {x.shape[-1]}, the weight expects K={K}")
    if x.device != weight.device:
        raise ValueError(f"qlora_linear: x is on {x.device} but the weight is on {weight.device}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("qlora_linear: give both lora_a and lora_b, or neither")
    if lora_a is not None:
        if not isinstance(lora_a, Tensor) or not isinstance(lora_b, Tensor):
            raise TypeError(f"qlora_linear: lora_a and lora_b must be tensors, got {type(lora_a).__name__} and "
                            f"{type(lora_b).__name__}")
        if lora_a.dim() != 2 or lora_a.shape[1] != K:
            raise ValueError(f"qlora_linear: lora_a must be [r, K={K}], got {tuple(lora_a.shape)}")
        r = lora_a.shape[0]
        if lora_b.dim() != 2 or tuple(lora_b.shape) != (N, r):
            raise ValueError(f"qlora_linear: lora_b must be [N={N}, r={r}], got {tuple(lora_b.shape)}")
        if r < 1:
            raise ValueError("qlora_linear: the rank r must be >= 1 (lora_a has 0 rows)")
        if lora_a.device != x.device or lora_b.device != x.device:
            raise ValueError(f"qlora_linear: lora_a/lora_b must be on x's device {x.device}, got "
                             f"{lora_a.device} and {lora_b.device}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.dim() != 1 or bias.shape[0] != N
                             or bias.device != x.device):
        raise ValueError(f"qlora_linear: bias must be [N={N}] (a tensor) on {x.device}, got "
                         f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__} "
                         f"on {getattr(bias, 'device', '-')}")
    library.check_operand_dtypes("qlora_linear", x, weight, lora_a, lora_b, bias, scale)   # scale's shape too
    if (not torch.is_grad_enabled() and not torch.compiler.is_compiling() and x.dtype != torch.float64
            and (dropout == 0.0 or not training or lora_a is None)):
        # Inference: no graph to record and nothing to save, so skip the Function and the
        # custom-op dispatch and call the op boundary directly (one extension call on the decode
        # route).  Same routes and kernels, so the same numbers as the autograd path; the arguments
        # were checked above, so ``lora_linear``'s checks are not run again.
        dev = x.device.type
        if _autocast_on(dev):
            x = x.to(torch.get_autocast_dtype(dev))
        w = weight if isinstance(weight, NF4Weight) else weight.to(x.dtype)
        with _no_autocast(dev):
            y = library.decode_linear(x, w, lora_a, lora_b, scale, bias) if x.is_cuda else None
            if y is None:
                y = library.forward_2d(x.reshape(-1, K), w, lora_a, lora_b, scale, bias).reshape(*x.shape[:-1], N)
        return y
    sdt = torch.float64 if x.dtype == torch.float64 else torch.float32  # float64: gradcheck
    # (scale's type was checked above) a float stays a Python float: no host-to-device copy per call
    s = scale.to(device=x.device, dtype=sdt) if isinstance(scale, Tensor) else float(scale)

    dev = x.device.type
    if _autocast_on(dev):
        x = x.to(torch.get_autocast_dtype(dev))
    cdt = x.dtype
    if bias is not None:
        bias = bias.to(cdt)
    x2d = x.reshape(-1, K)
    with _no_autocast(dev):
        if isinstance(weight, NF4Weight) and torch.compiler.is_compiling():
            y = QLoRAFunction.apply(x2d, weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code,
                                    weight.offset, weight.code, N, K, weight.blocksize, lora_a, lora_b, s, bias,
                                    float(dropout), bool(training))
        elif isinstance(weight, NF4Weight):
            y = LoRAFunction.apply(x2d, weight, lora_a, lora_b, s, bias, float(dropout), bool(training))
        else:
            y = LoRAFunction.apply(x2d, weight.to(cdt), lora_a, lora_b, s, bias, float(dropout), bool(training))
    return y.reshape(*x.shape[:-1], N)
