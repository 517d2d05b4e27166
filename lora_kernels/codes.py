"""The two lookup tables of the NF4 + double-quantization format (bitsandbytes' values).

``NF4_CODE``: the 16 NormalFloat-4 levels, sorted, in [-1, 1].
``dynamic_code()``: the signed dynamic 8-bit map (256 fp32 values, sorted) that the nested
quantization of the absmax values uses.
Both are plain data; every backend and the reference read them from here.
"""

from __future__ import annotations

import functools

import torch

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

#: bitsandbytes' CUDA kernel decides NF4 indices against decimal literals that nvcc rounds
#: straight to fp32; four of them (indices 0, 8, 12, 14) sit one ulp away from the fp32
#: midpoints that its CPU path (and ``nf4_thresholds``) uses.  Read off the FSETP immediates of
#: its kQuantizeBlockwise SASS (bitsandbytes 0.50.2).  Our GPU quantizers use these.
NF4_THRESHOLDS_CUDA = tuple(float.fromhex(h) for h in (
    "-0x1.b239b2p-1", "-0x1.38a4ep-1", "-0x1.d709p-2", "-0x1.5bd4ecp-2", "-0x1.e079d8p-3",
    "-0x1.1a7178p-3", "-0x1.74f0e2p-5", "0x1.45f5fep-5", "0x1.ec90c6p-4", "0x1.a0cfcp-3",
    "0x1.2b05a8p-2", "0x1.8ea7f2p-2", "0x1.00da06p-1", "0x1.491b5ep-1", "0x1.b913b2p-1"))

#: The nested (double) quantization always uses blocks of 256 absmax values.
NESTED_BLOCKSIZE = 256
#: Block sizes the format allows (bitsandbytes' list).
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Smallest absmax used as a divisor: an all-zero block quantizes to the 0.0 level.
MIN_ABSMAX = 1e-38


@functools.lru_cache(maxsize=None)
def _dynamic_code_values() -> tuple[float, ...]:
    # Signed dynamic map with 7 exponent bits: for i = 0..6 the midpoints of
    # linspace(0.1, 1, 2**i + 1), scaled by 10**(i - 6), both signs, all in fp32 arithmetic;
    # then 0 and 1.  Built exactly the way the format defines it, then sorted.
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (i - 6)
        values += (scale * mids).tolist()
        values += (-scale * mids).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return tuple(sorted(torch.tensor(values, dtype=torch.float32).tolist()))


_on_device: dict[tuple[str, torch.device], torch.Tensor] = {}


def _cache_entry(name: str, values, device) -> torch.Tensor:
    device = torch.device(device)
    key = (name, device)
    if key not in _on_device:
        _on_device[key] = torch.tensor(values() if callable(values) else values, dtype=torch.float32).to(device)
    return _on_device[key]


def _cached(name: str, values, device) -> torch.Tensor:
    """A fresh copy of a table on ``device``, cloned from a per-device cache (no host->device copy
    or sync after the first call; fresh, so that saved state dicts share no storage)."""
    return _cache_entry(name, values, device).clone()


def shared_table(name: str, device: torch.device | str) -> torch.Tensor:
    """The cached table itself ("nf4": [16], "dynamic": [256]) on ``device``, for kernels that read
    it or copy it into fresh outputs.  Shared by every caller: never mutate it or hand it out."""
    return _cache_entry(name, {"nf4": NF4_CODE, "dynamic": _dynamic_code_values}[name], device)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The NF4 levels as an fp32 tensor [16]."""
    return _cached("nf4", NF4_CODE, device)


def nf4_thresholds(device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 midpoints between neighbouring NF4 levels [15]; index = #thresholds strictly below x."""
    code = nf4_code(device)
    return (code[:-1] + code[1:]) * 0.5


def nf4_thresholds_cuda(device: torch.device | str = "cuda") -> torch.Tensor:
    """bitsandbytes' CUDA decision thresholds [15] (see ``NF4_THRESHOLDS_CUDA``)."""
    return _cached("nf4_thresholds_cuda", NF4_THRESHOLDS_CUDA, device)


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed dynamic 8-bit map as an fp32 tensor [256], sorted ascending."""
    return _cached("dynamic", _dynamic_code_values, device)
