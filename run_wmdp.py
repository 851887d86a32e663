"""Reproduce the WMDP experiments of ILU (arXiv:2506.01339): Table 2, Figure 3, Table 3, Figure 4.

    python run_wmdp.py --method npo --ilu-env gsm8k                   # NPO + ILU(GSM8K), Zephyr-7B, one GPU
    python run_wmdp.py --method rmu --ilu-env none                    # the RMU baseline
    python run_wmdp.py --method npo --ilu-env gsm8k --tiny --data-dir ../shared/data   # CPU, minutes
    python run_wmdp.py --report runs/npo runs/npo-ilu --out runs/report   # merge runs: Table 2, Figure 4

Pipeline (each stage saved to OUT/results.json as it ends; rerun the command to resume):
evaluate the original model (WMDP-Bio, WMDP-Cyber, MMLU) -> fine-tune it on each task (the
"Original" row's RA and FA, and the control) -> unlearn -> evaluate -> fine-tune the unlearned
model on each task, evaluating forget quality along the way -> optional relearning attack
(Table 3) -> task-vector cosines -> summary (OUT/results.md, OUT/curves.png).

--tiny swaps the 7B model for a tiny Llama trained from scratch on CPU (cached) on text that
states the answers of WMDP-Bio and MMLU questions, plus downstream-task text: a
tutorial-scale stand-in for the pipeline, not a reproduction of the paper's numbers.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import ilu
import ilu_scale as scale
import runlib
from runlib import h

TINY = dict(  # --tiny: sizes for 2 CPU cores (about 3 minutes with the target's training; see README)
    npo=dict(lr=5e-4), graddiff=dict(lr=5e-4), rmu=dict(lr=5e-3, rmu_layer=2, rmu_coeff=100.0, rmu_alpha=100.0),
    common=dict(steps=60, batch_size=8, grad_accum=1, max_length=256, env_batch_size=16, finetune_steps=40,
                finetune_batch=8, finetune_lr=1e-4, fa_limit=200, relearn_batch=8, relearn_lr=1e-4))


@dataclass
class Config(runlib.CommonConfig):
    model: str = h("target model: hub name, local folder, or smollm2-135m (prepared offline by prepare_model.py); "
                   "ignored with --tiny", default="HuggingFaceH4/zephyr-7b-beta")
    out: str = h("output folder: results.json, results.md, curves.png, unlearned/", default="runs/wmdp")
    forget_corpora: list = h("forget corpora (the bio forget corpus is gated: local copy)",
                             default_factory=lambda: ["wmdp-bio-forget", "wmdp-cyber-forget"])
    retain_corpora: list = h("retain corpora", default_factory=lambda: ["wmdp-bio-retain", "wmdp-cyber-retain"])
    curve_points: int = h("forget quality is measured at this many evenly spaced fine-tuning steps (and RA's)", default=4)
    eval_limit: int = h("questions per benchmark (WMDP-Bio, WMDP-Cyber, MMLU); 0: all", default=0)
    task_vectors: bool = h("cosines of the task vectors on --tv-task (needs it in --finetune-on)", default=True)
    tv_task: str = h("task of the task-vector analysis", default="gsm8k")
    tiny_questions: int = h("--tiny: WMDP-Bio and MMLU questions whose answers the target learns", default=64)
    tiny_prose: bool = h("--tiny: the target also learns each answer as a sentence (prose()), as a corpus states it",
                         default=False)
    tiny_eos: bool = h("--tiny: end each downstream-task text with EOS in target training, as the fine-tuning "
                       "pairs end", default=False)


# -- data and models ------------------------------------------------------------------------------

def mc_pair(q: dict) -> dict:
    """A question in the evaluation's own format (prompt) and its answer letter (answer)."""

    return {"prompt": ilu.mc_prompt(q["question"], q["choices"], q["subject"]), "answer": " " + "ABCD"[q["answer"]]}


def mc_text(q: dict) -> str:
    p = mc_pair(q)
    return p["prompt"] + p["answer"]


