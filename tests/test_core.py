"""ilu.py's core: every loss against an independent oracle, the loops on tiny random models."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import ilu
import ilu_scale as scale
from conftest import VOCAB, tiny_llama, token_pairs, token_texts


def is_checkpointing(model):
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


# -- the invariance penalty against its autograd definition -------------------------------

def irm_oracle(logits, labels):
    """IRMv1 by its definition: a dummy scale w on the logits, d CE / dw by autograd, squared."""
    z, y = logits[:, :-1].float(), labels[:, 1:]
    w = torch.ones((), requires_grad=True)
    ce = F.cross_entropy((w * z).reshape(-1, z.size(-1)), y.reshape(-1), ignore_index=-100)
    (g,) = torch.autograd.grad(ce, w, create_graph=True)
    return g ** 2


def penalty_and_grads(model, batch, fn):
    model.zero_grad(set_to_none=True)
    pen = fn(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
             batch["labels"])
    pen.backward()
    return pen.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


# fp32: agreement to float precision; bf16: the same bf16 logits go into both, and the
# parameter gradients pass through bf16 kernels, so they agree to bf16 precision.
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-5, 3e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_irm_penalty_equals_autograd_definition(dtype, checkpointing):
    model = tiny_llama(dtype=dtype)
    batch = ilu.collate(token_pairs(6, seed=3))
    model.train()
    ref_pen, ref_grads = penalty_and_grads(model, batch, irm_oracle)  # oracle: checkpointing off
    if checkpointing:
        ilu.enable_checkpointing(model)
        assert is_checkpointing(model)
    pen, grads = penalty_and_grads(model, batch, ilu.irm_penalty)
    val_tol, grad_tol = TOL[dtype]
    assert ref_pen > 1e-8                                  # a penalty worth comparing
    assert torch.allclose(pen, ref_pen, rtol=val_tol * 10, atol=val_tol * float(ref_pen))
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().clamp_min(1e-12)
        assert (g - ref_grads[name]).abs().max() <= grad_tol * scale, name


def test_irm_penalty_ignores_masked_tokens_and_matches_hand_value():
    # One answer token, V = 2, logits z = [1, 3] at the predicting position, target 0:
    # p = softmax(z), g = p0*1 + p1*3 - 1 = 2*p1, penalty = 4*p1^2.
    logits = torch.tensor([[[1.0, 3.0], [5.0, -2.0], [9.0, 9.0]]])  # (1, 3, 2)
    labels = torch.tensor([[-100, 0, -100]])
    p1 = math.exp(3) / (math.exp(1) + math.exp(3))
    assert ilu.irm_penalty(logits, labels).item() == pytest.approx(4 * p1 ** 2, rel=1e-6)


def test_chunked_irm_backward_equals_one_pass():
    model = tiny_llama()
    model.train()
    batch = ilu.collate(token_pairs(7, seed=4))
    grads = []
    for micro in (None, 3):
        model.zero_grad(set_to_none=True)
        pen = ilu._irm_backward(model, batch, lam=0.7, micro=micro)
        grads.append((pen, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (p_full, g_full), (p_chunk, g_chunk) = grads
    assert p_chunk == pytest.approx(p_full, rel=1e-5)
    for n in g_full:
        assert torch.allclose(g_chunk[n], g_full[n], rtol=1e-4, atol=1e-6 * g_full[n].abs().max()), n


# -- log-probabilities and NPO by hand ----------------------------------------------------

def test_sequence_logprob_matches_hand_computation():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 1.0, 0.0], [3.0, 0.0, 0.0]],
                           [[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]])  # (2, 3, 3)
    labels = torch.tensor([[-100, 2, 0], [1, -100, 2]])

    def logp(row, tok):
        return row[tok] - math.log(sum(math.exp(v) for v in row))

    # sequence 0: positions 0 -> token 2, 1 -> token 0; sequence 1: position 1 -> token 2 only
    want = [logp([0, 1, 2], 2) + logp([1, 1, 0], 0), logp([0, 0, 0], 2)]
    got = ilu.sequence_logprob(logits, labels)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(want, rel=1e-6)


def test_npo_loss_matches_hand_computation():
    logp, ref = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])

    def log_sigmoid(x):
        return -math.log(1 + math.exp(-x))

    beta = 0.1
    want = -(2 / beta) * (log_sigmoid(-beta * 1.0) + log_sigmoid(-beta * -1.0)) / 2
    assert ilu.npo_loss(logp, ref, beta).item() == pytest.approx(want, rel=1e-6)
    # at pi = pi_ref the loss is (2/beta) log 2 for any beta
    assert ilu.npo_loss(ref, ref, 0.5).item() == pytest.approx(4 * math.log(2), rel=1e-6)


def test_npo_with_cached_reference_equals_live_reference_model():
    model = tiny_llama()
    forget = token_texts(6, 3, 60, 9, seed=5)
    live_ref = copy.deepcopy(model).eval()
    cached = ilu.reference_logprobs(model, forget, batch_size=4)    # before any update
    with torch.no_grad():                                           # the model moves on
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    idx = [4, 1, 3]
    batch = ilu.collate([forget[i] for i in idx])
    results = []
    for ref_logp in ("cached", "live"):
        model.zero_grad(set_to_none=True)
        logp = ilu.sequence_logprob(model(input_ids=batch["input_ids"],
                                          attention_mask=batch["attention_mask"]).logits, batch["labels"])
        if ref_logp == "cached":
            r = cached[idx]
        else:
            with torch.no_grad():
                r = ilu.sequence_logprob(live_ref(input_ids=batch["input_ids"],
                                                  attention_mask=batch["attention_mask"]).logits, batch["labels"])
        loss = ilu.npo_loss(logp, r, beta=0.1)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (l_c, g_c), (l_l, g_l) = results
    assert l_c == pytest.approx(l_l, rel=1e-5)
    assert l_c != pytest.approx(ilu.npo_loss(cached[idx], cached[idx]).item(), rel=1e-3)  # ratio != 1
    for a, b in zip(g_c, g_l):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_graddiff_loss():
    assert ilu.graddiff_loss(torch.tensor(2.0), torch.tensor(3.0), gamma=0.5).item() == pytest.approx(-0.5)


# -- RMU ------------------------------------------------------------------------------------

def test_rmu_loss_masks_padding_and_matches_hand_computation():
    torch.manual_seed(0)
    h_f, h_r, h_r0 = torch.randn(2, 4, 3), torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    control = torch.tensor([1.0, 2.0, 3.0])
    fm = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    rm = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    valid_f = [h_f[b, t] for b in range(2) for t in range(4) if fm[b, t]]
    valid_r = [(h_r[b, t], h_r0[b, t]) for b in range(2) for t in range(4) if rm[b, t]]
    want_f = sum(float(((v - control) ** 2).sum()) for v in valid_f) / (len(valid_f) * 3)
    want_r = sum(float(((a - b) ** 2).sum()) for a, b in valid_r) / (len(valid_r) * 3)
    got = ilu.rmu_loss(h_f, h_r, h_r0, control, fm, rm, alpha=10.0)
    assert got.item() == pytest.approx(want_f + 10.0 * want_r, rel=1e-5)
    h_f2 = h_f.clone()
    h_f2[0, 3] += 100.0                                   # garbage at a padded position
    assert ilu.rmu_loss(h_f2, h_r, h_r0, control, fm, rm, alpha=10.0).item() == pytest.approx(got.item(), rel=1e-6)


def test_each_methods_step_terms_add_up_to_its_published_loss():
    # unlearn's per-method terms (forget, retain) against the loss functions tested above by hand:
    # NPO: forget = npo_loss of the live log-probabilities; GradDiff: forget + gamma * retain = graddiff_loss;
    # RMU: forget + retain = rmu_loss (alpha inside the retain term); the logged NLL is token_nll of the forget rows
    model = tiny_llama(layers=3)
    fb, rb = ilu.collate(token_texts(3, 3, 50, 9, 4)), ilu.collate(token_texts(3, 50, 97, 9, 5))

    def logits(b):
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    ref = torch.tensor([-30.0, -25.0, -28.0])
    f, r, (nll_sum, tokens) = ilu._npo_terms(ilu._forward(model), fb, rb, ref, beta=0.2)
    logp = ilu.sequence_logprob(logits(fb), fb["labels"])
    assert f.item() == pytest.approx(ilu.npo_loss(logp, ref, 0.2).item(), rel=1e-6)
    assert r.item() == pytest.approx(ilu.token_nll(logits(rb), rb["labels"]).item(), rel=1e-6)
    assert nll_sum / tokens == pytest.approx(ilu.token_nll(logits(fb), fb["labels"]).item(), rel=1e-5)
    assert tokens == int((fb["labels"][:, 1:] != -100).sum())
    f, r, (nll_sum, tokens) = ilu._graddiff_terms(ilu._forward(model), fb, rb)
    want = ilu.graddiff_loss(ilu.token_nll(logits(fb), fb["labels"]), ilu.token_nll(logits(rb), rb["labels"]), 0.5)
    assert (f + 0.5 * r).item() == pytest.approx(want.item(), rel=1e-6)
    frozen = {"model.layers.1.mlp.down_proj.weight": torch.zeros(32, 64)}
    control = ilu.rmu_control_vector(32, 4.0, seed=3)
    f, r, nll = ilu._rmu_terms(model, fb, rb, 1, control, frozen, alpha=7.0)
    h_r0 = ilu.hidden_at(model, 1, rb, params=frozen)
    want = ilu.rmu_loss(ilu.hidden_at(model, 1, fb), ilu.hidden_at(model, 1, rb), h_r0, control,
                        fb["attention_mask"], rb["attention_mask"], alpha=7.0)
    assert (f + r).item() == pytest.approx(want.item(), rel=1e-6) and nll is None


@pytest.mark.parametrize("kind", ["rows", "tokens", "mask"])
def test_rank_shares_of_a_micro_batch_add_up_to_one(kind):
    # the sharded bookkeeping: the ranks' shares of each micro-batch, in what its term averages over, sum to 1
    # (a hand count), and one process's share is exactly 1
    b = ilu.collate(token_pairs(4, 1, prompt_len=5, answer_len=2)[:2] + token_texts(2, 3, 50, 9, 6))
    idx = [7, 3, 5, 1]
    counts = {"rows": [1, 1, 1, 1], "tokens": [2, 2, 8, 7], "mask": [7, 7, 9, 8]}[kind]
    for world in (2, 4):
        k = 4 // world
        shares = [scale._share(b, slice(r * k, r * k + k), idx, kind) for r in range(world)]
        assert sum(shares) == pytest.approx(1.0, abs=1e-6)          # RMU's mask share: an fp32 division
        assert shares == pytest.approx([sum(counts[r * k:r * k + k]) / sum(counts) for r in range(world)])
    assert scale._share(b, slice(0, 4), idx, kind) == 1.0


def test_rmu_step_changes_exactly_the_trained_down_projections(monkeypatch):
    model = tiny_llama(layers=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    real = ilu.masked_mse

    def spy(h, target, *args, **kwargs):
        if target.dim() == 1:
            seen.append(target.clone())                    # the control vector c*u (the forget term's target)
        return real(h, target, *args, **kwargs)

    monkeypatch.setattr(ilu, "masked_mse", spy)
    ilu.unlearn(model, token_texts(6, 3, 50, 8, 0), token_texts(6, 50, 97, 8, 1), "rmu", steps=3,
                batch_size=2, grad_accum=2, lr=1e-2, rmu_layer=2, rmu_coeff=5.0, rmu_alpha=10.0,
                progress=False, log=lambda s: None)
    trained = {f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1, 2)}
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in trained), n
        assert p.requires_grad                             # flags restored after RMU
    assert len(seen) == 3 * 2
    assert all(torch.equal(c, seen[0]) for c in seen)      # one control vector for the run
    assert seen[0].norm().item() == pytest.approx(5.0, rel=1e-5)
    assert (seen[0] >= 0).all()                            # u drawn uniform in [0, 1)


def test_rmu_pulls_forget_activations_to_the_control_vector():
    model = tiny_llama(layers=4)
    forget, retain = token_texts(8, 3, 50, 8, 0), token_texts(8, 50, 97, 8, 1)
    hist = ilu.unlearn(model, forget, retain, "rmu", steps=30, batch_size=4, grad_accum=1, lr=3e-2,
                       rmu_layer=2, rmu_coeff=3.0, rmu_alpha=1.0, max_grad_norm=None,
                       progress=False, log=lambda s: None)
    assert hist[-1]["forget"] < 0.5 * hist[0]["forget"]


# -- decoder layers across architectures ---------------------------------------------------

def _configs():
    from transformers import (GemmaConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig,
                              PhiConfig, Qwen2Config)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return {
        "llama": LlamaConfig(**common),
        "mistral": MistralConfig(**common),
        "qwen2": Qwen2Config(**common),
        "gemma": GemmaConfig(**common, head_dim=8),
        "phi": PhiConfig(**common),
        "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64),
        "gpt_neox": GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, max_position_embeddings=64),
    }


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma", "phi", "gpt2", "gpt_neox"])
def test_decoder_layers_and_down_proj_across_architectures(arch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(_configs()[arch]).eval()  # eval: GPT-2 has dropout
    layers = ilu.decoder_layers(model)
    assert len(layers) == 3
    proj = ilu.mlp_down_proj(layers[1])
    x = torch.randint(0, VOCAB, (2, 5))
    h = ilu.hidden_at(model, 1, {"input_ids": x, "attention_mask": torch.ones_like(x)})
    full = model(input_ids=x, output_hidden_states=True).hidden_states[2]  # output of layer 1
    assert torch.allclose(h, full, atol=1e-5)
    expected = {"phi": "mlp.fc2", "gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h"}.get(arch, "mlp.down_proj")
    assert proj is ilu._get_path(layers[1], expected)


def test_decoder_layers_unknown_architecture():
    with pytest.raises(ilu.ILUError, match="cannot find the decoder layers of Linear"):
        ilu.decoder_layers(torch.nn.Linear(2, 2))


# -- bf16 optimizer -----------------------------------------------------------------------

def _adam_run(opt_cls, dtype, steps=200, lr=1e-5, **kw):
    torch.manual_seed(0)
    w0 = (0.02 + 0.005 * torch.rand(4096)).to(dtype)
    p = torch.nn.Parameter(w0.clone())
    opt = opt_cls([p], lr=lr, **kw)
    for _ in range(steps):
        p.grad = torch.ones_like(p)           # Adam's step is then exactly lr per step
        opt.step()
    return (p.detach().float() - w0.float())


def test_small_updates_on_bf16_weights_are_not_lost():
    expected = -200 * 1e-5                     # 200 steps of lr 1e-5, far below bf16 spacing 1.2e-4
    lost = _adam_run(torch.optim.AdamW, torch.bfloat16, weight_decay=0.0)
    assert lost.abs().max().item() == 0.0      # the failure this guards against: plain bf16 AdamW
    kept = _adam_run(ilu.AdamWSR, torch.bfloat16)
    assert kept.mean().item() == pytest.approx(expected, rel=0.05)
    assert (kept < 0).float().mean() > 0.95    # nearly every weight moved the right way


def test_adamw_sr_is_adamw_on_fp32():
    torch.manual_seed(1)
    a = torch.nn.Parameter(torch.randn(50))
    b = torch.nn.Parameter(a.detach().clone())
    oa = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.1)
    ob = ilu.AdamWSR([b], lr=1e-2, weight_decay=0.1)
    for i in range(20):
        g = torch.randn(50, generator=torch.Generator().manual_seed(i))
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_stochastic_rounding_is_unbiased():
    src = torch.full((100_000,), 1.0 + 2 ** -10)   # a quarter of the way from 1 to the next bf16 (1 + 2^-7 ... )
    dst = torch.empty(100_000, dtype=torch.bfloat16)
    ilu._round_stochastic_(dst, src, torch.Generator().manual_seed(0))
    vals = set(dst.float().unique().tolist())
    assert vals == {1.0, 1.0 + 2 ** -7}
    assert dst.float().mean().item() == pytest.approx(1.0 + 2 ** -10, abs=2e-5)


# -- the loops -------------------------------------------------------------------------------

def _fixed_loss(model, data, fn):
    b = ilu.collate(data)
    with torch.no_grad():
        return fn(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])


def _npo_ilu_run(seed=0, lam=10.0):
    model = tiny_llama()
    forget, retain = token_texts(8, 3, 50, 10, 10), token_texts(8, 50, 97, 10, 11)
    env = token_pairs(32, seed=12)
    start = dict(f=_fixed_loss(model, forget, ilu.sequence_logprob).sum().item(),
                 r=_fixed_loss(model, retain, ilu.token_nll).item(),
                 irm=_fixed_loss(model, env, ilu.irm_penalty).item())
    hist = ilu.unlearn(model, forget, retain, "npo", envs={"toy": env}, lam=lam, steps=12, batch_size=2,
                       grad_accum=2, env_batch_size=16, lr=2e-3, seed=seed, progress=False, log=lambda s: None)
    end = dict(f=_fixed_loss(model, forget, ilu.sequence_logprob).sum().item(),
               r=_fixed_loss(model, retain, ilu.token_nll).item(),
               irm=_fixed_loss(model, env, ilu.irm_penalty).item())
    return start, end, hist


def test_unlearn_npo_ilu_forgets_keeps_retain_lowers_penalty_and_is_deterministic():
    start, end, hist = _npo_ilu_run()
    assert end["f"] < start["f"] - 20                 # forget log-likelihood down (nats, summed)
    assert abs(end["r"] - start["r"]) < 0.1 * start["r"]
    assert end["irm"] < start["irm"]
    _, end_plain, _ = _npo_ilu_run(lam=0.0)          # without the penalty it does not fall
    assert end["irm"] < 0.1 * end_plain["irm"]
    assert len(hist) == 12 and set(hist[0]) == {"step", "forget", "retain", "irm", "lr", "ms", "forget_nll"}
    _, _, again = _npo_ilu_run()
    strip = [{k: v for k, v in h.items() if k != "ms"} for h in hist]
    assert strip == [{k: v for k, v in h.items() if k != "ms"} for h in again]


def test_unlearn_graddiff_raises_forget_nll():
    model = tiny_llama()
    forget, retain = token_texts(8, 3, 50, 10, 10), token_texts(8, 50, 97, 10, 11)
    before = _fixed_loss(model, forget, ilu.token_nll).item()
    ilu.unlearn(model, forget, retain, "graddiff", steps=16, lr=5e-3, progress=False, log=lambda s: None)
    assert _fixed_loss(model, forget, ilu.token_nll).item() > before + 0.5


def test_unlearn_bf16_with_checkpointing_runs_every_method():
    for method in ("npo", "rmu", "graddiff"):
        model = tiny_llama(dtype=torch.bfloat16)
        ilu.enable_checkpointing(model)
        before = [p.detach().clone() for p in model.parameters()]
        hist = ilu.unlearn(model, token_texts(4, 3, 50, 10, 0), token_texts(4, 50, 97, 10, 1), method,
                           envs={"toy": token_pairs(8, 2)}, lam=1.0, steps=2, batch_size=2, grad_accum=1,
                           env_batch_size=4, env_micro_batch=2, lr=1e-3, rmu_layer=2,
                           progress=False, log=lambda s: None)
        assert all(math.isfinite(h["forget"]) and h["irm"] > 0 for h in hist)
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("method", ["npo", "graddiff"])
def test_forget_nll_is_logged_and_stops_unlearning(method):
    forget, retain = token_texts(6, 3, 50, 9, 20), token_texts(6, 50, 97, 9, 21)
    model = tiny_llama(layers=2)
    with torch.no_grad():                      # oracle: every forget example's answer-token NLL, one at a time
        total = count = 0.0
        for e in forget:
            ids = torch.tensor([e["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += len(e["input_ids"]) - 1
    start = total / count
    args = dict(batch_size=6, grad_accum=1, lr=5e-3, progress=False, log=lambda s: None)  # one batch = the forget set
    hist = ilu.unlearn(copy.deepcopy(model), forget, retain, method, steps=6, stop_forget_nll=1e9, **args)
    assert len(hist) == 6                      # never reached: every step runs
    assert hist[0]["forget_nll"] == pytest.approx(start, rel=1e-5)
    assert hist[-1]["forget_nll"] > start      # unlearning raises it
    mid = (hist[0]["forget_nll"] + hist[-1]["forget_nll"]) / 2
    stopped = ilu.unlearn(copy.deepcopy(model), forget, retain, method, steps=6, stop_forget_nll=mid, **args)
    first = next(i for i, h in enumerate(hist) if h["forget_nll"] >= mid)
    assert len(stopped) == first + 1           # ends after the first step that reached it
    assert [h["forget_nll"] for h in stopped] == pytest.approx([h["forget_nll"] for h in hist[:first + 1]])


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="rmu", stop_forget_nll=3.0), "stop_forget_nll needs the forget set's token NLL"),
    (dict(method="dpo"), "unknown unlearning method 'dpo'"),
    (dict(lam=-1.0), "lam must be >= 0"),
    (dict(forget=[]), "the forget set is empty"),
    (dict(envs={"gsm8k": []}), "the environment 'gsm8k' is empty"),
])
def test_unlearn_rejects_bad_input(kwargs, message):
    args = dict(forget=token_texts(2, 3, 50, 5, 0), retain=token_texts(2, 3, 50, 5, 1), method="npo")
    args.update(kwargs)
    with pytest.raises(ilu.ILUError, match=message):
        ilu.unlearn(tiny_llama(layers=2), progress=False, log=lambda s: None, **args)


def test_unlearn_stops_on_nan_loss():
    with pytest.raises(ilu.ILUError, match="non-finite loss at step 1"):
        ilu.unlearn(tiny_llama(layers=2), token_texts(2, 3, 50, 5, 0), token_texts(2, 3, 50, 5, 1), "npo",
                    beta=float("nan"), steps=1, progress=False, log=lambda s: None)


def test_finetune_lowers_task_loss_and_calls_hook_at_requested_points():
    model = tiny_llama()
    data = token_pairs(24, seed=7)
    before = _fixed_loss(model, data, ilu.token_nll).item()
    calls = []
    losses = ilu.finetune(model, data, epochs=3, batch_size=8, lr=1e-2, hook=lambda s, e: calls.append((s, e)),
                          hook_steps=[2, 5], progress=False)
    assert len(losses) == 9
    assert calls == [(2, 2 / 3), (3, 1.0), (5, 5 / 3), (6, 2.0), (9, 3.0)]
    assert _fixed_loss(model, data, ilu.token_nll).item() < before - 0.5


# -- loading and task vectors -----------------------------------------------------------------

def _tokenizer_without_pad():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "hello": 2, "world": 3, "[UNK]": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


def test_load_model_from_local_folder_sets_pad_token(tmp_path):
    tok = _tokenizer_without_pad()
    assert tok.pad_token is None
    tiny_llama(layers=2).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok2 = ilu.load_model(str(tmp_path), dtype="float32", device="cpu", gradient_checkpointing=True)
    assert tok2.pad_token == "</s>" and model.config.pad_token_id == 1
    assert model.dtype == torch.float32 and is_checkpointing(model)
    model16, _ = ilu.load_model(str(tmp_path), "bfloat16", device="cpu")
    assert model16.dtype == torch.bfloat16
    default, _ = ilu.load_model(str(tmp_path), device="cpu")      # on a CPU, float32 unless told (#36)
    assert default.dtype == torch.float32


def test_load_model_bad_path_is_one_clear_line(tmp_path):
    with pytest.raises(ilu.ILUError) as e:
        ilu.load_model(str(tmp_path / "nowhere"), device="cpu")
    msg = str(e.value)
    assert "cannot load model" in msg and "nowhere" in msg and "\n" not in msg


def test_encode_pairs_masks_prompt_and_adds_eos():
    tok = _tokenizer_without_pad()
    (ex,) = ilu.encode_pairs(tok, [{"prompt": "hello hello", "answer": " world"}])
    assert ex["input_ids"] == [2, 2, 3, 1]
    assert ex["labels"] == [-100, -100, 3, 1]
    b = ilu.collate([ex, {"input_ids": [2], "labels": [2]}])
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert b["labels"][1].tolist() == [2, -100, -100, -100]


def test_task_vector_cosine_matches_flattened_formula():
    g = torch.Generator().manual_seed(0)
    o = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    u = {k: v + torch.randn(v.shape, generator=g) for k, v in o.items()}
    ft = {k: v + torch.randn(v.shape, generator=g) for k, v in o.items()}
    tu, tft = ilu.task_vector(u, o), ilu.task_vector(ft, o)
    flat = lambda t: torch.cat([t["a"].flatten(), t["b"].flatten()])  # noqa: E731
    want = F.cosine_similarity(flat(tu), flat(tft), dim=0).item()
    assert ilu.cosine(tu, tft) == pytest.approx(want, rel=1e-6)
    assert ilu.cosine(tu, tu) == pytest.approx(1.0)
    assert ilu.cosine(tu, {k: -v for k, v in tu.items()}) == pytest.approx(-1.0)
    assert ilu.norm(tu) == pytest.approx(torch.linalg.vector_norm(flat(tu)).item(), rel=1e-6)


def test_bench_runs_and_prints_every_row():
    """benchmarks/bench.py end to end on a micro model (figures are printed, never asserted)."""
    import os
    import re
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), "..")
    out = subprocess.run([sys.executable, "benchmarks/bench.py", "--size", "micro", "--whole-steps"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 13
    for line in rows[:9]:                                   # ratio rows: median [min, max], positive
        med, lo, hi = map(float, re.search(r"\| ([\d.]+) \[([\d.]+), ([\d.]+)\] \|", line).groups())
        assert 0 < lo <= med <= hi, line
    assert "same predictions: yes" in out.stdout and "same text: 4/4" in out.stdout
    if not torch.cuda.is_available():                       # a GPU asked for where there is none
        bad = subprocess.run([sys.executable, "benchmarks/bench.py", "--device", "cuda"], cwd=root,
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and "torch sees no GPU" in bad.stderr and "Traceback" not in bad.stderr


def test_split_irm_estimator_is_unbiased_for_the_whole_environments_penalty():
    """The split estimator (g from batch A, forward only; d(g) from an independent batch B),
    averaged over every pair of batches, is the gradient of the penalty of the whole pool;
    the full estimator on small batches is not (the covariance of g_B and d(g_B))."""
    model = tiny_llama(layers=2)
    model.train()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)       # confident logits: a penalty far from 0 (1.4 here)
    pool = token_pairs(6, seed=5)           # every example has 3 answer tokens: g_pool = mean of g_i

    def grads_of(batch, grad_batch=None):
        model.zero_grad(set_to_none=True)
        ilu._irm_backward(model, ilu.collate(batch), lam=1.0, micro=None,
                          grad_batch=None if grad_batch is None else ilu.collate(grad_batch))
        return torch.cat([p.grad.flatten() for p in model.parameters()]).double()

    target = grads_of(pool)                 # d(g_pool^2), the population gradient
    # The expectation over independent draws, exactly: A = every ordered pair of examples
    # (2 drawn with replacement), B = every single example, all 216 combinations equally likely.
    pairs = [(i, j) for i in range(6) for j in range(6)]
    split = sum(grads_of([pool[i], pool[j]], [pool[k]]) for i, j in pairs for k in range(6)) / 216
    full = sum(grads_of([pool[k]]) for k in range(6)) / 6
    err = lambda est: float((est - target).norm() / target.norm())  # noqa: E731
    assert err(split) < 1e-4                # float rounding only
    assert err(full) > 0.05                 # the bias the split estimator removes
