"""Invariant LLM Unlearning (ILU) in one file: losses, loops, attack and metrics.

Unlearning methods such as NPO and RMU remove knowledge from a language model, but an
ordinary fine-tuning run on unrelated data (GSM8K, AG News, SST-2, ...) brings much of it
back. ILU (Wang et al., ICML 2025, arXiv:2506.01339) adds an IRMv1 invariance penalty
(Arjovsky et al. 2019, arXiv:1907.02893) computed on fine-tuning "environments" to the
unlearning objective, so that the unlearned solution stays put when those environments
are later fine-tuned on:

    min_theta  l_u(theta) + lam * sum_i || d/dw |_{w=1}  l_i(w * theta; D_i) ||^2

Base methods: NPO (Zhang et al. 2024, arXiv:2404.05868), RMU (Li et al. 2024, the WMDP
paper, arXiv:2403.03218) and GradDiff (gradient ascent on the forget set, descent on the
retain set).

Run the experiments with the runners, for example

    python run_wmdp.py --method npo --ilu-env gsm8k
    python run_muse.py --method npo --ilu-env gsm8k --corpus news

or use the pieces directly:

    model, tok = ilu.load_model("HuggingFaceH4/zephyr-7b-beta", gradient_checkpointing=True)
    forget = ilu.encode_texts(tok, forget_texts, max_length=1024)
    retain = ilu.encode_texts(tok, retain_texts, max_length=1024)
    env = ilu.encode_pairs(tok, gsm8k_pairs, max_length=512)
    ilu.unlearn(model, forget, retain, "npo", envs={"gsm8k": env}, lam=1.0)

Sections, in reading order: losses -> the invariance penalty -> data and batching ->
model loading and memory -> the unlearning loop -> the fine-tuning attack -> analysis.
Everything is plain PyTorch; the only dependencies are torch, transformers, datasets, tqdm.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

IGNORE = -100  # Hugging Face's label for "no loss here" (prompt and padding tokens)


class ILUError(ValueError):
    """A problem with the user's input; the runners print its one-line message and exit 2."""


# -----------------------------------------------------------------------------
# Losses (pure math on logits, log-probabilities and hidden states)


def _shift(logits: torch.Tensor, labels: torch.Tensor):
    """Align next-token predictions with their targets: position t predicts token t+1.

    logits (B, T, V), labels (B, T) -> logits (B, T-1, V), labels (B, T-1), mask (B, T-1).
    """
    logits, labels = logits[:, :-1], labels[:, 1:]
    return logits, labels, labels != IGNORE


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) = sum_t log p(y_t | y_<t, x) over the unmasked tokens of each sequence.

    logits (B, T, V) in any dtype, labels (B, T) with -100 on prompt and padding.
    Returns (B,) in fp32. The softmax runs in fp32 whatever the logits' dtype.
    """
    logits, labels, _ = _shift(logits, labels)
    B, T, V = logits.shape
    nll = F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1),
                          ignore_index=IGNORE, reduction="none")  # (B*T,), 0 where ignored
    return -nll.view(B, T).sum(1)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the unmasked tokens of the batch (HF's LM loss), fp32."""
    logits, labels, mask = _shift(logits, labels)
    if not mask.any():
        return logits.sum().float() * 0.0  # no target token: zero loss that keeps the graph
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE)


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Negative Preference Optimization (Zhang et al. 2024, arXiv:2404.05868, Eq. 3):

        L_NPO = -(2 / beta) * E_{(x,y) in D_f} log sigmoid( -beta * [log pi(y|x) - log pi_ref(y|x)] )

    logp, ref_logp: (B,) sequence log-probabilities summed over the answer tokens (see
    `sequence_logprob`), not averaged per token and not raw logits: the ratio
    pi/pi_ref is a ratio of sequence probabilities, as in the paper. beta: inverse
    temperature (0.1 in the paper). As beta -> 0 this tends to gradient ascent on log pi.
    """
    log_ratio = logp - ref_logp.to(logp)                     # (B,) log pi/pi_ref
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()


def graddiff_loss(forget_nll: torch.Tensor, retain_nll: torch.Tensor,
                  gamma: float = 1.0) -> torch.Tensor:
    """Gradient difference: L = -NLL(D_f) + gamma * NLL(D_r) (ascent on forget, descent on retain)."""
    return -forget_nll + gamma * retain_nll


def masked_mse(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over valid tokens and hidden dims, in fp32.

    h (B, T, D); target broadcastable to h ((D,) for a control vector); mask (B, T), 1 = valid.
    """
    sq = (h.float() - target.float()).pow(2)                  # (B, T, D)
    if mask is None:
        return sq.mean()
    m = mask.to(sq.dtype).unsqueeze(-1)                        # (B, T, 1)
    return (sq * m).sum() / (m.sum() * h.size(-1)).clamp_min(1.0)


