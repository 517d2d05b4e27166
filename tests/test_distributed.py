"""lora_kernels.distributed: QLoRA under FSDP2 (fully_shard) and DDP, on the CPU with gloo.

Multi-process tests spawn 2 processes (torch.multiprocessing, gloo, file:// rendezvous in the
test's tmp dir).  Each worker builds the model twice from the same seed: a single-process
reference trained on the whole global batch, and a distributed copy trained on its half; losses,
LoRA gradients and parameters must agree within fp32 tolerance.  Assertions run inside the
workers (a failure there fails the test through mp.spawn); rank 0 then writes a result file that
the test reads, so a worker that returned early cannot pass silently.
"""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lora_kernels as lk
from lora_kernels.lora_modules import QLoRALinear
from lora_kernels.modules import NF4Linear

WORLD = 2
STEPS = 3
RTOL, ATOL = 1e-5, 1e-6


def _gloo_reason() -> str | None:
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "torch.distributed has no gloo backend"
    return None


def _fsdp2_reason() -> str | None:
    why = _gloo_reason()
    if why:
        return why
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)"
    return None


def _need(reason_fn):
    why = reason_fn()
    if why:
        pytest.skip(why)


def _need_hf():
    for mod in ("transformers", "peft", "bitsandbytes"):
        pytest.importorskip(mod, reason=f"{mod} is not installed")


