"""What ILU costs, measured in one run: every figure a ratio of two timings (or memories).

    python benchmarks/bench.py                            # CPU, a small Mistral-shaped model (~3 min, 2 cores)
    python benchmarks/bench.py --device cuda --size 7b    # one GPU, Mistral-7B shape, bf16, checkpointing
    python benchmarks/bench.py --size 7b --trace          # traced peak memory of every stage, CPU, no GPU

Nothing is downloaded: the model is built from a config with random weights, and the
evaluation rows use a tokenizer trained on synthetic text. The two timings of a ratio are
taken in the same repeat, one after the other, and each row prints the median and the
[min, max] of the ratio over --repeats. Step times are those `ilu.unlearn` logs itself
(its second step: the first one allocates the optimizer's state).

Proportions are the paper's: 4 forget + 4 retain sequences per step (batch 1 x 4 micro-
batches) and 48 environment examples; --size tiny scales the lengths down by 4 (forget and
retain 256 tokens, environment 64), 7b uses 1,024 and 256.
"""
import argparse
import copy
import os
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path

if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
    # A fixed threshold stops glibc from keeping freed large blocks, so the process's resident
    # memory follows what torch holds: what the CPU memory rows read. Restart once with it.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 17)
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ilu  # noqa: E402
import runlib  # noqa: E402
import memtrace  # noqa: E402

SIZES = {
    "tiny": dict(model=dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
                 seq=256, env_len=64, grad_batch=8, mc=64, gen=16, gen_tokens=32, repeats=5),
    "micro": dict(model=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
                  seq=32, env_len=16, grad_batch=4, mc=8, gen=4, gen_tokens=8, repeats=1),  # the test's
    "7b": dict(model=dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096),
               seq=1024, env_len=256, grad_batch=8, mc=64, gen=8, gen_tokens=32, repeats=3),
}
TRACE = {  # --trace: the stages' data (memtrace.stages); 7b: the paper's settings
    "7b": dict(grad_accum=2),   # the peak of the paper's 4 micro-batches (memtrace.stages), in half the time
    "tiny": dict(seq=256, env_len=64, rmu_seq=128, rmu_layer=2, finetune_len=64, eval_len=256, gen_len=512),
    "micro": dict(seq=32, env_len=16, rmu_seq=16, rmu_layer=1, finetune_len=16, eval_len=32, gen_len=16),
}
PLAN_GB = {"NPO + ILU(GSM8K), full estimator": "≈ 68 GB", "NPO + ILU(GSM8K), env_micro_batch 8": "≈ 65 GB",
           "RMU": "≈ 17 GB"}  # the README's arithmetic plan, before the trace
WORDS = ("cell virus protein gene enzyme host strain membrane sample culture dose agent vector "
         "assay toxin spore lab result method test signal model data field value").split()


# -- measuring -----------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra(fn, device) -> float | None:
    """Peak memory above the level before fn, in GiB: CUDA's allocator on a GPU, the
    process's resident set (sampled every millisecond) on Linux CPUs; None elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    if not os.path.exists("/proc/self/statm"):
        fn()
        return None
    base, peak, done = _rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    t = threading.Thread(target=watch)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return (max(peak[0], _rss()) - base) / 2 ** 30


def spread(xs) -> str:
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}, {max(xs):.3f}]"


# -- data ----------------------------------------------------------------------------------------

def questions(n, seed=0):
    rng = random.Random(seed)
    sent = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [dict(question=sent(12) + "?", choices=[sent(3) for _ in range(4)], answer=rng.randrange(4),
                 subject="biology") for _ in range(n)]


def tokenizer_for(qs, vocab):
    texts = [ilu.mc_prompt(q["question"], q["choices"], "biology") + " " + "ABCD"[q["answer"]] for q in qs]
    return runlib.train_tokenizer(texts * 4, vocab_size=min(vocab, 2048))


# -- the rows --------------------------------------------------------------------------------------

def bare_step(model, opt, forget, retain, device):
    """The loop's unavoidable work for the same batches: forward, NLL, backward, clip, AdamW."""
    for i in range(4):
        for rows in (forget[i:i + 1], retain[i:i + 1]):
            b = ilu.collate(rows, device)
            (ilu.token_nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                           b["labels"]) / 4).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def env_forward_backward(model, env, device):
    """One plain forward and backward over the environment batch: compute ILU cannot avoid."""
    b = ilu.collate(env, device)
    ilu.token_nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]).backward()
    model.zero_grad(set_to_none=True)


