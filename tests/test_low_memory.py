"""The low-memory mode (scale.Updater): one backward per step, each parameter's optimizer stepping
inside it, quantized moments from torchao."""
import pytest
import torch

import ilu
import ilu_scale as scale
from conftest import tiny_llama, token_pairs, token_texts


def _spy_grads(monkeypatch):
    """Record every gradient AdamWSR steps with: {parameter name index: [gradient per step]}."""
    seen, real = [], ilu.AdamWSR.step

    def step(self, closure=None):
        seen.append({id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                     if p.grad is not None})
        return real(self, closure)

    monkeypatch.setattr(ilu.AdamWSR, "step", step)
    return seen


def _by_param(seen, model):
    """The recorded gradients merged per parameter, in the model's order, for the first step."""
    ids = [id(p) for p in model.parameters()]
    merged = {}
    for d in seen:
        for k, g in d.items():
            merged.setdefault(k, g)            # the first gradient each parameter stepped with
    return [merged[i] for i in ids if i in merged]


@pytest.mark.parametrize("method, kwargs", [
    ("npo", dict(envs={"a": token_pairs(12, 2)}, env_micro_batch=3)),     # chunked penalty too
    ("npo", dict(envs={"a": token_pairs(12, 2)}, env_grad_batch=3)),      # the split estimator
    ("npo", dict(envs={"a": token_pairs(12, 2, prompt_len=2, answer_len=2)})),   # low memory: 2 pairs a packed row
    ("graddiff", dict(envs={"a": token_pairs(12, 2)})),
    ("rmu", dict(envs={"a": token_pairs(12, 2)}, rmu_layer=2, rmu_coeff=5.0, rmu_alpha=10.0)),
])
def test_single_backward_step_equals_accumulated_step(method, kwargs, monkeypatch):
    # with AdamWSR's exact fp32 moments and no clipping, the one backward per step (optimizer inside it) must
    # give the accumulated step's losses, gradients and weights, up to the order of fp32 sums
    forget, retain = token_texts(8, 3, 50, 10, 0), token_texts(8, 50, 97, 10, 1)
    runs = {}
    for mode in (None, "full"):
        model = tiny_llama()
        seen = _spy_grads(monkeypatch)
        hist = scale.unlearn(model, forget, retain, method, lam=1.0, steps=4, batch_size=2, grad_accum=2,
                           env_batch_size=6, lr=3e-3, max_grad_norm=None, low_memory=mode, seed=2,
                           progress=False, log=lambda s: None, **kwargs)
        runs[mode] = (hist, _by_param(seen, model), [p.detach().clone() for p in model.parameters()],
                      len(seen))
        monkeypatch.undo()
    (h0, g0, w0, n0), (h1, g1, w1, n1) = runs[None], runs["full"]
    trained = len(g0)
    assert n0 == 4 and n1 == 4 * trained            # one optimizer per parameter, stepped once a step
    for a, b in zip(h0, h1):
        for k in ("forget", "retain", "irm", "lr"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (k, a, b)
    assert len(g1) == trained
    for a, b in zip(g0, g1):        # the packed forward sums in another order: fp32 noise ~1e-5 of the largest
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    for a, b in zip(w0, w1):        # Adam's g / sqrt(v) lifts that noise on weights whose gradient is ~0
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(w0, tiny_llama().parameters()))   # it trained