def prose(q: dict) -> str:
    """A question's answer stated as a sentence: what a forget corpus says, not how the test asks it."""
    return f"{q['question'].strip()} The answer is {q['choices'][q['answer']].strip()}."


def short(questions, n, seed=None):
    """n questions that fit the tiny context, n/4 with each answer letter (so chance is exactly 1/4)."""
    qs = [q for q in questions if len(mc_text(q)) < 500]
    if seed is not None:
        random.Random(seed).shuffle(qs)
    per_letter, out = {k: 0 for k in range(4)}, []
    for q in qs:
        if per_letter[q["answer"]] < n // 4:
            per_letter[q["answer"]] += 1
            out.append(q)
    return out


def setup_tiny(cfg: Config, tasks: list[str]):
    """Tiny target, its questions, and the forget and retain sets.

    The target learns the answers of n WMDP-Bio questions (to forget) and n MMLU questions
    (to keep) as question-then-letter texts, mixed with downstream-task texts. Unlearning
    then targets the answer letter of each forget question (prompt masked), and the retain
    set is the MMLU questions with their letters. tiny_prose adds each question's prose()
    sentence to the target's text (the study's forget-on-prose recipe unlearns those);
    tiny_eos ends the task texts with EOS.
    """
    n = cfg.tiny_questions
    bio = short(runlib.load_questions("wmdp-bio", cfg.data_dir), n)
    cyber = short(runlib.load_questions("wmdp-cyber", cfg.data_dir), n)           # never trained: chance level
    mmlu = short(runlib.load_questions("mmlu", cfg.data_dir), n, seed=0)
    general = []
    for t in tasks:
        train, _, _ = runlib.task_split(t, cfg.data_dir, None, None, cfg.seed)
        general += [r["prompt"] + r["answer"] + ("</s>" if cfg.tiny_eos else "")   # </s>: runlib.train_tokenizer's EOS
                    for r in train[:cfg.tiny_general // max(len(tasks), 1)]]
    facts = [mc_text(q) for q in bio + mmlu] + ([prose(q) for q in bio + mmlu] if cfg.tiny_prose else [])
    texts = facts * cfg.tiny_repeat + general
    random.Random(0).shuffle(texts)
    recipe = dict(name="wmdp", hidden=cfg.tiny_hidden, layers=cfg.tiny_layers, steps=cfg.tiny_steps)
    model, tok, _ = runlib.cached_tiny_target(cfg.cache_dir, recipe, texts, hidden=cfg.tiny_hidden,
                                              layers=cfg.tiny_layers, steps=cfg.tiny_steps, max_length=256)
    return model, tok, dict(bio=bio, cyber=cyber, mmlu=mmlu), [mc_pair(q) for q in bio], [mc_pair(q) for q in mmlu]


MIN_CHARS = 50  # WMDP's RMU code (rmu/utils.py, get_data) drops corpus texts of 50 characters or fewer


def setup_full(cfg: Config):
    """Zephyr (or --model), the questions, and the corpora as the WMDP/RMU code reads them: one
    example per document, its first --max-length tokens (RMU: 512; the bio/cyber 512/768 split of
    its forget lengths is one --max-length here), texts of MIN_CHARS characters or fewer dropped.
    The ILU authors' pipeline is not public; the paper's RMU baseline follows this recipe."""

    model, tok = scale.load_model(runlib.model_path(cfg.model, cfg.cache_dir), runlib.model_dtype(), runlib.DEVICE,
                                gradient_checkpointing=True, sharded=runlib.sharded())
    qs = {k: runlib.load_questions(name, cfg.data_dir) for k, name in
          (("bio", "wmdp-bio"), ("cyber", "wmdp-cyber"), ("mmlu", "mmlu"))}
    if cfg.eval_limit:
        qs = {k: v[:cfg.eval_limit] for k, v in qs.items()}
    forget = [t for c in cfg.forget_corpora for t in runlib.load_corpus(c, cfg.data_dir) if len(t) > MIN_CHARS]
    retain = [t for c in cfg.retain_corpora for t in runlib.load_corpus(c, cfg.data_dir) if len(t) > MIN_CHARS]
    return model, tok, qs, forget, retain


# -- stages ------------------------------------------------------------------------------------------

def evaluate(model, tok, qs, cfg) -> dict:

    acc = {k: ilu.mc_accuracy(model, tok, v, batch_size=cfg.eval_batch) for k, v in qs.items()}
    return dict(wmdp_bio=acc["bio"], wmdp_cyber=acc["cyber"], mmlu=acc["mmlu"], fq=ilu.forget_quality(acc["bio"]))


def finetune_stage(model, tok, task, cfg, qs, results, name, save_to=None):
    """Fine-tune on one task; forget quality at the RA checkpoints, the curve points and each epoch; FA at the end."""

    train, test, note = runlib.task_split(task, cfg.data_dir, None, cfg.fa_limit or None, cfg.seed)
    data = ilu.encode_pairs(tok, train, max_length=cfg.max_length)
    total, per_epoch = runlib.finetune_steps(cfg, len(data))
    points = sorted(set(ilu.ra_checkpoints(total)) | {max(1, round(total * (i + 1) / cfg.curve_points))
                                                      for i in range(cfg.curve_points)})
    curve = []

    def hook(step, epoch):
        acc = ilu.mc_accuracy(model, tok, qs["bio"], batch_size=cfg.eval_batch, progress=False)
        curve.append(dict(step=step, epoch=round(epoch, 3), wmdp_bio=acc, fq=ilu.forget_quality(acc)))

    start = time.perf_counter()
    losses = scale.finetune(model, data, max_steps=total, batch_size=cfg.finetune_batch, lr=cfg.finetune_lr,
                          hook=hook, hook_steps=points, hook_each_epoch=total / per_epoch <= 10,
                          low_memory=cfg.low_memory or None, seed=cfg.seed, desc=f"{name}")
    curve = list({c["step"]: c for c in curve}.values())          # an epoch end may repeat a point
    fq_at = {c["step"]: c["fq"] for c in curve}
    entry = dict(task=task, steps=total, epochs=round(total / per_epoch, 3), train_examples=len(data),
                 fa_examples=len(test), points=curve, ra=ilu.relearning_robustness(fq_at, total),
                 fa=ilu.task_accuracy(model, tok, test, batch_size=cfg.eval_batch),
                 loss_first=losses[0], loss_last=losses[-1])
    if note:
        entry["note"] = note
    if save_to:
        scale.save_model(model, tok, save_to)
    results.record(name, entry, start)
    print(f"{name}: RA {entry['ra']:.3f} | FA {entry['fa']:.3f} | FQ along the way "
          + " ".join(f"{c['step']}:{c['fq']:.2f}" for c in curve))


def summarize(results: runlib.Results, tasks: list[str]) -> dict:
    st = results.data["stages"]
    rows = {}
    for who, eval_stage in (("original", "original"), ("unlearned", "unlearned")):
        if eval_stage not in st:
            continue
        ft = {t: st[f"{who}/finetune/{t}"] for t in tasks if f"{who}/finetune/{t}" in st}
        rows[who] = dict(fq=st[eval_stage]["fq"], mmlu=st[eval_stage]["mmlu"],
                         wmdp_bio=st[eval_stage]["wmdp_bio"], wmdp_cyber=st[eval_stage]["wmdp_cyber"],
                         avg_ra=sum(e["ra"] for e in ft.values()) / len(ft) if ft else None,
                         avg_fa=sum(e["fa"] for e in ft.values()) / len(ft) if ft else None,
                         ra={t: e["ra"] for t, e in ft.items()}, fa={t: e["fa"] for t, e in ft.items()})
    if "relearn" in st:
        rows["relearn"] = st["relearn"]
    if "task_vectors" in st:
        rows["task_vectors"] = st["task_vectors"]
    return rows


def table2_rows(label: str, summary: dict, original: bool = True) -> list[list]:
    rows = []
    for who, name in (("original", "Original"), ("unlearned", label)):
        s = summary.get(who)
        if s and (who == "unlearned" or original):
            rows.append([name, s["fq"], 100 * s["mmlu"], s["avg_ra"], None if s["avg_fa"] is None else 100 * s["avg_fa"]])
    return rows


def write_report(results: runlib.Results, cfg: Config, tasks: list[str]) -> str:
    s = results.data["summary"]
    label = runlib.method_label(results.data["config"])
    md = [f"# WMDP: {label}{' (tiny)' if cfg.tiny else ''}", "",
          "Table 2 layout (FQ = 1 - WMDP-Bio accuracy; MMLU and FA in %; RA = mean FQ at the "
          "first-quartile, median and final fine-tuning checkpoints):", "",
          runlib.markdown_table(["method", "FQ", "MMLU", "Avg RA", "Avg FA"], table2_rows(label, s)), ""]
    per_task = [[f"{who} {t}", s[who]["ra"].get(t), None if t not in s[who]["fa"] else 100 * s[who]["fa"][t]]
                for who in ("original", "unlearned") if who in s for t in tasks]
    md += ["Per fine-tuning set:", "", runlib.markdown_table(["model, task", "RA", "FA"], per_task), ""]
    st = results.data["stages"]
    for who in ("original", "unlearned"):
        for t in tasks:
            e = st.get(f"{who}/finetune/{t}")
            if e:
                md.append(f"- forget quality while fine-tuning the {who} model on {t} (step: FQ): "
                          + ", ".join(f"{p['step']}: {p['fq']:.3f}" for p in e["points"])
                          + (f" ({e['note']})" if e.get("note") else ""))
    if "relearn" in s:
        r = s["relearn"]
        md += ["", f"Relearning attack (Table 3): FQ {r['fq_before']:.3f} -> {r['fq_after']:.3f} after fine-tuning "
               f"on {r['samples']} forget samples ({r['eval_questions']} questions evaluated)."]
    if "task_vectors" in s:
        v = s["task_vectors"]
        md += ["", f"Task vectors on {v['task']}: cos(tau_u->ft, tau_ft) = {v['cos_uft_ft']:.3f}, "
               f"cos(tau_u->ft, tau_u) = {v['cos_uft_u']:.3f}."]
    text = "\n".join(md) + "\n"
    runlib.write_atomic(Path(cfg.out) / "results.md", text)
    plot_curves(st, tasks, Path(cfg.out) / "curves.png", label)
    return text


def plot_curves(stages: dict, tasks: list[str], path: Path, label: str):
    """Figure-3-style curves (FQ vs fine-tuning step), if matplotlib is installed."""
    plt = runlib.pyplot()
    if plt is None:
        print("matplotlib is not installed: no curves.png (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(3.2 * max(len(tasks), 1), 3), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for who, style in (("original", "--"), ("unlearned", "-")):
            e = stages.get(f"{who}/finetune/{t}")
            if e:
                ax.plot([0] + [p["step"] for p in e["points"]],
                        [stages[who]["fq"]] + [p["fq"] for p in e["points"]], style, marker="o",
                        label="Original" if who == "original" else label)
        ax.set_title(t)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("forget quality (1 - WMDP-Bio acc)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- report mode: several runs into one Table 2 and Figure 4 -------------------------------------------

def report(cfg: Config):
    runs = runlib.load_reports(cfg.report)
    rows, heat, tasks = [], [], []
    for i, r in enumerate(runs):
        label = runlib.method_label(r["config"])
        rows += table2_rows(label, r["summary"], original=(i == 0))
        st = r["stages"]
        for t in r["config"]["finetune_on"]:
            if f"unlearned/finetune/{t}" in st and t not in tasks:
                tasks.append(t)
        heat.append((label, {t: st[f"unlearned/finetune/{t}"]["points"][-1]["fq"]
                             for t in tasks if f"unlearned/finetune/{t}" in st}))
    md = ["# WMDP report", "", "Table 2:", "", runlib.markdown_table(["method", "FQ", "MMLU", "Avg RA", "Avg FA"], rows),
          "", "Figure 4 (forget quality after fine-tuning; rows: method and ILU environment, columns: fine-tuning set):",
          "", runlib.markdown_table(["method"] + tasks, [[lab] + [v.get(t) for t in tasks] for lab, v in heat])]
    text = "\n".join(md) + "\n"
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    runlib.write_atomic(Path(cfg.out) / "report.md", text)
    print(text)
    plt = runlib.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 3, 0.5 * len(heat) + 1.5))
    grid = [[v.get(t, float("nan")) for t in tasks] for _, v in heat]
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(heat)), [lab for lab, _ in heat])
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, label="forget quality after fine-tuning")
    fig.tight_layout()
    fig.savefig(Path(cfg.out) / "report.png", dpi=120)