def rmu_loss(h_forget: torch.Tensor, h_retain: torch.Tensor, h_retain_frozen: torch.Tensor,
             control: torch.Tensor, forget_mask: torch.Tensor | None = None,
             retain_mask: torch.Tensor | None = None, alpha: float = 1200.0) -> torch.Tensor:
    """Representation Misdirection for Unlearning (Li et al. 2024, arXiv:2403.03218, Sec. 5):

        L_RMU = || h_theta(x_f) - c*u ||^2  +  alpha * || h_theta(x_r) - h_frozen(x_r) ||^2

    h_*: (B, T, D) hidden states at one decoder layer; control = c*u, (D,), one fixed random
    unit vector u scaled by the steering coefficient c; alpha weighs the retain term. Both
    norms are mean squared errors over the valid tokens and hidden dims; unlike the
    reference code, padding is masked out.
    """
    forget_term = masked_mse(h_forget, control, forget_mask)
    retain_term = masked_mse(h_retain, h_retain_frozen, retain_mask)
    return forget_term + alpha * retain_term


def rmu_control_vector(hidden_size: int, coeff: float = 6.5, seed: int = 0) -> torch.Tensor:
    """c*u with u uniform in [0,1)^D then normalised, as the WMDP reference code draws it. (D,) fp32."""
    u = torch.rand(hidden_size, generator=torch.Generator().manual_seed(seed))
    return coeff * u / u.norm()


# -----------------------------------------------------------------------------
# The invariance penalty (IRMv1, in closed form)
#
# Put a scalar w on the logits z (shape (B, T, V)). For a token with target y,
#     d/dw CE(softmax(w z), y) |_{w=1} = sum_k p_k z_k - z_y = E_p[z] - z_y,   p = softmax(z).
# The environment's gradient g is the mean of that over its answer tokens, and the
# penalty is g^2. This is an ordinary function of the logits: one forward and one
# first-order backward, no create_graph, and it works with gradient checkpointing.


def _irm_terms(logits: torch.Tensor, labels: torch.Tensor):
    """Sum over answer tokens of (E_p[z] - z_y) and the number of those tokens, fp32."""
    logits, labels, mask = _shift(logits, labels)
    z = logits[mask].float()                                   # (N, V): answer positions only
    y = labels[mask]                                           # (N,)
    p = torch.softmax(z, dim=-1)
    per_token = (p * z).sum(-1) - z.gather(1, y[:, None]).squeeze(1)  # (N,) E_p[z] - z_y
    return per_token.sum(), int(mask.sum())


def irm_penalty(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """IRMv1 penalty || d/dw |_{w=1} CE(w * logits, labels) ||^2 of one environment batch.

    logits (B, T, V) in any dtype (upcast to fp32 here); labels (B, T) in the HF causal-LM
    convention (-100 ignored, shifted inside). CE is the mean over the answer tokens.
    """
    s, n = _irm_terms(logits, labels)
    return (s / max(n, 1)) ** 2


# -----------------------------------------------------------------------------
# Data and batching
#
# An encoded example is a dict {"input_ids": [int], "labels": [int]} with labels equal to
# input_ids on the tokens that carry loss and -100 elsewhere. Batches are right-padded;
# the pad id does not matter because padding is masked in attention and labels.


def encode_texts(tokenizer, texts: Iterable[str], max_length: int = 1024) -> list[dict]:
    """Raw text to encoded examples, every token a target (forget/retain corpora). Empty texts are dropped."""
    out = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) > 1:
            out.append({"input_ids": ids, "labels": list(ids)})
    return out


