"""Cross-entropy over LM logits: transformers' causal-LM loss without the fp32 copy of the logits.

transformers 5's ``ForCausalLMLoss`` (what ``LlamaForCausalLM.forward`` calls as
``self.loss_function``) upcasts the [B·S, V] logits to fp32 and runs ``F.cross_entropy``: with
V = 32000 that is a 4 GB fp32 copy, a 4 GB fp32 log-softmax and a 4 GB fp32 gradient for a
[32, 1024] batch.  :func:`causal_lm_loss` is a drop-in for it (same signature, same labels
handling, same result up to fp32 rounding) that reads the logits in their own dtype: one pass
forward (fp32 online log-sum-exp per row, ``lse`` [T] saved), one pass backward writing the
gradient in the logits' dtype (``lora_kernels/triton/cross_entropy.py`` has the kernels and the
bytes moved).

* :func:`cross_entropy_reference`, :func:`causal_lm_loss_reference`: the plain-PyTorch definition,
  transformers' ``fixed_cross_entropy`` / ``ForCausalLMLoss`` (fp32 upcast, ``F.cross_entropy``).
  One deliberate difference: float64 logits stay float64 (transformers' ``.float()`` would round
  them to fp32), so the reference is also the float64 ground truth and ``gradcheck``-able.
* :class:`CrossEntropyFunction`: the autograd Function over the Triton launchers.
* :func:`cross_entropy` (2-D core) and :func:`causal_lm_loss` (the drop-in): argument checks, then
  the Function where :func:`lora_kernels.model_ops.use_triton` says so (fp16/bf16/fp32 logits),
  else the reference (also for float64 logits).

Results: a 0-d float32 loss (float64 for float64 logits; dividing by a ``num_items_in_batch``
tensor follows torch's type promotion, exactly as transformers does).  Differences from
``F.cross_entropy`` on the Triton path: a target that is neither ``ignore_index`` nor in
``[0, V)`` gives a NaN loss (and NaN gradient row) instead of an error / device assert;
int32 targets are accepted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import KERNEL_DTYPES, _reference_under_compile, refuse_double_backward, use_triton

__all__ = ["cross_entropy", "causal_lm_loss", "cross_entropy_reference", "causal_lm_loss_reference",
           "CrossEntropyFunction"]

_FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)
INDEX_DTYPES = (torch.int64, torch.int32)
_REDUCTIONS = ("mean", "sum")


# =============================================================================================
# Reference (the definition: transformers 5's loss_utils numerics)
# =============================================================================================
def _upcast(logits: torch.Tensor) -> torch.Tensor:
    # transformers: logits.float(); float64 is kept (see the module docstring)
    return logits if logits.dtype == torch.float64 else logits.float()


def cross_entropy_reference(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                            reduction: str = "mean", num_items_in_batch=None) -> torch.Tensor:
    """``F.cross_entropy(logits.float(), target, ignore_index, reduction)``, then ``/ num_items_in_batch``
    when given (transformers' ``fixed_cross_entropy``, which uses reduction "sum" then)."""
    source = _upcast(logits)
    loss = F.cross_entropy(source, target.long(), ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def causal_lm_loss_reference(logits: torch.Tensor, labels: torch.Tensor | None, vocab_size: int,
                             num_items_in_batch=None, ignore_index: int = -100,
                             shift_labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss``: upcast, labels shifted left by one (last position padded
    with ``ignore_index``) unless ``shift_labels`` is given, flatten, cross-entropy ("mean" over
    non-ignored tokens, or "sum" / ``num_items_in_batch``).  Extra kwargs are ignored."""
    logits = _upcast(logits)
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    logits = logits.view(-1, vocab_size)
    shift_labels = shift_labels.view(-1).to(logits.device)
    return cross_entropy_reference(logits, shift_labels, ignore_index,
                                   "sum" if num_items_in_batch is not None else "mean", num_items_in_batch)


# =============================================================================================
# Autograd Function over the Triton launchers
# =============================================================================================
class CrossEntropyFunction(torch.autograd.Function):
    """``loss = Σ_i row_loss_i`` ("sum") or that over the count of non-ignored rows ("mean"), 0-d fp32.

    forward(logits [T, V] fp32/bf16/fp16 with unit last-dim stride, target [T] int64/int32
    contiguous on the same device, ignore_index: int, mean: bool).  Saves (logits -- the same
    tensor, no copy --, target, lse [T] fp32, count of non-ignored rows as a 0-d int64 tensor or
    None); backward writes a new [T, V] gradient in logits' dtype,
    ``grad · (softmax - onehot) / count``, the scale computed on the device (no host sync).
    """

    @staticmethod
    def forward(ctx, logits, target, ignore_index, mean):
        from ..triton.cross_entropy import cross_entropy_forward

        row_loss, lse = cross_entropy_forward(logits, target, ignore_index)
        loss = row_loss.sum()
        count = None
        if mean:
            count = (target != ignore_index).sum()
            loss = loss / count                    # 0 / 0 = NaN when every row is ignored, as torch
        ctx.ignore_index = ignore_index
        ctx.save_for_backward(logits, target, lse, count)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        from ..triton.cross_entropy import cross_entropy_backward
        refuse_double_backward("cross_entropy")

        logits, target, lse, count = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        scale = grad_loss.detach().to(torch.float32).reshape(())
        if count is not None:
            scale = scale / count
        grad_logits = cross_entropy_backward(logits, target, lse, scale.contiguous(), ctx.ignore_index)
        return grad_logits, None, None, None


# =============================================================================================
# Public functions
# =============================================================================================
def _check_int(name: str, v, op: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")


def _check_num_items(num_items_in_batch, op: str) -> None:
    if num_items_in_batch is None:
        return
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"{op}: num_items_in_batch must be a 0-d (one-element) tensor, "
                             f"got shape {tuple(num_items_in_batch.shape)}")
        if num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex():
            raise TypeError(f"{op}: num_items_in_batch must be an integer or float tensor, "
                            f"got {num_items_in_batch.dtype}")
        return
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
        raise TypeError(f"{op}: num_items_in_batch must be None, an int or a 0-d tensor, "
                        f"got {type(num_items_in_batch).__name__}")


def _check_logits(logits, op: str) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{op}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")


def _check_index(name: str, t, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: {name} must be int64 or int32, got {t.dtype}")


def _divide(loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _run_triton(logits2d: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str,
                num_items_in_batch) -> torch.Tensor:
    if logits2d.shape[1] > 1 and logits2d.stride(1) != 1:
        logits2d = logits2d.contiguous()
    if not target.is_contiguous():
        target = target.contiguous()
    if target.dtype == torch.int32 and not -2**31 <= ignore_index < 2**31:
        target = target.long()        # no int32 target equals it: compare in int64, never a wrapped value
    loss = CrossEntropyFunction.apply(logits2d, target, ignore_index, reduction == "mean")
    return _divide(loss, num_items_in_batch)


@_reference_under_compile(cross_entropy_reference)
def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy of [T, V] logits against [T] class indices, computed in fp32 without upcasting the logits.

    logits: [T, V] float32/bfloat16/float16 (float64: runs the reference); row stride may exceed V;
    a last dim without unit stride is made contiguous (a copy).  target: [T] int64/int32 on the
    logits' device.  reduction: "mean" (over rows whose target is not ``ignore_index``; NaN when
    there are none, as torch) or "sum".  num_items_in_batch: optional int or 0-d tensor; the summed
    loss is divided by it (transformers' ``fixed_cross_entropy``), and ``reduction`` must then be
    "sum".  Returns a 0-d float32 tensor equal to ``F.cross_entropy(logits.float(), target, ...)``;
    a target outside [0, V) that is not ignore_index makes the loss NaN (no error, no host sync).
    Backward: a new gradient tensor in logits' dtype (the logits are never modified).
    """
    op = "cross_entropy"
    _check_logits(logits, op)
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be 2-D [T, V], got shape {tuple(logits.shape)}")
    T, V = logits.shape
    if V < 1:
        raise ValueError(f"{op}: logits must have V >= 1 classes, got shape {tuple(logits.shape)}")
    _check_index("target", target, op)
    if tuple(target.shape) != (T,):
        raise ValueError(f"{op}: target must have shape [T={T}] to match logits {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"{op}: target is on {target.device} but logits are on {logits.device}")
    _check_int("ignore_index", ignore_index, op)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be 'mean' or 'sum', got {reduction!r}")
    _check_num_items(num_items_in_batch, op)
    if num_items_in_batch is not None and reduction != "sum":
        raise ValueError(f"{op}: num_items_in_batch divides the summed loss: pass reduction='sum' with it "
                         f"(got reduction={reduction!r})")
    if logits.dtype == torch.float64 or not use_triton(logits):
        return cross_entropy_reference(logits, target, ignore_index, reduction, num_items_in_batch)
    return _run_triton(logits, target, ignore_index, reduction, num_items_in_batch)


@_reference_under_compile(causal_lm_loss_reference)
def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor | None, vocab_size: int,
                   num_items_in_batch=None, ignore_index: int = -100,
                   shift_labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Drop-in for transformers' ``ForCausalLMLoss`` (same signature and result; extra kwargs ignored).

    logits: [..., V] (e.g. [B, S, V]) float32/bfloat16/float16 with V == vocab_size, NOT upcast
    (float64: runs the reference).  labels: [...] int64/int32 with logits' leading shape, shifted
    left by one with the last position set to ``ignore_index``; or ``shift_labels`` (already
    shifted, logits.numel() / V elements), which takes precedence (labels may then be None).
    Labels are moved to the logits' device, as transformers does.  num_items_in_batch: None (mean
    over non-ignored tokens), or an int / 0-d tensor dividing the summed loss.  Returns a 0-d
    float32 loss; its backward writes one new gradient tensor of logits' shape and dtype.
    """
    op = "causal_lm_loss"
    _check_logits(logits, op)
    _check_int("vocab_size", vocab_size, op)
    if logits.dim() < 2:
        raise ValueError(f"{op}: logits must be [..., vocab_size] with at least 2 dims, got shape "
                         f"{tuple(logits.shape)}")
    if vocab_size < 1 or logits.shape[-1] != vocab_size:
        raise ValueError(f"{op}: logits' last dim must equal vocab_size={vocab_size}, got shape "
                         f"{tuple(logits.shape)}")
    _check_int("ignore_index", ignore_index, op)
    _check_num_items(num_items_in_batch, op)
    rows = logits.numel() // vocab_size
    if shift_labels is None:
        _check_index("labels", labels, op)
        if tuple(labels.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"{op}: labels must have logits' leading shape {tuple(logits.shape[:-1])}, "
                             f"got {tuple(labels.shape)}")
    else:
        _check_index("shift_labels", shift_labels, op)
        if shift_labels.numel() != rows:
            raise ValueError(f"{op}: shift_labels must have {rows} elements (logits {tuple(logits.shape)}), "
                             f"got shape {tuple(shift_labels.shape)}")
    if logits.dtype == torch.float64 or not use_triton(logits):
        return causal_lm_loss_reference(logits, labels, vocab_size, num_items_in_batch, ignore_index,
                                        shift_labels)
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    target = shift_labels.reshape(-1).to(logits.device)
    return _run_triton(logits.reshape(-1, vocab_size), target, ignore_index,
                       "sum" if num_items_in_batch is not None else "mean", num_items_in_batch)