def penalty_autograd(logits, labels):
    """IRMv1 by its definition: d CE(w * logits) / dw at w = 1 by autograd, squared (double backward)."""
    z, y = logits[:, :-1].float(), labels[:, 1:]
    w = torch.ones((), device=z.device, requires_grad=True)
    ce = torch.nn.functional.cross_entropy((w * z).reshape(-1, z.size(-1)), y.reshape(-1), ignore_index=-100)
    (g,) = torch.autograd.grad(ce, w, create_graph=True)
    return g ** 2


def penalty_step(model, env, device, fn):
    b = ilu.collate(env, device)
    fn(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]).backward()
    model.zero_grad(set_to_none=True)


def npo_step(model, fb, rb, ref):
    """NPO forward and backward with the reference's log-probs cached (a tensor) or live (a model)."""
    if isinstance(ref, torch.Tensor):
        ref_logp = ref
    else:
        with torch.no_grad():
            ref_logp = ilu.sequence_logprob(ref(input_ids=fb["input_ids"], attention_mask=fb["attention_mask"]).logits,
                                            fb["labels"])
    f = model(input_ids=fb["input_ids"], attention_mask=fb["attention_mask"]).logits
    loss = ilu.npo_loss(ilu.sequence_logprob(f, fb["labels"]), ref_logp)
    loss = loss + ilu.token_nll(model(input_ids=rb["input_ids"], attention_mask=rb["attention_mask"]).logits,
                                rb["labels"])
    loss.backward()
    model.zero_grad(set_to_none=True)