def encode_pairs(tokenizer, pairs: Iterable[Mapping[str, str]], max_length: int = 512,
                 add_eos: bool = True) -> list[dict]:
    """{"prompt", "answer"} pairs to encoded examples with only the answer tokens as targets.

    Prompt and answer are tokenised separately (the prompt with the tokenizer's special
    tokens, the answer without), so the boundary is exact whatever the tokenizer merges.
    The result is cut to max_length from the right; a pair whose answer is cut away
    entirely is dropped.
    """
    out = []
    for pair in pairs:
        p = tokenizer(pair["prompt"])["input_ids"]
        a = tokenizer(pair["answer"], add_special_tokens=False)["input_ids"]
        if add_eos and tokenizer.eos_token_id is not None:
            a = a + [tokenizer.eos_token_id]
        ids = (p + a)[:max_length]
        labels = ([IGNORE] * len(p) + a)[:max_length]
        if any(t != IGNORE for t in labels[1:]):
            out.append({"input_ids": ids, "labels": labels})
    return out


def collate(examples: Sequence[Mapping], device=None) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into input_ids, attention_mask, labels, each (B, T_max)."""
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), T, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


class _Sampler:
    """Endless reshuffled passes over indices 0..n-1, from a seeded generator."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.g, self.order = n, generator, []

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if not self.order:
                self.order = torch.randperm(self.n, generator=self.g).tolist()
            out.append(self.order.pop())
        return out


# -----------------------------------------------------------------------------
# Model loading and memory
#
# One GPU, 7.2B parameters (Mistral/Zephyr shape), bf16 weights, gradient checkpointing:
# see README "Memory plan". Two rules make it fit and keep it correct:
#  * NPO's reference model is never held: its log-probs on the forget set are cached first.
#  * bf16 weights cannot absorb updates smaller than half their spacing (lr 1e-5 on a
#    weight of 0.02, whose bf16 spacing is 1.2e-4, rounds back to the same weight), so
#    `AdamWSR` updates in fp32 and writes weights and moments back with stochastic
#    rounding: each small update lands with the right probability, unbiased in expectation.


def load_model(name_or_path: str, dtype: str | torch.dtype = "bfloat16", device: str | None = None,
               gradient_checkpointing: bool = False):
    """Load a causal LM and its tokenizer from the hub or a local folder.

    dtype: "bfloat16" (default, the paper's setting) or "float32" (for CPU runs).
    device: default "cuda" when available, else "cpu". A tokenizer without a pad token gets
    its EOS token as pad token (padding is always masked, so the choice does not matter).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ILUError(f"cannot load model '{name_or_path}': {first} (check the name or path; "
                       "offline, pass a local folder saved with save_pretrained)") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ILUError(f"the tokenizer of '{name_or_path}' has neither a pad nor an EOS token: "
                           "set tokenizer.pad_token before encoding")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        enable_checkpointing(model)
    return model.to(device), tokenizer


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer in backward instead of storing its activations."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):   # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


_LAYER_PATHS = ("model.layers",               # Llama, Mistral, Qwen2, Gemma, Phi, Phi-3, OLMo
                "model.language_model.layers",  # multimodal wrappers (Gemma 3, ...)
                "transformer.h",              # GPT-2, GPT-J, Falcon, Bloom
                "gpt_neox.layers",            # GPT-NeoX, Pythia
                "model.decoder.layers",       # OPT
                "transformer.blocks")         # MPT
_DOWN_PROJ = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2", "fc2", "ffn.down_proj")


def _get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of transformer blocks of a causal LM (Llama, Mistral, Qwen2, Gemma, GPT-2, GPT-NeoX, Phi, OPT, ...)."""
    for path in _LAYER_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ILUError(f"cannot find the decoder layers of {type(model).__name__}: known paths are "
                   f"{', '.join(_LAYER_PATHS)}; add this architecture's path to ilu._LAYER_PATHS")


