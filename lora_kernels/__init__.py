"""lora_kernels: fused NF4 (QLoRA) and LoRA kernels, bitsandbytes-compatible storage.

Public API (this release: the storage format and its kernels):
  quantize_nf4(w, blocksize=64, double_quant=True) -> NF4Weight
  dequantize_nf4(q, dtype=None, out=None) -> Tensor
  NF4Weight (state_dict / from_state_dict in bitsandbytes' keys, from_bnb / to_bnb_params)
  NF4Linear, quantize_model(model, device=...)
  LoRALinear / QLoRALinear (from_linear, from_bnb, merge/unmerge, adapter_state_dict)
  available_backends(device)
  lora_linear(x, weight, lora_a, lora_b, scale, bias) -> y   (fused forward; forward_route() says which kernel)
  qlora_linear(x, weight, lora_a, lora_b, scale, bias, dropout, training) -> y   (differentiable)
  patch_peft_model(peft_model) -> PatchReport; unpatch_peft_model(peft_model)
  add_lora(model, target_modules, r, lora_alpha); save_adapter / load_adapter (PEFT's file format)
  patch_model_kernels(model) -> ModelKernelReport; unpatch_model_kernels(model)   (fused RMSNorm,
      SiLU*mul, rotary embedding and causal-LM loss for Llama/Mistral/Qwen models; lora_kernels.model_ops)
"""

from .autograd import qlora_linear
from .codes import NF4_CODE, dynamic_code, nf4_code
from .convert import quantize_model
from .integrations.adapters import add_lora, load_adapter, save_adapter
from .integrations.model_kernels import ModelKernelReport, patch_model_kernels, unpatch_model_kernels
from .integrations.peft import PatchReport, patch_peft_model, unpatch_peft_model
from .library import (available_backends, backward_route, dequantize_nf4, forward_route, lora_linear, lora_linear_dx,
                      quantize_nf4, select_backend)
from .lora_modules import LoRALinear, QLoRALinear
from .modules import NF4Linear
from .nf4 import NF4FormatError, NF4Weight

__version__ = "0.1.0"

__all__ = [
    "LoRALinear", "QLoRALinear", "NF4_CODE", "add_lora", "load_adapter", "save_adapter", "NF4FormatError", "NF4Linear", "NF4Weight", "available_backends", "dequantize_nf4",
    "PatchReport", "backward_route", "dynamic_code", "forward_route", "lora_linear", "lora_linear_dx", "nf4_code", "patch_peft_model", "qlora_linear",
    "unpatch_peft_model", "quantize_model", "quantize_nf4", "select_backend", "ModelKernelReport",
    "patch_model_kernels", "unpatch_model_kernels",
]