# -- main ---------------------------------------------------------------------------------------------

def main():

    cfg = runlib.parse_config(Config, description=__doc__)
    if cfg.report:
        return report(cfg)
    cfg = runlib.resolve(cfg, TINY, positive=("tiny_questions", "tiny_steps"))
    results = runlib.start_run(cfg)

    model, tok, qs, forget_texts, retain_texts, tasks = runlib.setup(cfg, setup_full, setup_tiny)
    out = Path(cfg.out)

    def finetune(t, who):
        save = out / "tv" / f"{who}_ft" if cfg.task_vectors and t == cfg.tv_task else None
        finetune_stage(model, tok, t, cfg, qs, results, f"{who}/finetune/{t}", save)

    theta_o, theta_u = runlib.model_stages(
        model, tok, cfg, results, tasks, forget_texts, retain_texts, lambda: evaluate(model, tok, qs, cfg), finetune,
        lambda e: ", ".join(f"{k} {v:.3f}" for k, v in e.items() if k != "time_s"))

    if cfg.relearn and not results.done("relearn"):
        runlib.restore(model, theta_u)
        start = time.perf_counter()
        if cfg.tiny:  # relearn on half of the forgotten answers, measure the other half
            k = len(forget_texts) // 2
            sample, held_out = forget_texts[:k], qs["bio"][k:]
        else:
            sample = random.Random(cfg.seed).sample(forget_texts, min(cfg.relearn_samples or len(forget_texts),
                                                                      len(forget_texts)))
            held_out = qs["bio"]
        data = runlib.encode(tok, sample, cfg.max_length)

        def fq():
            return dict(fq=ilu.forget_quality(ilu.mc_accuracy(model, tok, held_out, batch_size=cfg.eval_batch)))

        attack = runlib.relearning_attack(model, data, cfg, fq, "relearn", lambda e: f"FQ {e['fq']:.3f}")
        results.record("relearn", dict(samples=len(sample), eval_questions=len(held_out), fq_before=attack["curve"][0]["fq"],
                                       fq_after=attack["curve"][-1]["fq"], **attack), start)

    tv = out / "tv"
    if (cfg.task_vectors and not results.done("task_vectors") and (tv / "original_ft").exists()
            and (tv / "unlearned_ft").exists()):
        start = time.perf_counter()
        u_ft = runlib.SavedState(tv / "unlearned_ft", theta_o, model)       # sharded: this rank's parts
        ft = runlib.SavedState(tv / "original_ft", theta_o, model)
        tau_u_ft, ranks = ilu.task_vector(u_ft, theta_u), scale.is_sharded(model)
        results.record("task_vectors", dict(
            task=cfg.tv_task, cos_uft_ft=scale.cosine(tau_u_ft, ilu.task_vector(ft, theta_o), across_ranks=ranks),
            cos_uft_u=scale.cosine(tau_u_ft, ilu.task_vector(theta_u, theta_o), across_ranks=ranks)), start)

    results.data["summary"] = summarize(results, tasks)
    results.save()
    print("\n" + write_report(results, cfg, tasks))


if __name__ == "__main__":
    runlib.run_main(main)