def mlp_down_proj(layer) -> torch.nn.Module:
    """The MLP's output projection (d_ff -> d_model) of one decoder layer: what RMU trains."""
    for path in _DOWN_PROJ:
        module = _get_path(layer, path)
        if module is not None and hasattr(module, "weight"):
            return module
    raise ILUError(f"cannot find the MLP down-projection of {type(layer).__name__}: known names are "
                   f"{', '.join(_DOWN_PROJ)}; add it to ilu._DOWN_PROJ")


def _round_stochastic_(dst: torch.Tensor, src: torch.Tensor, generator: torch.Generator) -> None:
    """dst (bf16) <- src (fp32) rounded up or down at random, with P(up) = distance to the lower value / spacing.

    A bf16 number is the top 16 bits of an fp32 one: add uniform random low 16 bits, then
    cut them off. The rounding is unbiased: E[dst] = src.
    """
    noise = torch.randint(0, 1 << 16, src.shape, dtype=torch.int32, device=src.device, generator=generator)
    bits = (src.contiguous().view(torch.int32) + noise) & -65536  # -65536 = 0xFFFF0000
    dst.copy_(bits.view(torch.float32))                          # exact: low bits are zero


class AdamWSR(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter, arXiv:1711.05101) for bf16 weights without lost updates.

    Moments are kept in the parameter's dtype (bf16 for a bf16 model: 2 x 14.5 GB for 7.2B
    parameters instead of 58 GB in fp32). Each step computes in fp32 and writes weights
    and moments back with stochastic rounding, so updates far below bf16's resolution add
    up correctly on average. For fp32 parameters it is exactly AdamW.
    """

    def __init__(self, params, lr: float = 1e-5, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed, self._generators = seed, {}

    def _generator(self, device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["step"] += 1
                t = state["step"]
                g = p.grad.float()
                m = state["m"].float().mul_(b1).add_(g, alpha=1 - b1)          # first moment
                v = state["v"].float().mul_(b2).addcmul_(g, g, value=1 - b2)   # second moment
                w = p.float().mul_(1 - lr * wd)                                 # decoupled decay
                denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
                w.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
                for dst, src in ((p, w), (state["m"], m), (state["v"], v)):
                    if dst.dtype == torch.bfloat16:
                        _round_stochastic_(dst, src, self._generator(p.device))
                    elif dst is not src:
                        dst.copy_(src)


def lr_at(step: int, total: int, peak: float, warmup: int, decay: bool = True) -> float:
    """Linear warmup over `warmup` steps to `peak`, then linear decay to 0 at `total` (or constant)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if not decay:
        return peak
    return peak * max(0.0, (total - step) / max(1, total - warmup))


