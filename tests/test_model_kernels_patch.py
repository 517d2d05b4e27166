"""``patch_model_kernels`` on a real client: transformers' LlamaForCausalLM (small config, fp32 on
the CPU, so the fused model ops run as Triton kernels through the interpreter), alone and under PEFT
with ``patch_peft_model``.  Logits, loss and every gradient must match the unpatched model; each
fused op must actually be called; unpatching restores the model and the rotary function."""

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import lora_kernels.integrations.model_kernels as mk  # noqa: E402
from lora_kernels import model_ops  # noqa: E402
from lora_kernels.integrations.peft import patch_peft_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = 2


def _llama(seed: int, **cfg_kw):
    cfg = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg.update(cfg_kw)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).float()


def _seed(rng):
    return int(torch.randint(0, 2**31, (1,), generator=rng))


def _step(model, tokens):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=tokens, labels=tokens)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


def _count_calls(monkeypatch):
    """Count calls of each fused op as the patched modules reach them (a silent fallback fails)."""
    calls = {k: 0 for k in mk.KINDS}
    for kind, attr in (("rms_norm", "rms_norm"), ("swiglu", "silu_mul"), ("rope", "apply_rotary"),
                       ("loss", "causal_lm_loss")):
        real = getattr(mk, attr)

        def counted(*a, _real=real, _kind=kind, **k):
            calls[_kind] += 1
            return _real(*a, **k)
        monkeypatch.setattr(mk, attr, counted)
    return calls


@pytest.mark.skipif(not model_ops.use_triton(torch.zeros(1)), reason="the model ops run the reference here")
def test_patched_llama_matches_transformers(rng, monkeypatch):
    seed = _seed(rng)
    model = _llama(seed)
    tokens = torch.randint(0, 96, (2, 11), generator=rng)
    loss_ref, logits_ref, grads_ref = _step(model, tokens)

    params_before = dict(model.named_parameters())
    calls = _count_calls(monkeypatch)
    report = mk.patch_model_kernels(model)
    assert {k: len(v) for k, v in report.patched.items()} == \
        {"rms_norm": 2 * LAYERS + 1, "swiglu": LAYERS, "rope": LAYERS, "loss": 1}, str(report)
    assert not report.skipped
    assert all(params_before[n] is p for n, p in model.named_parameters())

    loss, logits, grads = _step(model, tokens)
    assert calls == {"rms_norm": 2 * LAYERS + 1, "swiglu": LAYERS, "rope": LAYERS, "loss": 1}
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for n in grads:   # every parameter: norm weights, embeddings, linears
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-3, atol=1e-5, msg=n)

    assert mk.unpatch_model_kernels(model) == 2 * LAYERS + 1 + LAYERS + LAYERS + 1
    assert "LoraKernels" not in "".join(type(m).__name__ for m in model.modules())
    assert "_loss_function" not in model.__dict__


