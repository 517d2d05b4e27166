"""A real client end to end: transformers' LlamaForCausalLM (small config) + PEFT, patched to run
its LoRA layers through lora_kernels.  Logits and every LoRA gradient must match PEFT's own path."""

import copy

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from lora_kernels.integrations.peft import patch_peft_model, unpatch_peft_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(seed: int):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).float().eval()


def _peft(model, **kw):
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=kw.pop("lora_dropout", 0.0), target_modules=TARGETS,
                          init_lora_weights=False, **kw)  # random B: the LoRA term is non-zero
    return peft.get_peft_model(model, cfg)


def _to_bnb_nf4(model):
    """Replace the target nn.Linear layers by bitsandbytes nf4 Linear4bit (quantized on the CPU)."""
    bnb = pytest.importorskip("bitsandbytes")
    for name, mod in list(model.named_modules()):
        if type(mod) is torch.nn.Linear and name.split(".")[-1] in TARGETS:
            new = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                    compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
            new.weight = bnb.nn.Params4bit(mod.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                           compress_statistics=True)
            new = new.to("cpu")
            parent = model.get_submodule(name.rpartition(".")[0])
            setattr(parent, name.rpartition(".")[2], new)
    model.is_loaded_in_4bit = True
    return model


def _loss(model, tokens):
    out = model(input_ids=tokens, labels=tokens)
    return out.loss, out.logits


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _count_fused_calls(monkeypatch):
    """Count calls of the fused op from patched layers (so a silent fallback would fail the test)."""
    import lora_kernels.integrations.peft as integ

    calls = []
    real = integ.qlora_linear
    monkeypatch.setattr(integ, "qlora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("base", ["linear", "bnb-nf4"])
def test_patched_model_matches_peft(base, rng, monkeypatch):
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    model = _llama(seed)
    if base == "bnb-nf4":
        model = _to_bnb_nf4(model)
    pm = _peft(model)
    tokens = torch.randint(0, 128, (2, 12), generator=rng)

    loss_ref, logits_ref = _loss(pm, tokens)
    loss_ref.backward()
    grads_ref = _lora_grads(pm)
    pm.zero_grad()

    params_before = {n: p for n, p in pm.named_parameters()}
    report = patch_peft_model(pm)
    assert len(report.patched) == 2 * len(TARGETS) and not report.skipped, str(report)
    assert all(params_before[n] is p for n, p in pm.named_parameters())  # the same Parameter objects

    calls = _count_fused_calls(monkeypatch)
    loss, logits = _loss(pm, tokens)
    assert len(calls) == 2 * len(TARGETS)  # every LoRA layer took the fused path
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)
    loss.backward()
    grads = _lora_grads(pm)
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * 2 * len(TARGETS)
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-3, atol=1e-5, msg=n)

    assert unpatch_peft_model(pm) == 2 * len(TARGETS)
    assert "LoraKernels" not in "".join(type(m).__name__ for m in pm.modules())


@pytest.mark.parametrize("model_kernels", [False, True], ids=["lora", "lora+model-kernels"])
@pytest.mark.parametrize("base", ["linear", "bnb-nf4"])
def test_patched_model_compiles_without_graph_breaks(base, model_kernels, rng):
    """torch.compile(fullgraph=True) traces a patched PEFT Llama -- its bitsandbytes NF4 layers
    included, and with ``patch_model_kernels`` too (its ops trace their PyTorch references; the
    attention's rotary swap is skipped when traced) -- in one graph (aot_eager: dynamo + AOT autograd
    through the registered ops, no code generation), with the eager model's loss and LoRA gradients;
    a new Parameter for a base weight gives a new NF4 view, not the cached one."""
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    model = _llama(seed)
    if base == "bnb-nf4":
        model = _to_bnb_nf4(model)
    pm = _peft(model)
    patch_peft_model(pm)
    if model_kernels:
        from lora_kernels import patch_model_kernels

        rep = patch_model_kernels(pm)
        assert all(rep.patched[k] for k in ("rms_norm", "swiglu", "rope", "loss")), str(rep)
    tokens = torch.randint(0, 128, (2, 12), generator=rng)
    loss_ref, _ = _loss(pm, tokens)
    loss_ref.backward()
    grads_ref = _lora_grads(pm)
    pm.zero_grad()
    for m in pm.modules():   # the first call is the traced one, as in a compiled fine-tune (its cache writes traced)
        m.__dict__.pop("_lk_nf4", None)
    torch._dynamo.reset()
    compiled = torch.compile(pm, fullgraph=True, backend="aot_eager")
    loss, _ = _loss(compiled, tokens)
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    grads = _lora_grads(pm)
    for n in grads_ref:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-4, atol=1e-6, msg=n)
    if base == "bnb-nf4":
        from lora_kernels.integrations.peft import _nf4_of

        layer = pm.base_model.model.model.layers[0].self_attn.q_proj
        view = _nf4_of(layer, layer.get_base_layer())
        w = layer.get_base_layer().weight
        layer.get_base_layer().weight = type(w)(w.data.clone(), requires_grad=False, quant_state=w.quant_state,
                                                quant_type="nf4", compress_statistics=True, module=w.module)
        assert _nf4_of(layer, layer.get_base_layer()) is not view