def trace_table(args):
    """The traced peak memory of every stage, by category, beside the README's arithmetic plan."""
    S, G = SIZES[args.size], memtrace.GiB
    stages = {k: v for k, v in memtrace.stages(S["model"]["vocab_size"], **TRACE[args.size]).items()
              if not args.only or any(o in k for o in args.only)}
    answer = TRACE[args.size].get("env_len", 256) // 2
    cfg = dict(S["model"])
    print(f"bench.py --size {args.size} --trace: Mistral shape, bf16, gradient "
          f"checkpointing, traced under FakeTensorMode on {platform.processor() or platform.machine()}; "
          f"torch {torch.__version__}", flush=True)
    head = ["stage", "params", "grads", "optimizer", "activations", "temporaries", "peak (GiB)", "README plan",
            "trace time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    print("\n".join(lines), flush=True)
    for name, stage in stages.items():
        t0 = time.perf_counter()
        m = memtrace.trace(stage, cfg, fake=True, answer_tokens=answer)
        n = m["PARAM"] // 2                                       # bf16: 2 bytes a parameter
        row = [name, *[f"{m[c] / G:.2f}" for c in memtrace.CATEGORIES], f"**{m['total'] / G:.2f}**",
               PLAN_GB.get(name, "–") if args.size == "7b" else "–", f"{time.perf_counter() - t0:.0f} s"]
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    tv = 2 * n * 2 / G                    # state_of(theta_o) and state_of(theta_u), bf16, on the CPU
    lines.append(f"\n{n / 1e9:.2f}B parameters. Task-vector analysis (CPU memory, arithmetic: not traced): "
                 f"{tv:.1f} GiB for the two CPU "
                 f"snapshots theta_o and theta_u (state_of, bf16); the fine-tuned models are read one tensor at a "
                 f"time (runlib.SavedState), plus two fp64 copies of the largest tensor "
                 f"({2 * 8 * cfg['vocab_size'] * cfg['hidden_size'] / G:.1f} GiB) while a cosine is summed.")
    print(lines[-1])
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--repeats", type=int, default=0, help="repeats per ratio (default: tiny 5, 7b 3)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    ap.add_argument("--whole-steps", action="store_true",
                    help="also the peak-memory rows of whole steps (always on with cuda; GPU memory only)")
    ap.add_argument("--trace", action="store_true",
                    help="instead: trace each stage's peak memory on the CPU without allocating it (memtrace.py)")
    ap.add_argument("--only", nargs="+", default=[], metavar="TEXT",
                    help="--trace: only the stages whose name contains one of these (e.g. 'low memory')")
    ap.add_argument("--out", default="", help="also write the table (markdown) to this file")
    args = ap.parse_args()
    if args.trace:
        return trace_table(args)
    S = SIZES[args.size]
    reps = args.repeats or S["repeats"]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench.py: --device cuda but torch sees no GPU: run on a GPU machine or drop --device", file=sys.stderr)
        sys.exit(2)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import MistralConfig, MistralForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    t0 = time.perf_counter()
    torch.set_default_dtype(dtype)
    with device:
        model = MistralForCausalLM(MistralConfig(**S["model"]))
    torch.set_default_dtype(torch.float32)
    if args.size == "7b":
        ilu.enable_checkpointing(model)
    n_params = sum(p.numel() for p in model.parameters())
    where = torch.cuda.get_device_name() if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    head = (f"bench.py --size {args.size}: {n_params / 1e6:,.1f}M parameters, {str(dtype)[6:]}, on {where}; "
            f"torch {torch.__version__}; {reps} repeats (built in {time.perf_counter() - t0:.0f} s)")
    print(head, flush=True)

    V, L, E = S["model"]["vocab_size"], S["seq"], S["env_len"]
    forget, retain = memtrace.rows(8, L, V, seed=1), memtrace.rows(8, L, V, seed=2)
    env = memtrace.rows(48, E, V, answer=E - E // 2, seed=3)
    common = dict(forget=forget, retain=retain, method="npo", batch_size=1, grad_accum=4, lr=1e-5, steps=2,
                  progress=False, log=lambda s: None)

    def step_ms(**kw):
        return ilu.unlearn(model, **{**common, **kw})[1]["ms"] / 1000

    t = {k: [] for k in ("npo", "ilu", "split", "envfb", "bare")}

    rows = []

    def add(*row):                         # each row is printed as it is measured
        rows.append(row)
        print("  " + " | ".join(row), flush=True)

    for r in range(reps):
        t["npo"].append(step_ms())
        t["ilu"].append(step_ms(envs={"gsm8k": env}, env_batch_size=48))
        t["split"].append(step_ms(envs={"gsm8k": env}, env_batch_size=48, env_grad_batch=S["grad_batch"]))
        model.train()
        t["envfb"].append(timed(lambda: env_forward_backward(model, env, device), device))
        opt = ilu.AdamWSR(model.parameters(), lr=1e-5)          # one optimizer state at a time (7B)
        bare_step(model, opt, forget, retain, device)                     # allocates its state
        t["bare"].append(timed(lambda: bare_step(model, opt, forget, retain, device), device))
        opt = None
        print(f"  repeat {r + 1}/{reps}: NPO {t['npo'][-1]:.2f} s, ILU {t['ilu'][-1]:.2f} s, "
              f"split {t['split'][-1]:.2f} s, env fwd+bwd {t['envfb'][-1]:.2f} s, bare {t['bare'][-1]:.2f} s",
              flush=True)
    ratio = lambda a, b: [x / y for x, y in zip(a, b)]  # noqa: E731

    def timed_ratio(num, den) -> str:      # den then num, timed one after the other in each repeat
        pairs = [(timed(den, device), timed(num, device)) for _ in range(reps)]
        return spread([n / d for d, n in pairs])
    unavoidable = [n + e for n, e in zip(t["npo"], t["envfb"])]
    add("ILU step / NPO step (48 env examples; 4 + 4 sequences)", spread(ratio(t["ilu"], t["npo"])), "")
    add("ILU step / (NPO step + plain fwd+bwd of the env batch)", spread(ratio(t["ilu"], unavoidable)),
        "overhead above unavoidable compute")
    add(f"split ILU step ({S['grad_batch']} for the gradient) / ILU step", spread(ratio(t["split"], t["ilu"])), "")
    add("split ILU step / NPO step", spread(ratio(t["split"], t["npo"])), "")
    add("unlearn NPO step / bare fwd+bwd+AdamW step, same batches", spread(ratio(t["npo"], t["bare"])),
        f"unlearn {8 * L / statistics.median(t['npo']):,.0f} tok/s, bare {8 * L / statistics.median(t['bare']):,.0f} tok/s")

    # the closed-form penalty against its autograd definition
    model.train()
    closed = lambda: penalty_step(model, env, device, ilu.irm_penalty)  # noqa: E731
    auto = lambda: penalty_step(model, env, device, penalty_autograd)  # noqa: E731
    closed(), auto()                                                   # warm-up
    times = timed_ratio(auto, closed)
    mc_, ma = peak_extra(closed, device), peak_extra(auto, device)
    mem = f"peak memory {ma:.3f} / {mc_:.3f} GiB = {ma / mc_:.2f}" if mc_ and ma else "memory: n/a here"
    add("autograd double-backward penalty / closed form (fwd+bwd, env batch)", times, mem)

    # NPO with the reference's log-probs cached against a live reference model
    fb, rb = ilu.collate(forget[:4], device), ilu.collate(retain[:4], device)
    cached = ilu.reference_logprobs(model, forget[:4], batch_size=1).to(device)
    model.train()
    m_cached = peak_extra(lambda: npo_step(model, fb, rb, cached), device)

    def live_from_scratch():
        ref = copy.deepcopy(model).eval()
        npo_step(model, fb, rb, ref)

    m_live = peak_extra(live_from_scratch, device)
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    times = timed_ratio(lambda: npo_step(model, fb, rb, ref), lambda: npo_step(model, fb, rb, cached))
    ref = None
    mem = (f"peak memory {m_live:.3f} / {m_cached:.3f} GiB = {m_live / m_cached:.2f} (live includes its copy)"
           if m_cached and m_live else "memory: n/a here")
    add("NPO fwd+bwd, live reference / cached log-probs (4 + 4)", times, mem)
    model.eval()

    # evaluation: one forward per MC question against four continuations; batched generation
    qs = questions(S["mc"])
    tok = tokenizer_for(qs, V)
    one = lambda: ilu.mc_accuracy(model, tok, qs, return_predictions=True, progress=False)  # noqa: E731
    four = lambda: ilu.mc_accuracy(model, tok, qs, return_predictions=True, one_forward=False,  # noqa: E731
                                   progress=False)
    same_mc = one()[1] == four()[1]
    add(f"mc_accuracy, four continuations / one forward ({S['mc']} questions)", timed_ratio(four, one),
        f"same predictions: {'yes' if same_mc else 'NO'}")
    prompts = [q["question"] for q in qs[:S["gen"]]]
    n_new = S["gen_tokens"]
    batched = lambda: ilu.generate(model, tok, prompts, n_new, batch_size=len(prompts), progress=False)  # noqa: E731
    single = lambda: ilu.generate(model, tok, prompts, n_new, batch_size=1, progress=False)  # noqa: E731
    same_gen = sum(a == b for a, b in zip(batched(), single()))
    add(f"greedy generation, one at a time / batched ({len(prompts)} prompts, {n_new} tokens)",
        timed_ratio(single, batched), f"same text: {same_gen}/{len(prompts)}")

    # peak memory of whole steps, as the runners take them (the 7B memory plan)
    if device.type == "cuda" or args.whole_steps:
        def peak_of(fn):
            if device.type != "cuda":
                fn()
                return "n/a (CPU)"
            torch.cuda.reset_peak_memory_stats()
            fn()
            return f"{torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB"

        for name, kw in (("NPO + ILU(48), 1 x 4", dict(envs={"gsm8k": env}, env_batch_size=48)),
                         (f"NPO + split ILU(48 / {S['grad_batch']}), 1 x 4", dict(envs={"gsm8k": env}, env_batch_size=48,
                                                                 env_grad_batch=S["grad_batch"])),
                         ("NPO, 1 x 4", {})):
            add(f"peak GPU memory, {name} step", peak_of(lambda: step_ms(**kw)),
                "weights, gradients, AdamWSR moments, activations")
        rf, rr = memtrace.rows(8, L // 2, V, seed=4), memtrace.rows(8, L // 2, V, seed=5)
        layer = min(7, S["model"]["num_hidden_layers"] - 2)
        rmu = lambda: ilu.unlearn(model, rf, rr, "rmu", batch_size=4, grad_accum=1, steps=2, lr=5e-5,  # noqa: E731
                                  rmu_layer=layer, max_grad_norm=None, progress=False, log=lambda s: None)
        add(f"peak GPU memory, RMU step (layer {layer}, 4 x {L // 2})", peak_of(rmu), "three down-projections trained")

    table = ("| measurement | ratio: median [min, max] | note |\n|---|---|---|\n"
             + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows))
    print("\n" + head + "\n\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(head + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