def test_single_backward_finetune_equals_accumulated_finetune():
    data = token_pairs(24, 5)
    out = {}
    for mode in (None, "full"):
        model = tiny_llama()
        losses = scale.finetune(model, data, max_steps=4, batch_size=4, grad_accum=2, lr=3e-3, max_grad_norm=None,
                              low_memory=mode, progress=False)
        out[mode] = (losses, [p.detach().clone() for p in model.parameters()])
    assert out["full"][0] == pytest.approx(out[None][0], rel=1e-5)
    for a, b in zip(out[None][1], out["full"][1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # the hooks are gone afterwards: a plain backward leaves its gradients in place
    model = tiny_llama()
    scale.finetune(model, data, max_steps=1, batch_size=4, low_memory="full", progress=False)
    b = ilu.collate(data[:4])
    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def _wide_llama(dtype=torch.float32):
    """A micro Llama whose matrices reach torchao's 4,096-value minimum for quantized moments."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype)


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_low_memory_mode_trains_with_quantized_moments(bits, monkeypatch):
    pytest.importorskip("torchao")
    model = _wide_llama()
    forget, retain = token_texts(8, 3, 50, 10, 0), token_texts(8, 50, 97, 10, 1)
    opened = []
    real_close = scale.Updater.close

    def close(self):                                   # keep the optimizers for a look after the run
        opened.append(self)
        return real_close(self)

    monkeypatch.setattr(scale.Updater, "close", close)
    before = ilu.reference_logprobs(model, forget).sum().item()
    hist = scale.unlearn(model, forget, retain, "npo", envs={"a": token_pairs(12, 2)}, steps=8, batch_size=2,
                       grad_accum=2, env_batch_size=6, lr=3e-3, low_memory=bits, progress=False, log=lambda s: None)
    after = ilu.reference_logprobs(model, forget).sum().item()
    assert after < before - 10                                       # the forget set's log-likelihood fell
    assert hist[-1]["forget"] < hist[0]["forget"]                    # and NPO's loss with it
    upd = opened[0]
    big = [p for p in upd.params if p.numel() >= 4096 and p.numel() % 256 == 0]   # torchao's rule
    assert big and len(upd.opts) == len(upd.params)
    for p in big:
        state = upd.opts[p].state[p]
        kind = "OptimState8bit" if bits == "8bit" else "OptimState4bit"
        assert type(state["exp_avg"]).__name__ == kind and type(state["exp_avg_sq"]).__name__ == kind
        assert state["exp_avg"].codes.dtype == torch.uint8                # the stored moment: one byte per code
        stored = state["exp_avg"].codes.numel() * state["exp_avg"].codes.element_size()
        assert stored == p.numel() // (1 if bits == "8bit" else 2)


def test_low_memory_bad_input_is_one_clear_error():
    model = tiny_llama()
    with pytest.raises(ilu.ILUError, match="unknown low-memory mode '2bit'"):
        scale.unlearn(model, token_texts(4, 3, 50, 8, 0), token_texts(4, 50, 97, 8, 1), "npo", steps=1,
                    low_memory="2bit", progress=False, log=lambda s: None)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters()
               if getattr(p, "_post_accumulate_grad_hooks", None) is not None)


def test_one_forward_packs_batches_exactly():
    # oracle: each batch's own padded forward. The packed forward must give the same logits on every real
    # position, whatever the mix of lengths (rows shared by several sequences, a row's unused tail)
    model = tiny_llama(layers=2)
    lengths = [[9, 4, 7], [3, 3], [12], [5, 2, 6, 1]]
    batches = [ilu.collate(token_texts(len(ns), 3, 90, 12, seed=k)) for k, ns in enumerate(lengths)]
    for b, ns in zip(batches, lengths):              # cut each row to its length: right padding, as collate does
        for i, n in enumerate(ns):
            b["attention_mask"][i, n:] = 0
            b["labels"][i, n:] = -100
    with torch.no_grad():
        forward = scale._one_forward(model, batches)
        for b in batches:
            want = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            got = forward(b)
            assert got.shape == want.shape
            real = b["attention_mask"].bool()
            torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["npo", "graddiff"])
def test_low_memory_step_has_one_forward_with_gradient(method):
    # what makes each weight's gradient complete layer by layer: one forward a step that gradients flow through
    # (the default mode: one per micro-batch term and one per environment batch)
    counts = {}
    for mode in (None, "full"):
        model = tiny_llama()
        calls = []
        model.model.register_forward_pre_hook(lambda m, a: calls.append(torch.is_grad_enabled()))
        scale.unlearn(model, token_texts(8, 3, 50, 10, 0), token_texts(8, 50, 97, 10, 1), method,
                    envs={"a": token_pairs(12, 2)}, steps=3, batch_size=2, grad_accum=2, env_batch_size=6,
                    low_memory=mode, progress=False, log=lambda s: None)
        counts[mode] = sum(calls)
    assert counts == {None: 3 * (2 * 2 + 1), "full": 3}