def test_optimizer_built_before_patch_trains_the_same_tensors(rng):
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    tokens = torch.randint(0, 128, (2, 10), generator=rng)
    a = _peft(_llama(seed))
    b = copy.deepcopy(a)
    opt_b = torch.optim.SGD([p for p in b.parameters() if p.requires_grad], lr=0.1)
    patch_peft_model(b)  # after the optimizer was built
    opt_a = torch.optim.SGD([p for p in a.parameters() if p.requires_grad], lr=0.1)
    for model, opt in ((a, opt_a), (b, opt_b)):
        loss, _ = _loss(model, tokens)
        loss.backward()
        opt.step()
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6, msg=na)


def test_dora_and_disabled_adapters_fall_back(rng, monkeypatch):
    pm = _peft(_llama(0), use_dora=True)
    report = patch_peft_model(pm)
    assert not report.patched and len(report.skipped) == 2 * len(TARGETS)
    assert all("DoRA" in why for why in report.skipped.values()), str(report)

    pm = _peft(_llama(1))
    tokens = torch.randint(0, 128, (1, 8), generator=rng)
    with pm.disable_adapter():
        _, base_logits = _loss(pm, tokens)
    patch_peft_model(pm)
    calls = _count_fused_calls(monkeypatch)
    with pm.disable_adapter():  # PEFT's own path runs: the base model alone
        _, logits = _loss(pm, tokens)
    torch.testing.assert_close(logits, base_logits)
    assert not calls


def test_gradient_checkpointing_and_saved_adapter_loads_in_plain_peft(rng, tmp_path):
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    tokens = torch.randint(0, 128, (2, 12), generator=rng)
    pm = _peft(_llama(seed))
    pm.train()
    patch_peft_model(pm)
    pm.gradient_checkpointing_enable()
    pm.enable_input_require_grads()
    loss, _ = _loss(pm, tokens)
    loss.backward()
    assert all(p.grad is not None for p in pm.parameters() if p.requires_grad)
    pm.eval()
    _, logits = _loss(pm, tokens)
    pm.save_pretrained(tmp_path)
    # plain PEFT, no lora_kernels, loads what the patched model saved
    plain = peft.PeftModel.from_pretrained(_llama(seed), tmp_path).eval()
    _, plain_logits = _loss(plain, tokens)
    torch.testing.assert_close(plain_logits, logits, rtol=1e-4, atol=1e-4)


def test_adalora_layers_are_patched_and_match(rng, monkeypatch):
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    tokens = torch.randint(0, 128, (2, 8), generator=rng)
    cfg = peft.AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             total_step=10, lora_dropout=0.0)
    pm = peft.get_peft_model(_llama(seed), cfg)
    with torch.no_grad():  # AdaLoRA starts with E = 0; give it values so the term matters
        for n, p in pm.named_parameters():
            if "lora_E" in n:
                p.copy_(torch.randn(p.shape, generator=rng))
    loss_ref, logits_ref = _loss(pm, tokens)
    loss_ref.backward()
    grads_ref = _lora_grads(pm)
    pm.zero_grad()
    report = patch_peft_model(pm)
    assert len(report.patched) == 4, str(report)
    calls = _count_fused_calls(monkeypatch)
    loss, logits = _loss(pm, tokens)
    assert len(calls) == 4
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)
    loss.backward()
    for n, g in _lora_grads(pm).items():
        torch.testing.assert_close(g, grads_ref[n], rtol=1e-3, atol=1e-5, msg=n)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, gen, n=8, length=12):
        self.data = torch.randint(0, 128, (n, length), generator=gen)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


@pytest.mark.parametrize("checkpointing,model_kernels", [(False, False), (True, False), (True, True)],
                         ids=["plain", "grad-ckpt", "grad-ckpt+model-kernels"])
def test_transformers_trainer_runs_patched_with_the_same_losses(checkpointing, model_kernels, rng, tmp_path):
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    data = _Tokens(rng)
    losses = {}
    for patched in (False, True):
        pm = _peft(_llama(seed))
        if patched:
            assert len(patch_peft_model(pm).patched) == 2 * len(TARGETS)
            if model_kernels:   # + fused RMSNorm, SwiGLU, rotary, loss (the Trainer passes num_items_in_batch)
                from lora_kernels.integrations.model_kernels import patch_model_kernels

                rep = patch_model_kernels(pm)
                assert len(rep.patched["loss"]) == 1 and len(rep.patched["rms_norm"]) == 5, str(rep)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(patched)), max_steps=3, per_device_train_batch_size=4,
            learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
            gradient_checkpointing=checkpointing, seed=seed, data_seed=seed, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=pm, args=args, train_dataset=data)
        trainer.train()
        losses[patched] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses[True]) == 3
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-3, atol=1e-4)
