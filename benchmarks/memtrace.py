"""Peak memory of each stage the runners take, traced on a CPU without allocating it.

    python benchmarks/bench.py --size 7b --trace      # Mistral-7B shape, bf16, checkpointing, paper settings

The model is built under torch's FakeTensorMode (tensors with shapes and dtypes, no
storage), and torch.distributed._tools.mem_tracker.MemTracker follows every tensor the
stage creates, by category (parameters, gradients, optimizer state, activations,
temporaries), and keeps the peak. The stages run the project's own code (`ilu.unlearn`,
`ilu.finetune`; the low-memory rows `ilu_scale.unlearn` / `ilu_scale.finetune`; the evaluation's
forward passes), two optimizer steps each, so the second
step's peak holds the optimizer's state.

A fake tensor has no values, so the reads that depend on data are answered otherwise
(`traceable`): the sampler draws its order with real tensors; the IRM penalty's answer
positions (a boolean mask, whose number of rows depends on the labels) follow from the
traced data, whose environment rows all end in the same number of answer tokens, and the
same (N, V) rows are taken by index; the low-memory step's packing reads each row's length
(the traced rows have no padding: the batch's width) and transformers' packed-sequence
detection reads the position ids (answered with one sequence id per row: the mask it
builds has the real one's shape); a logged scalar (`.item()`) reads 0. And torch.compile,
which cannot run under the tracker's dispatch mode, runs its function eagerly (torchao's
low-bit optimizer step: the same tensors, unfused). The rest is ilu's code as it runs.
`test_trace_matches_real_allocations` checks the traced peaks against the same stages run
with real tensors at micro scale.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.mem_tracker import MemTracker

import ilu
import ilu_scale as scale

GiB = 2 ** 30
CATEGORIES = ("PARAM", "GRAD", "OPT", "ACT", "TEMP")   # MemTracker's _MemRefType names we report


class _NoHook:
    def remove(self):
        pass


class StepTracker(MemTracker):
    """MemTracker that allows the root module to run several times in one traced stage
    (gradient accumulation, the NPO reference pass, two steps), and modules with frozen
    weights (RMU trains three matrices): only the totals are read."""

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        for p in module.parameters():          # a frozen weight never gets a gradient: no hook for it
            if not p.requires_grad and p not in self._param_to_grad_hook_handles:
                self._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
        return super()._track_module_params_and_buffers(module, install_grad_hooks)

    def _pre_fw_hook(self, module, inputs):
        name = self._mod_tracker.get_known_fqn(module)
        again = module in self.memory_tracking and not self._mod_tracker.is_bw
        if again and set(self._mod_tracker.parents) - {name} == {"Global"}:
            return
        super()._pre_fw_hook(module, inputs)


@contextmanager
def traceable(answer_tokens: int):
    """Answer ilu's data-dependent reads while fake tensors run (see the module's docstring).

    answer_tokens: every environment row of the traced data ends in this many answer tokens
    (as `rows` builds them), so the penalty's answer positions follow from the batch's shape.
    """
    from transformers import masking_utils

    irm_terms, take, lengths, packed = (ilu._irm_terms, ilu._Sampler.take, scale._lengths,
                                        masking_utils.find_packed_sequence_indices)
    scalars = {name: (getattr(torch.Tensor, name), zero) for name, zero in (("item", 0.0), ("__int__", 0),
                                                                             ("__float__", 0.0))}

    def real_take(self, k):                                   # the sampler's order: real
        with unset_fake_temporarily():
            return take(self, k)

    def rows_irm_terms(logits, labels):                       # ilu._irm_terms with the rows picked by index
        B, T = labels.shape
        keep = (torch.arange(B)[:, None] * (T - 1) + torch.arange(T - 1 - answer_tokens, T - 1)).flatten()
        y = labels[:, 1:].flatten().index_select(0, keep)
        z = logits[:, :-1].flatten(0, 1).index_select(0, keep).float()   # (N, V), as logits[mask]
        p = torch.softmax(z, dim=-1)
        return ((p * z).sum(-1) - z.gather(1, y[:, None]).squeeze(1)).sum(), len(keep)

    def zero_if_fake(real, zero):                             # a logged scalar of a fake tensor reads 0
        return lambda self: zero if isinstance(self, FakeTensor) else real(self)

    def eager(fn=None, **kwargs):                             # torch.compile refuses to run under a dispatch
        return fn if fn is not None else (lambda f: f)        # mode: torchao's optimizer step runs eagerly

    ilu._irm_terms, ilu._Sampler.take, compile_ = rows_irm_terms, real_take, torch.compile
    scale._lengths = lambda b: [b["input_ids"].size(1)] * b["input_ids"].size(0)   # `rows` pads no row
    masking_utils.find_packed_sequence_indices = torch.zeros_like  # packed rows: a mask is built, as in a real run
    torch.compile = eager
    for name, (real, zero) in scalars.items():
        setattr(torch.Tensor, name, zero_if_fake(real, zero))
    try:
        yield
    finally:
        ilu._irm_terms, ilu._Sampler.take, torch.compile = irm_terms, take, compile_
        scale._lengths, masking_utils.find_packed_sequence_indices = lengths, packed
        for name, (real, _) in scalars.items():
            setattr(torch.Tensor, name, real)


def trace(stage, config: dict, fake: bool = True, checkpointing: bool = True, dtype=torch.bfloat16,
          answer_tokens: int = 0) -> dict:
    """Peak memory (bytes, by category, and "total") of stage(model) on a fresh Mistral of this
    shape; fake=True traces it without storage, fake=False runs it for real (the same
    stand-ins for the data-dependent reads, so the two compare like for like)."""
    from contextlib import nullcontext

    from transformers import MistralConfig, MistralForCausalLM   # Zephyr-7B-beta's architecture

    with FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext():
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)          # built in bf16 directly: a fake model cannot be cast
        try:
            torch.manual_seed(0)
            model = MistralForCausalLM(MistralConfig(**config))
        finally:
            torch.set_default_dtype(old)
        if checkpointing:
            ilu.enable_checkpointing(model)
        tracker = StepTracker()
        tracker.track_external(model)
        with traceable(answer_tokens), tracker:
            stage(model)
    (snap,) = tracker.get_tracker_snapshot("peak").values()
    out = {c: sum(v for k, v in snap.items() if str(k).endswith("." + c)) for c in CATEGORIES}
    out["total"] = snap["Total"]
    return out


# -- the runners' stages at the paper's settings ------------------------------------------------------

def rows(n, length, vocab, answer=None, seed=0):
    """n encoded examples of random tokens; the last `answer` tokens are targets (all when None)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        k = length if answer is None else answer
        out.append({"input_ids": ids, "labels": [ilu.IGNORE] * (length - k) + ids[length - k:]})
    return out


