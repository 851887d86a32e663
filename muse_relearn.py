"""The relearning attack on MUSE (the paper's Table 3), run_muse.py's --relearn: the forget passages split in two
by the seed, the attack on one half read on the other, the stop rule that matches forgetting across methods,
and the table. run_muse.py calls it; the attack itself (runlib.relearning_attack) is the one run_wmdp.py uses.
"""
from __future__ import annotations

import random
import time

from tqdm import tqdm

import ilu
import ilu_scale as scale
import runlib

SHINGLE = 6   # words: two texts share a passage when they share a run of this many words of it


def shingles(text: str) -> set[str]:
    """Every run of SHINGLE consecutive words of a text."""
    w = text.split()
    return {" ".join(w[i:i + SHINGLE]) for i in range(max(len(w) - SHINGLE + 1, 1))}


def passage_shingles(passage: dict) -> set[str]:
    """A verbmem passage's word runs: the end of its prompt (the last 300 characters; MUSE's full prompts are
    whole articles) and its ground truth, the text VerbMem reads."""
    return shingles(passage["prompt"][-300:]) | shingles(passage["gt"])


def relearn_split(passages: list[dict], share: float, seed: int) -> tuple[list[int], list[int]]:
    """The forget passages in two halves drawn by seed: (attack, held out) indices, disjoint and covering all,
    the attack half share * n passages (as near as whole groups allow). Passages that share a run of words
    (two cuts of one article) form a group that stays in one half, so each half keeps all its text."""
    n, sh = len(passages), [passage_shingles(p) for p in passages]
    root = list(range(n))

    def find(i):
        while root[i] != i:
            i = root[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if sh[i] & sh[j]:
                root[find(j)] = find(i)
    groups = [[i for i in range(n) if find(i) == r] for r in sorted({find(i) for i in range(n)})]
    random.Random(seed).shuffle(groups)
    k, attack = round(share * n), []
    for g in groups:
        if len(attack) + len(g) <= k:
            attack += g
    if not 0 < len(attack) < n:
        raise ilu.ILUError(f"--relearn-share {share} leaves a half of the {n} forget passages empty: choose a share that puts "
                           "at least one passage in each half")
    return sorted(attack), sorted(set(range(n)) - set(attack))


def locates(text: str, passage: dict) -> bool:
    """Whether a text holds a verbmem passage where it was cut: its prompt's end or its ground truth's start."""
    return passage["prompt"][-150:] in text or passage["gt"].strip()[:100] in text


def attack_texts(texts: list[str], passages: list[dict], attack: list[int], held: list[int]) -> list[str]:
    """The texts that hold an attack-half passage and share no run of words with a held-out one.
    --tiny, --small: the attack half's passages themselves (the forget QA hold none); full scale: the
    forget documents they were cut from, less any that shares text with a held-out passage (MUSE-News's
    boilerplate paragraphs repeat across documents)."""
    theirs = set().union(*(passage_shingles(passages[i]) for i in held))
    return [t for t in texts if any(locates(t, passages[i]) for i in attack) and not shingles(t) & theirs]


def relearn_sets(cfg, tok, ev: dict, forget: list) -> dict:
    """The two halves of the forget passages, their NLL pairs, the attack set and the KnowMem QA (all
    held out: MUSE writes its QA from the forget documents, not from the verbmem passages)."""

    passages = ev["verbmem"]
    attack, held = relearn_split(passages, cfg.relearn_share, cfg.seed)
    if cfg.relearn_on == "forget":
        texts = attack_texts([t for t in forget if isinstance(t, str)], passages, attack, held)
    else:  # holdout: news in the passages' format, none of their content
        texts = holdout_pool(cfg, ev)[0][:len(attack)]
    if not texts:
        raise ilu.ILUError(f"--relearn finds no {cfg.relearn_on} text for the attack half: check the data in --data-dir")
    if 0 < cfg.relearn_samples < len(texts):
        keep = sorted(random.Random(cfg.seed).sample(range(len(texts)), cfg.relearn_samples))
        texts = [texts[i] for i in keep]
    leaked = [i for i in held if any(shingles(t) & passage_shingles(passages[i]) for t in texts)]
    if leaked:   # the attack must never train on the text it is read on
        raise ilu.ILUError(f"--relearn's attack set holds held-out passage {leaked[0]}: the split is broken")
    halves = {"attack": attack, "held": held}
    d = dict(split=halves, attack_texts=texts, qa=ev["forget_qa"], icl=ev["forget_icl"])
    for half, idx in halves.items():
        d[half] = [passages[i] for i in idx]
        d[f"nll_{half}"] = ilu.encode_pairs(tok, [dict(prompt=passages[i]["prompt"], answer=passages[i]["gt"])
                                                  for i in idx], max_length=2048, add_eos=False)
    return d


def holdout_pool(cfg, ev: dict) -> tuple[list[str], list[str]]:
    """MUSE holdout texts (neither forget nor retain) past those PrivLeak reads, cut as the passages are
    (--tiny, --small): the first half for --relearn-on holdout, the second for the ILU environment "news"
    (the forget set's format, none of its content). Full scale: MUSE's raw holdout documents for the
    attack (PrivLeak, which reads excerpts of them, is not read after it) and no "news" environment."""
    if not runlib.scaled(cfg):
        return runlib.load_corpus(f"muse-{cfg.corpus}-holdout", cfg.data_dir), []
    pool = runlib.load_muse("privleak", "holdout", cfg.corpus, cfg.data_dir)
    pool = [runlib.cut_words(t, cfg.tiny_prompt_chars + cfg.tiny_gt_chars) for t in pool[len(ev["privleak_holdout"]):]]
    return pool[:len(pool) // 2], pool[len(pool) // 2:]


def relearn_metrics(model, tok, rl: dict, cfg) -> dict:
    """VerbMem and the forget NLL of each half, KnowMem on the forget QA: what the attack is read by."""

    b, out = cfg.eval_batch, {}
    for half in ("held", "attack"):
        out[f"verbmem_{half}"] = ilu.verbmem(model, tok, rl[half], cfg.verbmem_tokens, b)
        out[f"forget_nll_{half}"] = runlib.answer_nll(model, rl[f"nll_{half}"], b)
    out["knowmem_forget"] = ilu.knowmem(model, tok, rl["qa"], rl["icl"], cfg.knowmem_tokens, b)
    return out


class HeldOutStop:
    """scale.unlearn's stop rule for --stop-verbmem: VerbMem on the held-out half after every step; at the
    first step at or below the threshold (plus --stop-tolerance), unlearning ends on that step or the one
    before, whichever lands nearer the threshold (the one before is kept as a CPU copy), so two methods
    stop at matched depth."""

    def __init__(self, model, tok, rl: dict, cfg):
        self.model, self.tok, self.rl, self.cfg, self.checks, self.before = model, tok, rl, cfg, [], None

    def __call__(self, step: int) -> bool:

        v, goal = ilu.verbmem(self.model, self.tok, self.rl["held"], self.cfg.verbmem_tokens, self.cfg.eval_batch,
                              progress=False), self.cfg.stop_verbmem
        self.checks.append(dict(step=step, verbmem_held=v))
        tqdm.write(f"  step {step}: VerbMem on the held-out half {v:.1f} "
                   f"(stop at <= {goal + self.cfg.stop_tolerance:.1f})")
        if v > goal + self.cfg.stop_tolerance:
            self.before = scale.state_of(self.model)
            return False
        if self.before is not None and abs(self.checks[-2]["verbmem_held"] - goal) < abs(goal - v):
            runlib.restore(self.model, self.before)           # the step before lands nearer: end there
            self.checks[-2]["kept"] = True
            tqdm.write(f"  unlearning ends on step {step - 1}, the nearer of the two")
        else:
            self.checks[-1]["kept"] = True
        return True


def relearn_stage(model, tok, cfg, rl: dict, results, who: str, state, theta_u=None, theta_o=None):
    """Attack the weights in `state` (a snapshot, or a saved folder's) on the attack set and record the
    metrics of relearn_metrics at step 0 and at each quartile. From the unlearned model (theta_u, theta_o
    given): the geometry of the relearning update against the unlearning update."""

    name, start = f"relearn/{who}", time.perf_counter()
    runlib.restore(model, state)
    data = runlib.encode(tok, rl["attack_texts"], cfg.max_length,
                         windows=cfg.corpus_windows and not runlib.scaled(cfg))
    entry = dict(split=rl["split"], attack_texts=len(data),
                 **runlib.relearning_attack(model, data, cfg, lambda: relearn_metrics(model, tok, rl, cfg), name,
                                            relearn_line))
    if theta_u is not None:
        tau_u, tau_rl = ilu.task_vector(theta_u, theta_o), ilu.task_vector(scale.state_of(model), theta_u)
        entry["geometry"] = dict(cos_back=ilu.cosine(tau_rl, tau_u), norm_u=ilu.norm(tau_u), norm_rl=ilu.norm(tau_rl))
    results.record(name, entry, start)


def relearn_line(e: dict) -> str:
    return (f"VerbMem held-out {e['verbmem_held']:.1f} | attack half {e['verbmem_attack']:.1f} | "
            f"forget NLL held-out {e['forget_nll_held']:.2f} | KnowMem forget {e['knowmem_forget']:.1f}")


def share_back(target: float, unlearned: float, after: float) -> float:
    """The share of the way back to the target: (after - unlearned) / (target - unlearned); 0 if nothing was forgotten."""
    return (after - unlearned) / (target - unlearned) if target != unlearned else 0.0


RELEARN_WHO = {"original": "Target (control)", "never_saw": "Never saw the passages (control)", "unlearned": None}


def relearn_table(results: runlib.Results, label: str) -> str:
    """VerbMem on the held-out half at each checkpoint of each attacked model, and the unlearned model's
    share back, beside the controls' movement."""
    st = results.data["stages"]
    rows, curves = [], {w: st[f"relearn/{w}"]["curve"] for w in RELEARN_WHO if f"relearn/{w}" in st}
    if not curves:
        return ""
    steps = [p["step"] for p in next(iter(curves.values()))]
    for who, curve in curves.items():
        held = [p["verbmem_held"] for p in curve]
        rows.append([RELEARN_WHO[who] or label, *[f"{v:.1f}" for v in held],
                     f"{curve[0]['verbmem_attack']:.1f} → {curve[-1]['verbmem_attack']:.1f}",
                     f"{curve[0]['forget_nll_held']:.2f} → {curve[-1]['forget_nll_held']:.2f}"])
    if "original" in curves and "unlearned" in curves:
        target, u = curves["original"][0]["verbmem_held"], [p["verbmem_held"] for p in curves["unlearned"]]
        rows.append([f"{label}: share back", *[f"{share_back(target, u[0], v):+.2f}" for v in u], "", ""])
    head = ["model", *[f"step {s}" for s in steps], "attack half", "forget NLL held-out"]
    n = {k: len(v) for k, v in next(iter(st[f"relearn/{w}"] for w in curves))["split"].items()}
    return (f"Relearning attack: fine-tuned on the attack half ({n['attack']} passages), read on the held-out half "
            f"({n['held']} passages): VerbMem at each checkpoint; share back = (after − unlearned) / "
            "(target − unlearned).\n\n" + runlib.markdown_table(head, rows) + "\n")


def check_relearn(cfg):
    """--relearn's options (one line, exit 2); with --relearn, no other fine-tuning unless --finetune-on is given."""
    if cfg.relearn_on not in ("forget", "holdout"):
        raise ilu.ILUError(f"unknown --relearn-on '{cfg.relearn_on}': forget or holdout")
    if cfg.stop_verbmem and not cfg.relearn:
        raise ilu.ILUError("--stop-verbmem reads the held-out half of --relearn's split: add --relearn")
    if cfg.stop_tolerance < 0:
        raise ilu.ILUError(f"--stop-tolerance must be >= 0 (got {cfg.stop_tolerance})")
    if not 0 < cfg.relearn_share < 1:
        raise ilu.ILUError(f"--relearn-share must be between 0 and 1 (got {cfg.relearn_share})")
    if cfg.relearn_steps < 0 or cfg.relearn_samples < 0 or cfg.relearn_epochs <= 0 or cfg.relearn_lr <= 0:
        raise ilu.ILUError("--relearn-steps and --relearn-samples must be >= 0, --relearn-epochs and --relearn-lr positive")
    if cfg.relearn and "finetune_on" not in getattr(cfg, "given", set()):
        cfg.finetune_on = []
