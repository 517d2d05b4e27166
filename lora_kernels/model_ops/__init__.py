"""Fused kernels for the *rest* of a decoder layer (not the LoRA linears): RMSNorm, SwiGLU, rotary
embedding, cross-entropy.  A QLoRA training step spends about as much GPU time in these elementwise
and reduction kernels as in the big GEMMs (``benchmarks/NOTES.md``, session 5's fine-tune profile), so
QLoRA layers alone cannot make a whole step much faster than that.

One file per op family, each holding the plain-PyTorch reference (the definition, with the numerics
of transformers' Llama modules), the ``torch.autograd.Function`` over the Triton launchers in
``lora_kernels/triton/<family>.py``, and the public function.  Where each call runs is decided here,
in one place (:func:`use_triton`): Triton for CUDA tensors (and for CPU tensors under
``TRITON_INTERPRET=1``, the CI path), the reference otherwise or when
``LORA_KERNELS_MODEL_OPS=reference``; under ``torch.compile`` every op traces its reference instead
(:func:`_reference_under_compile`: inductor fuses it, and the graph does not break).
``lora_kernels.integrations.model_kernels`` (``patch_model_kernels``) patches a transformers model to use them.
"""

from __future__ import annotations

import functools
import os

import torch

from .. import _ext


#: the dtypes the model-op kernels read and write (float64 runs the references)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _reference_under_compile(reference):
    """Decorator for a public model op: under ``torch.compile`` the op traces ``reference`` (its
    plain-PyTorch definition, transformers' numerics) into the graph, where inductor fuses it like
    the unpatched model's code -- no graph break; eagerly it runs the decorated function (the Triton
    kernels where they apply, after its argument checks).  Triton's launchers are not traceable, and
    a graph break per op split a patched decoder into dozens of graphs (session 10)."""
    def wrap(fn):
        @functools.wraps(fn)
        def op(*args, **kwargs):
            if torch.compiler.is_compiling():
                return reference(*args, **kwargs)
            return fn(*args, **kwargs)
        return op
    return wrap


def use_triton(t: torch.Tensor) -> bool:
    """Whether a model op on tensor ``t`` runs the Triton kernels (else the PyTorch reference)."""
    if os.environ.get("LORA_KERNELS_MODEL_OPS", "").lower() == "reference":
        return False
    if t.device.type == "cuda":
        return _ext.triton_available()
    return (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
            and _ext.triton_available())


def refuse_double_backward(op: str) -> None:
    """Called first in a kernel Function's backward: RuntimeError under ``create_graph=True`` (grad
    mode on inside backward), since the kernels' gradient has no graph of its own and a second
    derivative through it would be silently dropped."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: the Triton kernels' backward cannot be differentiated again "
                           "(create_graph=True); unpatch the model or run the op's reference")