def off_the_gpu(stage):
    """stage with each gradient handed off as soon as it is complete, and no optimizer state on the
    traced device: what stays on a GPU when the moments and the update live in CPU memory (as
    torchao's CPUOffloadOptimizer does: each gradient copied to the host in backward, the step run
    there, the weights copied back; it needs CUDA, so only this side can be traced here)."""
    def run(model):
        step_one = scale.Updater._step_one
        scale.Updater._step_one = lambda self, p: setattr(p, "grad", None)    # off to the host
        try:
            stage(model)
        finally:
            scale.Updater._step_one = step_one
    return run


def stages(vocab: int, seq: int = 1024, env_len: int = 256, rmu_seq: int = 512, rmu_layer: int = 7,
           finetune_batch: int = 32, finetune_len: int = 256, eval_batch: int = 16, eval_len: int = 1024,
           gen_batch: int = 8, gen_len: int = 2048, gen_tokens: int = 4, grad_accum: int = 4,
           low_memory_accum: int = 4) -> dict:
    """{name: stage(model)} for what the runners do, at the paper's settings by default:
    NPO 1 x 4 sequences of `seq` tokens per step, ILU 48 GSM8K examples of env_len tokens
    (half of them answer), RMU 4 x rmu_seq at layer 7, the fine-tuning attack at batch 32,
    MC evaluation batches of eval_batch prompts, MUSE generation from gen_batch prompts.
    grad_accum: NPO's micro-batches per step (paper: 4). From the second one on, each repeats
    the same memory pattern over gradients that already exist, so 2 gives the peak of 4 in
    half the trace time (`test_peak_does_not_grow_past_two_micro_batches`). The low-memory rows
    (`ilu_scale.Updater`) run low_memory_accum micro-batches (paper: 4), all of them: they are packed
    into the step's one forward. The 24 GB plan's row is the GPU side of a low-memory step whose
    optimizer state lives in CPU memory (`off_the_gpu`)."""
    forget, retain = rows(4, seq, vocab, seed=1), rows(4, seq, vocab, seed=2)
    env = {"gsm8k": rows(48 + 8, env_len, vocab, answer=env_len // 2, seed=3)}
    npo = dict(method="npo", steps=2, batch_size=1, grad_accum=grad_accum, env_batch_size=48, progress=False,
               log=lambda s: None)
    rmu = dict(method="rmu", steps=2, batch_size=4, grad_accum=1, env_batch_size=48, rmu_layer=rmu_layer,
               progress=False, log=lambda s: None)
    f_rmu, r_rmu = rows(4, rmu_seq, vocab, seed=4), rows(4, rmu_seq, vocab, seed=5)
    pairs = rows(finetune_batch, finetune_len, vocab, answer=finetune_len // 2, seed=6)
    low = dict(npo, grad_accum=low_memory_accum, low_memory="8bit")     # one backward a step, 8-bit moments

    def mc_eval(model):            # mc_accuracy's one-forward path: a batch of prompts, no grad
        with torch.no_grad():
            ilu._logits(model, [r["input_ids"] for r in rows(eval_batch, eval_len, vocab, seed=7)])

    def muse_generation(model):    # what generate() runs: the prompts once with a KV cache, then a token at a time
        ids = torch.randint(3, vocab, (gen_batch, gen_len), generator=torch.Generator().manual_seed(8))
        mask = torch.ones_like(ids)
        with torch.no_grad():      # (generate itself loops on a data-dependent "all finished?" test)
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            key = "cache" if "cache" in out else "past_key_values"   # transformers 5 / 4
            for _ in range(gen_tokens):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                out = model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask, use_cache=True,
                            **{key: out[key]})

    return {
        "NPO + ILU(GSM8K), full estimator": lambda m: ilu.unlearn(m, forget, retain, envs=env, lam=1.0, **npo),
        "NPO + ILU(GSM8K), env_micro_batch 8": lambda m: ilu.unlearn(m, forget, retain, envs=env, lam=1.0,
                                                                     env_micro_batch=8, **npo),
        "NPO + ILU(GSM8K), split estimator (8)": lambda m: ilu.unlearn(m, forget, retain, envs=env, lam=1.0,
                                                                       env_grad_batch=8, **npo),
        "NPO": lambda m: ilu.unlearn(m, forget, retain, envs={}, lam=0.0, **npo),
        "RMU": lambda m: ilu.unlearn(m, f_rmu, r_rmu, envs={}, lam=0.0, **rmu),
        "RMU + ILU(GSM8K)": lambda m: ilu.unlearn(m, f_rmu, r_rmu, envs=env, lam=1.0, **rmu),
        f"fine-tuning attack (batch {finetune_batch})": lambda m: ilu.finetune(m, pairs, max_steps=2,
                                                                              batch_size=finetune_batch,
                                                                              progress=False),
        "low memory, 8-bit moments: NPO + ILU(GSM8K)": lambda m: scale.unlearn(m, forget, retain, envs=env, lam=1.0,
                                                                            **low),
        "low memory, 8-bit moments: NPO": lambda m: scale.unlearn(m, forget, retain, envs={}, lam=0.0, **low),
        "low memory, 8-bit moments: GradDiff": lambda m: scale.unlearn(m, forget, retain, envs={}, lam=0.0,
                                                                    **dict(low, method="graddiff")),
        f"low memory, 8-bit moments: fine-tuning attack (batch {finetune_batch})":
            lambda m: scale.finetune(m, pairs, max_steps=2, batch_size=finetune_batch, low_memory="8bit",
                                   progress=False),
        "low memory, 4-bit moments: NPO + ILU(GSM8K)":
            lambda m: scale.unlearn(m, forget, retain, envs=env, lam=1.0, **dict(low, low_memory="4bit")),
        "24 GB plan, GPU side: NPO + ILU(GSM8K), split estimator (8), optimizer state in CPU memory":
            off_the_gpu(lambda m: scale.unlearn(m, forget, retain, envs=env, lam=1.0, env_grad_batch=8,
                                              env_micro_batch=8, **dict(low, low_memory="full"))),
        f"WMDP/MMLU evaluation ({eval_batch} x {eval_len} tokens)": mc_eval,
        f"MUSE generation ({gen_batch} x {gen_len} tokens)": muse_generation,
    }
