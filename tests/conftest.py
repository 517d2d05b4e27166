"""Shared test setup.

* Without CUDA, Triton kernels run through the interpreter (TRITON_INTERPRET=1 must be set before
  triton is imported, so it is set here).  The interpreter gets bf16 wrong: bf16 cases are GPU-only.
* ``@pytest.mark.gpu`` tests are skipped without CUDA; on the GPU run them with ``pytest -m gpu``.
* ``rng`` gives each test a freshly seeded generator and prints the seed on failure.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LORA_KERNELS_QUIET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _bnb_portable_cpu_paths():
    """bitsandbytes 0.50's native CPU NF4 dequantize is wrong on some CPUs (AVX512-BF16 hosts; see
    lora_kernels/integrations/bnb_cpu.py): compare against its portable path there."""
    from lora_kernels.integrations.bnb_cpu import use_portable_bnb_cpu_paths

    use_portable_bnb_cpu_paths()
    yield


@pytest.fixture
def rng():
    """A generator with a fresh seed; pytest shows the printed seed when the test fails."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"rng seed: {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def no_dynamo():
    """bitsandbytes' CPU dequantize is wrapped in torch.compile; compiling per shape is slow on CPU."""
    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = old


def bnb_cpu_available():
    try:
        import bitsandbytes  # noqa: F401
        import bitsandbytes.functional  # noqa: F401
    except Exception:
        return False
    return True


def randn(shape, dtype, gen, device="cpu", scale=1.0):
    """Fresh normal data drawn on the CPU from ``gen`` (reproducible from its seed)."""
    return (torch.randn(shape, generator=gen) * scale).to(dtype=dtype, device=device)


def bad_dtype_cases(x, weight, dense, a, b):
    """(args, kwargs, error, message) of calls with an integer operand, a non-finite or integer
    scale, or a non-tensor adapter: shared by qlora_linear's and lora_linear's tests."""
    i64 = torch.int64
    return [((x.to(torch.int32), weight, a, b), {}, TypeError, "x must be float32, bfloat16 or float16"),
            ((x, dense.to(torch.int8), a, b), {}, TypeError, "weight must be a floating-point tensor"),
            ((x, weight, a.to(i64), b), {}, TypeError, "lora_a must be a floating-point tensor"),
            ((x, weight, a, b.to(i64)), {}, TypeError, "lora_b must be a floating-point tensor"),
            ((x, weight, a, b), {"bias": torch.ones(b.shape[0], dtype=i64)}, TypeError,
             "bias must be a floating-point tensor"),
            ((x, weight, a, b, float("nan")), {}, ValueError, "scale must be finite, got nan"),
            ((x, weight, a, b, float("-inf")), {}, ValueError, "scale must be finite, got -inf"),
            ((x, weight, a, b, torch.tensor(2)), {}, TypeError, "a scale tensor must be floating point"),
            ((x, weight, a.tolist(), b), {}, TypeError, "lora_a and lora_b must be tensors, got list")]


def edit_quant_state(sd, none_deletes: bool, **changes):
    """``sd`` (an NF4 state dict under the prefix "weight") with its quant_state JSON updated by
    ``changes``; ``none_deletes``: a None value removes the field instead of writing JSON null."""
    import json

    key = "weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(sd[key].tolist()))
    meta.update(changes)
    if none_deletes:
        for k in [k for k, v in changes.items() if v is None]:
            del meta[k]
    sd[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return sd