# -----------------------------------------------------------------------------
# The unlearning loop


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the hidden state we need exists."""


def hidden_at(model, layer: int, batch: Mapping[str, torch.Tensor], params: Mapping | None = None):
    """Output (B, T, D) of decoder layer `layer`, running the model only up to that layer.

    params: optional {name: tensor} to use in place of the model's own parameters
    (torch.func.functional_call), e.g. the frozen copies of RMU's trained weights.
    """
    layers = decoder_layers(model)
    box = {}

    def keep(_module, _args, out):
        box["h"] = out[0] if isinstance(out, tuple) else out

    def stop(_module, _args):
        raise _Stop

    handles = [layers[layer].register_forward_hook(keep)]
    if layer + 1 < len(layers):  # stop at the next layer's input, after this layer finished cleanly
        handles.append(layers[layer + 1].register_forward_pre_hook(stop))
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    try:
        if params is None:
            model(**kwargs)
        else:
            torch.func.functional_call(model, dict(params), (), kwargs)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return box["h"]


@torch.no_grad()
def reference_logprobs(model, examples: Sequence[Mapping], batch_size: int = 8) -> torch.Tensor:
    """log pi_ref(y|x) of every example, computed once before unlearning (N,) fp32.

    NPO's reference model is the model before unlearning and never changes, so caching
    these numbers replaces a second 14.5 GB model in memory.
    """
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    out = []
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i:i + batch_size], device)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        out.append(sequence_logprob(logits, b["labels"]))
    model.train(was_training)
    return torch.cat(out)


def _irm_backward(model, batch: Mapping[str, torch.Tensor], lam: float, micro: int | None) -> float:
    """Backpropagate lam * penalty of one environment batch; return the penalty.

    With micro < batch rows, the batch is processed in chunks: g = (sum_c s_c) / N is a
    mean over all chunks, so a no-grad pass first finds g, then each chunk backpropagates
    lam * 2 g * s_c / N, whose gradients add up to exactly lam * d(g^2).
    """
    def logits_of(rows):
        return model(input_ids=batch["input_ids"][rows],
                     attention_mask=batch["attention_mask"][rows]).logits

    B = batch["input_ids"].size(0)
    if micro is None or micro >= B:
        pen = irm_penalty(logits_of(slice(None)), batch["labels"])
        (lam * pen).backward()
        return pen.item()
    chunks = [slice(i, i + micro) for i in range(0, B, micro)]
    with torch.no_grad():
        sums = [_irm_terms(logits_of(c), batch["labels"][c]) for c in chunks]
    n = max(sum(k for _, k in sums), 1)
    g = sum(s for s, _ in sums).item() / n
    for c in chunks:
        s, _ = _irm_terms(logits_of(c), batch["labels"][c])
        (lam * 2 * g * s / n).backward()
    return g * g


METHODS = ("npo", "rmu", "graddiff")


def unlearn(model, forget: Sequence[Mapping], retain: Sequence[Mapping], method: str = "npo",
            envs: Mapping[str, Sequence[Mapping]] | None = None, lam: float = 1.0, *,
            steps: int | None = None, batch_size: int = 1, grad_accum: int = 4,
            env_batch_size: int = 48, env_micro_batch: int | None = None,
            lr: float = 1e-5, warmup: float = 0.1, weight_decay: float = 0.0,
            max_grad_norm: float | None = 1.0, beta: float = 0.1, gamma: float = 1.0,
            rmu_layer: int = 7, rmu_coeff: float = 6.5, rmu_alpha: float = 1200.0,
            seed: int = 0, progress: bool = True, log: Callable[[str], None] | None = None) -> list[dict]:
    """Unlearn `forget` while keeping `retain`, optionally with the ILU penalty over `envs`.

    Objective per optimizer step (ILU when envs is given, the base method otherwise):
        npo:      L_NPO(forget) + gamma * NLL(retain)              (beta, gamma = 0.1, 1)
        graddiff: -NLL(forget) + gamma * NLL(retain)
        rmu:      L_RMU at layer rmu_layer, training only the MLP down-projections of layers
                  rmu_layer-2..rmu_layer (c = rmu_coeff, alpha = rmu_alpha; Zephyr-7B: 7, 6.5, 1200)
        + lam * sum_e irm_penalty(env batch e)   (ILU; lam in [0.1, 2], 48 examples per step)

    forget, retain, envs' values: encoded examples (`encode_texts`, `encode_pairs`).
    One optimizer step takes grad_accum micro-batches of batch_size forget and retain
    examples (defaults 1 x 4, lr 1e-5, 10% warmup then linear decay: the NPO-on-WMDP
    settings) and one batch of env_batch_size examples per environment, run in chunks of
    env_micro_batch rows when memory is short. steps defaults to one pass over `forget`.
    The model's parameters are updated in place. Returns one dict per step with the
    logged values: step, forget, retain, irm, lr, ms.
    """
    if method not in METHODS:
        raise ILUError(f"unknown unlearning method '{method}': choose one of {', '.join(METHODS)}")
    if lam < 0:
        raise ILUError(f"lam must be >= 0 (got {lam}): it weighs the invariance penalty")
    if len(forget) == 0:
        raise ILUError("the forget set is empty: give at least one forget example")
    if len(retain) == 0:
        raise ILUError("the retain set is empty: every method needs retain examples")
    envs = {k: v for k, v in (envs or {}).items()} if lam > 0 else {}
    for name, data in envs.items():
        if len(data) == 0:
            raise ILUError(f"the environment '{name}' is empty: give it examples or drop it")
    steps = steps or math.ceil(len(forget) / (batch_size * grad_accum))
    log = log or tqdm.write
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout, if the architecture has any
    f_sampler, r_sampler = _Sampler(len(forget), gen), _Sampler(len(retain), gen)
    e_samplers = {k: _Sampler(len(v), gen) for k, v in envs.items()}

    was_trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    if method == "npo":
        ref = reference_logprobs(model, forget).to(device)    # pi_ref, cached once
    if method == "rmu":
        trained = [mlp_down_proj(decoder_layers(model)[i]).weight
                   for i in range(max(0, rmu_layer - 2), rmu_layer + 1)]
        ids = {id(w) for w in trained}
        names = [n for n, p in model.named_parameters() if id(p) in ids]
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in ids}
        for p in model.parameters():
            p.requires_grad_(id(p) in ids)
        control = rmu_control_vector(model.config.hidden_size, rmu_coeff, seed).to(device)
        params = trained
        log(f"rmu: layer {rmu_layer}, training {', '.join(names)}")
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamWSR(params, lr=lr, weight_decay=weight_decay, seed=seed)
    warm = int(warmup * steps)
    model.train()
    history = []
    bar = tqdm(range(steps), desc=f"unlearn {method}{' + ILU' if envs else ''}", disable=not progress)
    try:
        for step in bar:
            t0 = time.perf_counter()
            f_sum = r_sum = 0.0
            for _ in range(grad_accum):
                f_idx, r_idx = f_sampler.take(batch_size), r_sampler.take(batch_size)
                fb = collate([forget[i] for i in f_idx], device)
                rb = collate([retain[i] for i in r_idx], device)
                if method == "rmu":
                    h_f = hidden_at(model, rmu_layer, fb)
                    h_r = hidden_at(model, rmu_layer, rb)
                    with torch.no_grad():
                        h_r0 = hidden_at(model, rmu_layer, rb, params=frozen)
                    loss = rmu_loss(h_f, h_r, h_r0, control, fb["attention_mask"],
                                    rb["attention_mask"], rmu_alpha)
                    with torch.no_grad():
                        f_val = masked_mse(h_f, control, fb["attention_mask"]).item()
                    r_val = loss.item() - f_val                          # alpha * retain MSE
                else:
                    f_logits = model(input_ids=fb["input_ids"], attention_mask=fb["attention_mask"]).logits
                    if method == "npo":
                        f_term = npo_loss(sequence_logprob(f_logits, fb["labels"]),
                                          ref[torch.tensor(f_idx, device=device)], beta)
                    else:
                        f_term = -token_nll(f_logits, fb["labels"])     # gradient ascent
                    del f_logits
                    r_logits = model(input_ids=rb["input_ids"], attention_mask=rb["attention_mask"]).logits
                    r_term = token_nll(r_logits, rb["labels"])
                    del r_logits
                    loss = f_term + gamma * r_term
                    f_val, r_val = f_term.item(), r_term.item()
                (loss / grad_accum).backward()
                f_sum += f_val / grad_accum
                r_sum += r_val / grad_accum
            irm = 0.0
            for name, data in envs.items():                            # ILU: lam * sum_e g_e^2
                eb = collate([data[i] for i in e_samplers[name].take(env_batch_size)], device)
                irm += _irm_backward(model, eb, lam, env_micro_batch)
            if not all(math.isfinite(x) for x in (f_sum, r_sum, irm)):
                raise ILUError(f"non-finite loss at step {step + 1} (forget {f_sum}, retain {r_sum}, "
                               f"irm {irm}): lower the learning rate or lam")
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            cur_lr = lr_at(step, steps, lr, warm)
            for group in opt.param_groups:
                group["lr"] = cur_lr
            opt.step()
            opt.zero_grad(set_to_none=True)
            ms = 1000 * (time.perf_counter() - t0)
            history.append(dict(step=step + 1, forget=f_sum, retain=r_sum, irm=irm, lr=cur_lr, ms=ms))
            log(f"step {step + 1:>{len(str(steps))}}/{steps} | forget {f_sum:8.4f} | retain {r_sum:8.4f} "
                f"| irm {irm:.3e} | lr {cur_lr:.1e} | {ms:5.0f} ms")
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(was_trainable[n])
        model.eval()
    return history


# -----------------------------------------------------------------------------
# The fine-tuning attack


def finetune(model, data: Sequence[Mapping], epochs: float = 1, *, batch_size: int = 8,
             grad_accum: int = 1, lr: float = 2e-5, warmup: int = 0, weight_decay: float = 0.0,
             max_grad_norm: float | None = 1.0, max_steps: int | None = None,
             hook: Callable[[int, float], None] | None = None, hook_steps: Iterable[int] = (),
             hook_each_epoch: bool = True, seed: int = 0, progress: bool = True,
             desc: str = "finetune") -> list[float]:
    """Full fine-tuning with plain NLL on the answer tokens: the downstream "attack".

    data: encoded prompt/answer pairs (`encode_pairs`). One step = grad_accum batches of
    batch_size. Runs `epochs` passes (fractions allowed) or `max_steps` steps, whichever is
    given (max_steps wins). lr is constant after `warmup` steps. hook(step, epoch) is called
    after each step listed in hook_steps and at the end of every epoch (hook_each_epoch),
    so callers can evaluate along the way. Returns the loss of every step.
    """
    if len(data) == 0:
        raise ILUError("the fine-tuning set is empty")
    device = next(model.parameters()).device
    per_epoch = max(1, math.ceil(len(data) / (batch_size * grad_accum)))
    total = max_steps or max(1, round(epochs * per_epoch))
    hook_steps = set(hook_steps)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sampler = _Sampler(len(data), gen)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = AdamWSR(model.parameters(), lr=lr, weight_decay=weight_decay, seed=seed)
    model.train()
    losses = []
    bar = tqdm(range(total), desc=desc, disable=not progress)
    for step in bar:
        step_loss = 0.0
        for _ in range(grad_accum):
            b = collate([data[i] for i in sampler.take(batch_size)], device)
            loss = token_nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                             b["labels"])
            (loss / grad_accum).backward()
            step_loss += loss.item() / grad_accum
        if not math.isfinite(step_loss):
            raise ILUError(f"non-finite fine-tuning loss at step {step + 1}: lower the learning rate")
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, lr, warmup, decay=False)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        done = step + 1
        if hook and (done in hook_steps or (hook_each_epoch and (done % per_epoch == 0 or done == total))):
            model.eval()
            hook(done, done / per_epoch)
            model.train()
    model.eval()
    return losses


# -----------------------------------------------------------------------------
# Analysis: task vectors (ILU paper Sec. 6)
#
# tau_u = theta_u - theta_o (unlearning), tau_ft = theta_ft - theta_o (fine-tuning the
# original), tau_{u->ft} = theta_u^ft - theta_u (fine-tuning the unlearned model).
# The paper reports cos(tau_{u->ft}, tau_ft) and cos(tau_{u->ft}, tau_u).


def state_of(model) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's parameters (what task vectors are computed from)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}


def task_vector(after: Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """tau = after - before, per parameter tensor, in fp32."""
    return {n: after[n].float() - before[n].float() for n in before}


def cosine(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Cosine similarity of two task vectors, flattened over all parameters (fp64 sums)."""
    dot = na = nb = 0.0
    for n in a:
        x, y = a[n].double().flatten(), b[n].double().flatten()
        dot, na, nb = dot + float(x @ y), na + float(x @ x), nb + float(y @ y)
    return dot / math.sqrt(na * nb) if na > 0 and nb > 0 else float("nan")
