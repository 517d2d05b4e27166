"""Fused kernels for the *rest* of a decoder layer (not the LoRA linears): RMSNorm, SwiGLU, rotary
embedding, cross-entropy.  A QLoRA training step spends about as much GPU time in these elementwise
and reduction kernels as in the big GEMMs (``benchmarks/NOTES.md``, session 5's fine-tune profile), so
QLoRA layers alone cannot make a whole step much faster than that.

One file per op family, each holding the plain-PyTorch reference (the definition, with the numerics
of transformers' Llama modules), the ``torch.autograd.Function`` over the Triton launchers in
``lora_kernels/triton/<family>.py``, and the public function.  Where each call runs is decided here,
in one place (:func:`use_triton`): Triton for CUDA tensors (and for CPU tensors under
``TRITON_INTERPRET=1``, the CI path), the reference otherwise or when
``LORA_KERNELS_MODEL_OPS=reference``.  ``lora_kernels.integrations.llama`` patches a transformers
model to use them.
"""

from __future__ import annotations

import os

import torch

from .. import _ext


#: the dtypes the model-op kernels read and write (float64 runs the references)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _eager_under_compile(fn):
    """Run ``fn`` eagerly under ``torch.compile`` (a graph break around it): its Triton launchers
    and argument checks are not traceable (dynamo would step into Triton's launcher, or its
    interpreter on the CPU, and fail).  The eager path is the one the GPU tests check."""
    return torch.compiler.disable(fn, recursive=True)


def use_triton(t: torch.Tensor) -> bool:
    """Whether a model op on tensor ``t`` runs the Triton kernels (else the PyTorch reference)."""
    if os.environ.get("LORA_KERNELS_MODEL_OPS", "").lower() == "reference":
        return False
    if t.device.type == "cuda":
        return _ext.triton_available()
    return (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
            and _ext.triton_available())