# ---------------------------------------------------------------------------------------------
# spawning
def _entry(rank: int, world: int, tmp: str, name: str, args: tuple) -> None:
    os.environ.setdefault("LORA_KERNELS_QUIET", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        result = globals()[name](rank, world, tmp, *args)
        dist.barrier()
        if rank == 0:
            with open(os.path.join(tmp, "result.json"), "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _spawn(name: str, tmp_path, *args) -> dict:
    tmp = str(tmp_path)
    result = os.path.join(tmp, "result.json")
    try:
        mp.spawn(_entry, args=(WORLD, tmp, name, args), nprocs=WORLD, join=True)
    except mp.ProcessExitedException as e:
        # Rank 0 writes the result only after a barrier that both ranks reach once their part of the
        # test passed; a worker then killed by a signal (seen once in CI: SIGABRT, "terminate called
        # without an active exception") died in the process group's or the interpreter's teardown,
        # after the test.  Any failure inside the test raises in the worker: no result file, re-raised.
        if e.signal_name is None or not os.path.exists(result):
            raise
        print(f"_spawn({name}): {e} after the result was written (teardown crash; result kept)")
    with open(result) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# models and helpers (run inside the workers and in the single-process tests)
def _tiny_qlora(seed: int, shapes=((64, 128), (128, 45), (45, 33)), tail: int | None = 16) -> nn.Sequential:
    """QLoRALinear layers (odd shapes: 45·33 = 1485 weights, an odd count; lora_B [45, r] and
    lora_A [3, K] do not split evenly over 2 ranks) and an NF4Linear; random B so every LoRA
    gradient is non-zero from the first step."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (k, n) in enumerate(shapes):
        layers.append(QLoRALinear.from_linear(nn.Linear(k, n), r=3 + i % 2, lora_alpha=8))
        nn.init.normal_(layers[-1].lora_B, std=0.2)
        layers.append(nn.Tanh())
    if tail:
        layers.append(NF4Linear.from_linear(nn.Linear(shapes[-1][1], tail)))
    return nn.Sequential(*layers)


def _batch(seed: int, rows: int, k: int, out: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=g), torch.randn(rows, out, generator=g)


def _local(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world)[rank]


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _mean_over_ranks(v: torch.Tensor) -> torch.Tensor:
    v = v.detach().clone()
    dist.all_reduce(v)
    return v / dist.get_world_size()


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n.replace("module.", "", 1) if n.startswith("module.") else n: p
            for n, p in model.named_parameters() if p.requires_grad}


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol=RTOL, atol=ATOL) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _train_reference(ref: nn.Module, batches, loss_fn, lr=1e-2):
    """Single process, whole global batch: per step (loss, {name: grad}); params at the end."""
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=lr)
    out = []
    for b in batches:
        loss = loss_fn(ref, b)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in _trainable(ref).items()}))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


def _train_compare(model: nn.Module, ref_steps, batches, loss_fn, rank, world, lr=1e-2, rtol=RTOL, atol=ATOL,
                   on_step=None) -> list[float]:
    """Train ``model`` on this rank's share of each global batch; compare with the reference."""
    params = _trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step, (b, (ref_loss, ref_grads)) in enumerate(zip(batches, ref_steps)):
        local = tuple(_local(t, rank, world) for t in b)
        loss = loss_fn(model, local)
        loss.backward()
        glob = _mean_over_ranks(loss)
        _close(glob, ref_loss, f"step {step} loss", rtol, atol)
        assert set(params) == set(ref_grads), (sorted(params), sorted(ref_grads))
        for n, p in params.items():
            assert p.grad is not None, f"step {step}: {n} got no gradient"
            _close(_full(p.grad), ref_grads[n], f"step {step} grad {n}", rtol, atol)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_step:
            on_step(step)
        losses.append(glob.item())
    return losses


def _mse(model, b):
    x, y = b
    return nn.functional.mse_loss(model(x), y)


def _nf4_of_ref(ref: nn.Module) -> dict[str, lk.NF4Weight]:
    return {n: m.weight for n, m in ref.named_modules() if isinstance(m, (QLoRALinear, NF4Linear))}


def _same_nf4(a: lk.NF4Weight, b: lk.NF4Weight) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return (set(ta) == set(tb) and a.shape == b.shape and a.dtype == b.dtype and a.blocksize == b.blocksize
            and all(t.dtype == tb[k].dtype and torch.equal(t.reshape(-1), tb[k].reshape(-1)) for k, t in ta.items()))


def _watch_forward_weights(model: nn.Module, ref_weights: dict[str, lk.NF4Weight], seen: list) -> None:
    """A forward pre-hook on every flat NF4 layer: the NF4Weight the layer computes with, after
    FSDP2's all-gather, must be the unsharded reference weight, byte for byte."""
    from lora_kernels.distributed import _FlatNF4Mixin

    for name, mod in model.named_modules():
        if isinstance(mod, _FlatNF4Mixin):
            def hook(m, args, name=name):
                w = m.weight
                seen.append((name, _same_nf4(w, ref_weights[name]), m.nf4_data.dtype == torch.uint8))
            mod.register_forward_pre_hook(hook)


def _padded_bytes(shape, elsize: int, world: int) -> int:
    rows = -(-shape[0] // world) * world
    return rows * math.prod(shape[1:]) * elsize


def _nf4_storage_bytes(shape, blocksize=64) -> int:
    """Bytes of an NF4 weight with double quantization, from the format's definition."""
    n = math.prod(shape)
    nb = -(-n // blocksize)
    return (n + 1) // 2 + nb + 4 * (-(-nb // 256)) + 4


# ---------------------------------------------------------------------------------------------
# workers
def _w_fsdp2_qlora(rank, world, tmp):
    from torch.distributed.tensor import DTensor

    from lora_kernels.distributed import NF4DistributedError, prepare_fsdp2

    ref = _tiny_qlora(0)
    model = copy.deepcopy(ref)
    ref_weights = _nf4_of_ref(ref)
    batches = [_batch(100 + s, 8, 64, 16) for s in range(STEPS)]
    ref_steps = _train_reference(ref, batches, _mse)

    prepare_fsdp2(model)
    seen: list = []
    _watch_forward_weights(model, ref_weights, seen)
    # outside forward only this rank's shard of the bytes is here, and the weight says so
    for name, mod in model.named_modules():
        if name in ref_weights:
            flat = mod.nf4_data
            assert isinstance(flat, DTensor) and flat.dtype == torch.uint8 and not flat.requires_grad
            full = mod._nf4_layout.nbytes
            assert flat.to_local().numel() == len(range(full)[rank * -(-full // world):(rank + 1) * -(-full // world)])
            with pytest.raises(NF4DistributedError, match="sharded by FSDP2"):
                mod.weight
    losses = _train_compare(model, ref_steps, batches, _mse, rank, world)
    assert len(seen) == STEPS * len(ref_weights), seen
    assert all(ok and u8 for _, ok, u8 in seen), [s for s in seen if not (s[1] and s[2])]
    # after training, the LoRA parameters match the reference's
    refp = _trainable(ref)
    for n, p in _trainable(model).items():
        _close(_full(p.detach()), refp[n].detach(), f"param {n} after {STEPS} steps", 1e-4, 1e-5)
    return {"losses": losses, "forwards_checked": len(seen)}


def _w_fsdp2_bytes(rank, world, tmp):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from lora_kernels.distributed import attach_all_gather_meter, nf4_all_gather_bytes, prepare_fsdp2

    shapes = ((256, 256), (256, 512), (512, 256))
    out = {}
    for tag, mp_policy in (("fp32", None),
                           ("bf16", MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))):
        ref = _tiny_qlora(1, shapes=shapes, tail=None)
        ref_weights = _nf4_of_ref(ref)
        model = copy.deepcopy(ref)
        # every parameter of every group, from the reference (unsharded) model: the test's own
        # count of what FSDP2 must all-gather (each NF4 layer is its own group; the root is empty)
        expected_total = 0
        expected_base = 0
        for name, mod in ref.named_modules():
            if name in ref_weights:
                w = ref_weights[name]
                base = _padded_bytes((_nf4_storage_bytes(w.shape),), 1, world)  # layouts here need no padding
                others = sum(_padded_bytes(tuple(p.shape), 2 if tag == "bf16" else 4, world)
                             for p in mod.parameters())
                expected_total += 2 * (base + others)      # forward + backward re-gather
                expected_base += 2 * base
        prepare_fsdp2(model, mp_policy=mp_policy)
        stats = nf4_all_gather_bytes(model)
        meter = attach_all_gather_meter(model)
        seen: list = []
        _watch_forward_weights(model, ref_weights, seen)
        lora_dtypes = set()
        model[0].register_forward_pre_hook(lambda m, a: lora_dtypes.add(m.lora_A.dtype))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        per_step = []
        for s in range(2):
            x, y = _batch(200 + s, 8, 256, 256)
            meter.reset()
            loss = _mse(model, (_local(x, rank, world), _local(y, rank, world)))
            loss.backward()
            opt.step()
            opt.zero_grad()
            per_step.append((meter.base_bytes, meter.total_bytes, meter.calls))
            assert torch.isfinite(loss)
        assert all(ok and u8 for _, ok, u8 in seen) and len(seen) == 2 * len(ref_weights), seen
        assert lora_dtypes == {torch.bfloat16 if tag == "bf16" else torch.float32}, lora_dtypes
        params = sum(w.numel for w in ref_weights.values())
        storage = sum(_nf4_storage_bytes(w.shape) for w in ref_weights.values())
        assert stats.params == params and stats.storage_bytes == storage, (stats, params, storage)
        assert stats.flat_bytes == storage and stats.gathered_bytes == storage  # no padding for these shapes
        assert stats.bytes_per_step == expected_base == 2 * storage
        for base_b, total_b, calls in per_step:
            assert base_b == stats.bytes_per_step, (base_b, stats)
            assert total_b == expected_total, (total_b, expected_total)
            assert calls == 2 * len(ref_weights), calls
        nf4_bits = sum(w.bits_per_param * w.numel for w in ref_weights.values()) / params
        assert abs(stats.bits_per_param - nf4_bits) < 1e-12
        assert 4.127 < stats.bits_per_param < 4.128, stats.bits_per_param
        out[tag] = {"bits_per_param": stats.bits_per_param, "base_bytes_per_step": per_step[0][0],
                    "total_bytes_per_step": per_step[0][1]}
    # mixed precision moves exactly the same base bytes: the uint8 storage is not cast
    assert out["bf16"]["base_bytes_per_step"] == out["fp32"]["base_bytes_per_step"]
    assert out["bf16"]["total_bytes_per_step"] < out["fp32"]["total_bytes_per_step"]
    return out


def _w_fsdp2_dcp(rank, world, tmp):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from lora_kernels.distributed import NF4DistributedError, prepare_fsdp2

    ckpt = os.path.join(tmp, "ckpt")
    model = prepare_fsdp2(_tiny_qlora(0))
    x, y = _batch(7, 8, 64, 16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _mse(model, (_local(x, rank, world), _local(y, rank, world))).backward()
    opt.step()
    probe = _batch(8, 4, 64, 16)[0]
    with torch.no_grad():
        want = model(probe)
    sd = get_model_state_dict(model)
    assert sd["0.nf4_data"].dtype == torch.uint8 and "0._extra_state" in sd
    dcp.save(sd, checkpoint_id=ckpt)

    # a model with another base (seed 5) and other adapters: different outputs until loaded
    fresh = prepare_fsdp2(_tiny_qlora(5))
    with torch.no_grad():
        assert not torch.allclose(fresh(probe), want)
    sd2 = get_model_state_dict(fresh)
    dcp.load(sd2, checkpoint_id=ckpt)
    set_model_state_dict(fresh, sd2)
    with torch.no_grad():
        got = fresh(probe)
    assert torch.equal(got, want), (got - want).abs().max()

    # another byte count, or the same byte count with another layout: refused
    other = prepare_fsdp2(_tiny_qlora(0, shapes=((64, 64), (64, 45), (45, 33))))
    sd3 = {k: v for k, v in get_model_state_dict(other).items() if k == "0.nf4_data"}
    with pytest.raises(CheckpointException, match=r"Size mismatch .* for 0\.nf4_data"):
        dcp.load(sd3, checkpoint_id=ckpt)  # another byte count: DCP refuses (CheckpointException is a BaseException)
    swapped = prepare_fsdp2(_tiny_qlora(0, shapes=((128, 64), (64, 45), (45, 33))))  # layer 0: 64x128, not 128x64
    sd4 = {k: v for k, v in get_model_state_dict(swapped).items() if k in ("0.nf4_data", "0._extra_state")}
    assert sd4["0.nf4_data"].shape == sd["0.nf4_data"].shape
    dcp.load(sd4, checkpoint_id=ckpt)
    with pytest.raises(NF4DistributedError, match="layout"):
        set_model_state_dict(swapped, sd4, options=_partial())
    return {"max_diff": (got - want).abs().max().item()}


def _partial():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(strict=False)


def _llama_parts():
    from lora_kernels import finetune

    cfg = finetune.DemoConfig(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=160, seq_len=32, batch=4,
                              r=4, alpha=8, seed=3)
    tok = finetune.CharTokenizer(finetune.TEXT)
    ids = torch.tensor(tok.encode(finetune.TEXT))
    gen = torch.Generator().manual_seed(11)
    it = finetune._batches(ids, cfg, gen)
    batches = [(next(it),) for _ in range(STEPS)]
    return finetune, cfg, tok, batches


def _peft_llama(finetune, cfg, tok, patch=True):
    import peft

    from lora_kernels.integrations.peft import patch_peft_model

    base, _ = finetune.quantize_base(finetune.build_base(cfg, len(tok)), torch.device("cpu"))
    torch.manual_seed(cfg.seed + 1)
    model = peft.get_peft_model(base, peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=finetune.TARGETS,
                                                      init_lora_weights=False))
    if patch:
        report = patch_peft_model(model)
        assert len(report.patched) == cfg.layers * len(finetune.TARGETS), report
    return model.train()


def _lm_loss(model, b):
    (x,) = b
    return model(input_ids=x, labels=x).loss


def _w_fsdp2_llama(rank, world, tmp):
    from lora_kernels.distributed import FlatNF4Linear, nf4_all_gather_bytes, prepare_fsdp2

    finetune, cfg, tok, batches = _llama_parts()
    ref = _peft_llama(finetune, cfg, tok)
    ref_steps = _train_reference(ref, batches, _lm_loss)
    model = _peft_llama(finetune, cfg, tok)
    prepare_fsdp2(model)
    bases = [m for m in model.modules() if isinstance(m, FlatNF4Linear)]
    assert len(bases) == cfg.layers * len(finetune.TARGETS)
    blocks = [type(m).__name__ for m in model.modules() if type(m).__name__.startswith("FSDP")]
    assert blocks.count("FSDPLlamaDecoderLayer") == cfg.layers, blocks
    losses = _train_compare(model, ref_steps, batches, _lm_loss, rank, world, rtol=1e-5, atol=1e-5)
    stats = nf4_all_gather_bytes(model)
    assert 4.12 < stats.bits_per_param < 4.2 and stats.bytes_per_step == 2 * stats.gathered_bytes, stats
    return {"losses": losses, "bits_per_param": stats.bits_per_param}


def _w_ddp(rank, world, tmp, llama: bool):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from lora_kernels.distributed import prepare_ddp

    if llama:
        finetune, cfg, tok, batches = _llama_parts()
        ref = _peft_llama(finetune, cfg, tok)
        model = _peft_llama(finetune, cfg, tok)
        loss_fn = _lm_loss
    else:
        ref = _tiny_qlora(0)
        model = copy.deepcopy(ref)
        batches = [_batch(100 + s, 8, 64, 16) for s in range(STEPS)]
        loss_fn = _mse
    ref_steps = _train_reference(ref, batches, loss_fn)
    nf4_bytes = {t.data_ptr() for m in model.modules() for t in _base_tensors(m)}
    assert nf4_bytes
    if not llama:  # flat NF4 parameters (as for FSDP2): prepare_ddp turns them back into attributes
        from lora_kernels.distributed import nf4_to_parameters

        nf4_to_parameters(model)
        nf4_bytes = {m.nf4_data.data_ptr() for m in model.modules() if hasattr(m, "_nf4_layout")}
        assert len(nf4_bytes) == 4

    # what DDP broadcasts at construction (module states from rank 0)
    broadcast: list[torch.Tensor] = []
    real = dist._broadcast_coalesced

    def spy(pg, tensors, *a, **k):
        broadcast.extend(tensors)
        return real(pg, tensors, *a, **k)

    dist._broadcast_coalesced = spy
    try:
        ddp = prepare_ddp(model)
    finally:
        dist._broadcast_coalesced = real
    assert not any(t.data_ptr() in nf4_bytes for t in broadcast), "the NF4 base was broadcast"
    assert not any(n.endswith("nf4_data") for n, _ in model.named_parameters()), "a flat NF4 parameter is left"
    assert all(t.dtype.is_floating_point for t in broadcast), {t.dtype for t in broadcast}

    reduced: list[list[int]] = []

    def hook(state, bucket):
        reduced[-1].extend(id(p) for p in bucket.parameters())
        assert bucket.buffer().dtype.is_floating_point
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)
    per_step_broadcasts = []
    real_bc = ddp._distributed_broadcast_coalesced
    ddp._distributed_broadcast_coalesced = lambda *a, **k: (per_step_broadcasts.append(1), real_bc(*a, **k))[1]
    lora_ids = {id(p) for p in model.parameters() if p.requires_grad}

    def on_step(step):
        got = reduced[-1]
        assert sorted(got) == sorted(lora_ids), "DDP reduced something else than the LoRA parameters"
        reduced.append([])

    reduced.append([])
    losses = _train_compare(ddp, ref_steps, batches, loss_fn, rank, world, rtol=1e-5, atol=1e-5, on_step=on_step)
    assert per_step_broadcasts == []
    lora_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"losses": losses, "reduced_params_per_step": len(lora_ids), "reduced_numel": lora_numel,
            "broadcast_at_init": sum(t.numel() for t in broadcast)}


def _base_tensors(mod: nn.Module):
    """The NF4 base's tensors of a layer (our attribute, or bitsandbytes' Params4bit + quant state)."""
    if isinstance(mod, (QLoRALinear, NF4Linear)):
        return list(mod.weight.tensors().values())
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    if isinstance(mod, bnb.nn.Linear4bit):
        return list(lk.NF4Weight.from_bnb(mod.weight).tensors().values())
    return []


def _w_mismatched_bases(rank, world, tmp):
    from lora_kernels.distributed import NF4DistributedError, prepare_ddp, prepare_fsdp2

    seen = {}
    for what, fn in (("ddp", prepare_ddp), ("fsdp2", prepare_fsdp2)):
        model = _tiny_qlora(0)
        if rank == 1:  # one base byte differs on rank 1, in the last QLoRA layer
            model[4].weight.packed.view(-1)[7] ^= 0x11
        with pytest.raises(NF4DistributedError, match=r"differs between ranks in 1 layer\(s\): \['4'\]"):
            fn(model)
        seen[what] = True
    return seen


# ---------------------------------------------------------------------------------------------
# the tests
def test_fsdp2_qlora_layers_match_single_process(tmp_path):
    _need(_fsdp2_reason)
    res = _spawn("_w_fsdp2_qlora", tmp_path)
    assert len(res["losses"]) == STEPS and res["forwards_checked"] == STEPS * 4


def test_fsdp2_all_gathers_4bit_bytes_also_under_bf16_mixed_precision(tmp_path):
    _need(_fsdp2_reason)
    res = _spawn("_w_fsdp2_bytes", tmp_path)
    assert 4.127 < res["fp32"]["bits_per_param"] < 4.128
    assert res["bf16"]["base_bytes_per_step"] == res["fp32"]["base_bytes_per_step"]


def test_fsdp2_sharded_checkpoint_round_trip(tmp_path):
    _need(_fsdp2_reason)
    res = _spawn("_w_fsdp2_dcp", tmp_path)
    assert res["max_diff"] == 0.0


def test_fsdp2_patched_peft_llama_matches_single_process(tmp_path):
    _need(_fsdp2_reason)
    _need_hf()
    res = _spawn("_w_fsdp2_llama", tmp_path)
    assert len(res["losses"]) == STEPS


@pytest.mark.parametrize("llama", [False, True], ids=["qlora-layers", "peft-llama"])
def test_ddp_reduces_only_lora_and_matches_single_process(tmp_path, llama):
    _need(_gloo_reason)
    if llama:
        _need_hf()
    res = _spawn("_w_ddp", tmp_path, llama)
    assert len(res["losses"]) == STEPS and res["reduced_params_per_step"] > 0


def test_bases_that_differ_between_ranks_are_refused(tmp_path):
    _need(_fsdp2_reason)
    assert _spawn("_w_mismatched_bases", tmp_path) == {"ddp": True, "fsdp2": True}


# ---------------------------------------------------------------------------------------------
# single process: the flat parameter itself, bad input
def test_flat_parameter_round_trip_is_exact():
    from lora_kernels.distributed import FlatNF4Linear, FlatNF4QLoRALinear, nf4_from_parameters, nf4_to_parameters

    model = _tiny_qlora(0)
    ref = copy.deepcopy(model)
    x = torch.randn(5, 64)
    keep = {n: p for n, p in model.named_parameters()}
    assert nf4_to_parameters(model) == ["0", "2", "4", "6"]
    assert [type(model[i]) for i in (0, 2, 4, 6)] == [FlatNF4QLoRALinear] * 3 + [FlatNF4Linear]
    for n, p in keep.items():  # bias and LoRA are the same Parameter objects
        assert dict(model.named_parameters())[n] is p
    for name, w in _nf4_of_ref(ref).items():
        mod = model.get_submodule(name)
        assert mod.nf4_data.dtype == torch.uint8 and not mod.nf4_data.requires_grad
        assert mod.nf4_data.numel() == mod._nf4_layout.nbytes < mod._nf4_layout.storage_bytes + 31
        assert mod._nf4_layout.storage_bytes == _nf4_storage_bytes(w.shape)
        assert _same_nf4(mod.weight, w)
        assert "weight" not in mod.__dict__
    assert torch.equal(model(x), ref(x))
    y = model(x).sum()
    y.backward()
    assert model[0].nf4_data.grad is None and model[0].lora_A.grad is not None
    assert nf4_to_parameters(model) == []  # already flat
    sd_keys = set(model.state_dict())
    assert {"0.nf4_data", "0._extra_state", "0.lora_A", "6.nf4_data"} <= sd_keys and "0.weight.absmax" not in sd_keys
    # a second model loads that state dict (bytes and layout) with plain load_state_dict
    other = _tiny_qlora(9)
    nf4_to_parameters(other)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other(x), model(x))
    # back to ordinary layers: bitsandbytes keys again, same outputs
    assert nf4_from_parameters(model) == ["0", "2", "4", "6"]
    assert [type(model[i]) for i in (0, 2, 4, 6)] == [QLoRALinear] * 3 + [NF4Linear]
    assert "0.weight.absmax" in model.state_dict() and torch.equal(model(x), ref(x))
    assert model[0].merge()["rel_error"] >= 0  # merge works again


def test_flat_layer_errors():
    from lora_kernels.distributed import NF4DistributedError, nf4_to_parameters
    from lora_kernels.distributed import NF4FlatLayout

    model = _tiny_qlora(0)
    nf4_to_parameters(model)
    with pytest.raises(NF4DistributedError, match="merge"):
        model[0].merge()
    with pytest.raises(NF4DistributedError, match="cannot be replaced"):
        model[0].weight = _nf4_of_ref(_tiny_qlora(0))["0"]
    n = model[0]._nf4_layout.nbytes
    assert n == _nf4_storage_bytes((128, 64)) == 4232
    with pytest.raises(NF4DistributedError, match=rf"uint8 \[{n}\], got torch.uint8 \({n - 1},\)"):
        model[0]._nf4_layout.unpack(torch.zeros(n - 1, dtype=torch.uint8))
    bad = copy.deepcopy(model)
    bad.load_state_dict(model.state_dict())  # its own layout loads
    sd = model.state_dict()
    sd["0._extra_state"] = {"nf4_layout": dict(sd["0._extra_state"]["nf4_layout"], shape=[64, 128])}
    with pytest.raises(NF4DistributedError, match="layout"):
        bad.load_state_dict(sd)
    # a merged layer, a meta weight, a layer passed instead of the model
    merged = _tiny_qlora(0)
    merged[2].merge()
    with pytest.raises(NF4DistributedError, match="merged.*unmerge"):
        nf4_to_parameters(merged)
    single = _tiny_qlora(0)[0]
    assert nf4_to_parameters(single) == [""] and single.nf4_data.dtype == torch.uint8  # a layer by itself
    meta = _tiny_qlora(0)
    meta[0].weight = meta[0].weight.to("meta")
    with pytest.raises(NF4DistributedError, match="meta device"):
        nf4_to_parameters(meta)
    assert isinstance(NF4FlatLayout.of(_nf4_of_ref(_tiny_qlora(0))["0"]), NF4FlatLayout)


def test_prepare_without_process_group_or_on_the_wrong_device(tmp_path):
    from lora_kernels.distributed import (NF4DistributedError, check_nf4_bases_match, nf4_all_gather_bytes,
                                          nf4_to_parameters, prepare_ddp, prepare_fsdp2)

    _need(_fsdp2_reason)
    assert not dist.is_initialized()
    for fn in (prepare_fsdp2, prepare_ddp, check_nf4_bases_match):
        with pytest.raises(NF4DistributedError, match="init_process_group"):
            fn(_tiny_qlora(0))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdv", rank=0, world_size=1)
    try:
        model = _tiny_qlora(0)
        nf4_to_parameters(model)
        model[2].to("meta")  # one layer on another device than the mesh (cpu)
        with pytest.raises(NF4DistributedError, match=r"not on the mesh's device type 'cpu': 2 on meta"):
            prepare_fsdp2(model)
        with pytest.raises(NF4DistributedError, match="call prepare_fsdp2"):
            nf4_all_gather_bytes(_tiny_qlora(0))
        frozen = _tiny_qlora(0)
        frozen.requires_grad_(False)
        with pytest.raises(NF4DistributedError, match="no trainable parameter"):
            prepare_ddp(frozen)
        ok = prepare_fsdp2(_tiny_qlora(0))  # world size 1 works (FSDP2 then communicates nothing)
        st = nf4_all_gather_bytes(ok)
        assert (st.world_size, st.layers, st.gathered_bytes, st.bytes_per_step) == (1, 4, 0, 0), st
        with pytest.raises(NF4DistributedError, match="already has fully_shard"):  # and twice is refused
            prepare_fsdp2(ok)
    finally:
        dist.destroy_process_group()


def test_peft_model_with_flat_bases_computes_the_same(no_dynamo):
    """nf4_to_parameters on a patched PEFT model (bitsandbytes bases, compute_dtype bf16 while the
    activations are fp32): same logits, bit for bit, as before; bias Parameters kept."""
    _need_hf()
    from lora_kernels.distributed import FlatNF4Linear, nf4_to_parameters

    finetune, cfg, tok, batches = _llama_parts()
    model = _peft_llama(finetune, cfg, tok)
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = torch.bfloat16
    (x,) = batches[0]
    with torch.no_grad():
        want = model(input_ids=x).logits
    names = nf4_to_parameters(model)
    assert len(names) == cfg.layers * len(finetune.TARGETS) and all(n.endswith("base_layer") for n in names)
    bases = [model.get_submodule(n) for n in names]
    assert all(type(b) is FlatNF4Linear and b.compute_dtype == torch.bfloat16 for b in bases)
    with torch.no_grad():
        got = model(input_ids=x).logits
    assert torch.equal(got, want), (got - want).abs().max()
    from lora_kernels.distributed import NF4DistributedError

    lone = bnb.nn.Linear4bit(64, 32, quant_type="nf4", compute_dtype=torch.float32)
    with pytest.raises(NF4DistributedError, match="not the layer itself"):
        nf4_to_parameters(lone)


def test_example_script_runs_under_torchrun(tmp_path):
    """examples/fsdp2_qlora_finetune.py, 2 processes on the CPU (gloo), a tiny config."""
    _need(_fsdp2_reason)
    _need_hf()
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", LORA_KERNELS_QUIET="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(root, "examples", "fsdp2_qlora_finetune.py"), "--device", "cpu", "--steps", "3",
           "--hidden", "64", "--layers", "2", "--intermediate", "160", "--seq-len", "32", "--batch", "4",
           "--save", str(tmp_path / "ckpt")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    steps = re.findall(r"step +(\d+) +loss (\S+) +all-gathered for the NF4 base \S+ MiB \(2 all-gathers x "
                       r"(\S+) bits/param\)", out.stdout)
    assert [int(s[0]) for s in steps] == [1, 2, 3], out.stdout
    assert all(math.isfinite(float(s[1])) and 4.12 < float(s[2]) < 4.2 for s in steps), steps
    assert "tokens/s" in out.stdout and (tmp_path / "ckpt" / ".metadata").exists()