@pytest.mark.skipif(not model_ops.use_triton(torch.zeros(1)), reason="the model ops run the reference here")
def test_peft_qlora_model_with_checkpointing(rng):
    """PEFT LoRA + patch_peft_model + patch_model_kernels, gradient checkpointing on (the patched
    forwards run twice), against PEFT alone: loss and every LoRA gradient."""
    seed = _seed(rng)
    tokens = torch.randint(0, 96, (2, 9), generator=rng)
    grads = []
    for patched in (False, True):
        model = _llama(seed)
        torch.manual_seed(seed + 1)
        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                        init_lora_weights=False))
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        pm.train()
        if patched:
            assert len(patch_peft_model(pm).patched) == LAYERS * len(TARGETS)
            rep = mk.patch_model_kernels(pm)
            assert len(rep.patched["loss"]) == 1 and len(rep.patched["rope"]) == LAYERS
        loss, _, g = _step(pm, tokens)
        grads.append((loss, g))
    (loss_ref, g_ref), (loss, g) = grads
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert g.keys() == g_ref.keys() and len(g) == 2 * LAYERS * len(TARGETS)
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.skipif(not model_ops.use_triton(torch.zeros(1)), reason="the model ops run the reference here")
def test_generate_with_kv_cache_gives_the_same_tokens(rng):
    """Greedy generation with the KV cache (one-token steps through the fused rotary and RMSNorm)."""
    seed = _seed(rng)
    prompt = torch.randint(0, 96, (2, 5), generator=rng)
    out = []
    for patched in (False, True):
        model = _llama(seed).eval()
        if patched:
            mk.patch_model_kernels(model)
        with torch.no_grad():
            out.append(model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True,
                                      pad_token_id=0, output_scores=True, return_dict_in_generate=True))
    assert torch.equal(out[0].sequences, out[1].sequences)
    for a, b in zip(out[0].scores, out[1].scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_rotary_swap_is_scoped_to_patched_models(rng):
    """The rotary function is swapped only while a patched attention module runs."""
    import transformers.models.llama.modeling_llama as ml

    original = ml.apply_rotary_pos_emb
    seed = _seed(rng)
    patched, plain = _llama(seed).eval(), _llama(seed).eval()
    mk.patch_model_kernels(patched, kinds=("rope",))
    seen = []
    real_forward = ml.LlamaAttention.forward

    def spy(self, *a, **k):
        seen.append(ml.apply_rotary_pos_emb)
        return real_forward(self, *a, **k)
    try:
        ml.LlamaAttention.forward = spy
        tokens = torch.randint(0, 96, (1, 7), generator=rng)
        with torch.no_grad():
            a = patched(input_ids=tokens).logits
            b = plain(input_ids=tokens).logits
    finally:
        ml.LlamaAttention.forward = real_forward
    assert seen[:LAYERS] == [mk._fused_rope] * LAYERS and seen[LAYERS:] == [original] * LAYERS
    assert ml.apply_rotary_pos_emb is original
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_report_and_bad_input():
    model = _llama(0, hidden_act="gelu")
    rep = mk.patch_model_kernels(model, kinds=("swiglu", "rms_norm"))
    assert len(rep.patched["swiglu"]) == 0 and len(rep.patched["rms_norm"]) == 2 * LAYERS + 1
    assert len(rep.skipped) == LAYERS and all("not SiLU" in why for why in rep.skipped.values())
    assert "fused model kernels" in str(rep)
    with pytest.raises(ValueError, match="unknown kind"):
        mk.patch_model_kernels(model, kinds=("layernorm",))
    # twice is harmless, and unpatching twice restores nothing more
    mk.patch_model_kernels(model)
    mk.patch_model_kernels(model)
    assert mk.unpatch_model_kernels(model) > 0
    assert mk.unpatch_model_kernels(model) == 0


def test_user_loss_function_is_restored():
    model = _llama(0)

    def my_loss(logits, labels, vocab_size, **kw):
        return logits.sum() * 0

    model.loss_function = my_loss
    mk.patch_model_kernels(model, kinds=("loss",))
    assert model.loss_function is mk.causal_lm_loss
    mk.unpatch_model_kernels(model)
    assert model.loss_function is my_loss


@pytest.mark.skipif(not model_ops.use_triton(torch.zeros(1)), reason="the model ops run the reference here")
@pytest.mark.parametrize("family", ["Mistral", "Qwen2", "Qwen3"])
def test_other_families_match_transformers(family, rng):
    """The other supported families: every module kind is patched and loss / logits / grads match."""
    cfg_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForCausalLM")
    cfg = cfg_cls(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, head_dim=16)
    seed = _seed(rng)
    tokens = torch.randint(0, 96, (2, 9), generator=rng)
    results = []
    for patched in (False, True):
        torch.manual_seed(seed)
        model = model_cls(cfg).float()
        if patched:
            rep = mk.patch_model_kernels(model)
            norms_per_layer = 4 if family == "Qwen3" else 2          # Qwen3 also norms q and k per head
            assert {k: len(v) for k, v in rep.patched.items()} == \
                {"rms_norm": norms_per_layer * LAYERS + 1, "swiglu": LAYERS, "rope": LAYERS, "loss": 1}, str(rep)
        results.append(_step(model, tokens))
    (loss_ref, logits_ref, g_ref), (loss, logits, g) = results
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert g.keys() == g_ref.keys()
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.skipif(not model_ops.use_triton(torch.zeros(1)), reason="the model ops run the reference here")
def test_torch_compile_of_a_patched_model(rng):
    """torch.compile (aot_eager, fullgraph=True) of a patched model: one graph -- the model ops trace
    their PyTorch references instead of breaking the graph around their Triton launches (dynamo cannot
    trace Triton's launcher or interpreter) -- and loss and gradients equal the eager patched model's
    within the kernels' rounding (they compute in fp32 and round once, the references op by op)."""
    seed = _seed(rng)
    tokens = torch.randint(0, 96, (2, 9), generator=rng)
    model = _llama(seed)
    mk.patch_model_kernels(model)
    loss_ref, _, g_ref = _step(model, tokens)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.zero_grad(set_to_none=True)
    loss = compiled(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.testing.assert_close(loss.detach(), loss_ref, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_ref[n], rtol=1e-3, atol=1e-5, msg=n)
