"""The bitsandbytes CPU workaround (lora_kernels/integrations/bnb_cpu.py): after it, bitsandbytes'
CPU dequantize agrees with ours on rows that are not a multiple of the blocksize, and a weight that
bitsandbytes repacked for its CPU kernel is refused by NF4Weight.from_bnb."""

import pytest
import torch

import lora_kernels as lk
from lora_kernels.integrations import bnb_cpu

F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")


@pytest.mark.usefixtures("no_dynamo")
@pytest.mark.parametrize("shape,blocksize", [((3, 96), 64), ((33, 64), 128), ((4, 192), 256), ((64, 128), 64)])
def test_bnb_cpu_dequantize_agrees_with_ours(shape, blocksize, rng):
    bnb_cpu.use_portable_bnb_cpu_paths()          # the conftest already did; idempotent
    assert not bnb_cpu.bnb_cpu_dequantize_is_wrong()
    w = torch.randn(shape, generator=rng)
    q = lk.quantize_nf4(w, blocksize, double_quant=True, backend="reference")
    ours = lk.dequantize_nf4(q, backend="reference")
    theirs = F.dequantize_4bit(q.packed, q.to_bnb_quant_state())
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)


def test_from_bnb_refuses_a_cpu_repacked_weight():
    q = lk.quantize_nf4(torch.randn(64, 128), 64, double_quant=True, backend="reference")
    p = q.to_bnb_params()
    p.quant_state.packing_format_for_cpu = True
    with pytest.raises(lk.NF4FormatError, match="repacked this weight"):
        lk.NF4Weight.from_bnb(p)


def test_probe_compiles_nothing():
    # bitsandbytes' portable CPU ops are torch.compile'd; the probe (run by the conftest before the
    # first test, GPU runs included) must run them eagerly instead of compiling them with inductor.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()                         # nothing compiled yet, so a compile would count
    before = dict(counters["stats"])
    bnb_cpu.bnb_cpu_dequantize_is_wrong()
    assert dict(counters["stats"]) == before
