"""The tiny-scale study: does fine-tuning on unrelated tasks undo unlearning, and does ILU stop it?

    python benchmarks/tiny_study.py --data-dir ../shared/data                 # both settings, 3 seeds
    python benchmarks/tiny_study.py --data-dir ../shared/data --part wmdp     # one setting

On the runners' tiny targets (`run_wmdp.py --tiny`, `run_muse.py --tiny`: the same recipe,
the same cache) and with their --tiny unlearning and fine-tuning settings, for each method
variant and seed: unlearn; measure forgetting; then, each time from that unlearned model,
fine-tune on every available task and measure again; and run the relearning attack of the
paper's Table 3 (fine-tune on the first half of the forget items, measure the other half).
The control is the original target fine-tuned the same way, with the same seeds.

WMDP-tiny: accuracy on the 64 WMDP-Bio questions the target learnt (chance 0.25: answers are
balanced over the letters), MMLU accuracy as what is kept. MUSE-tiny: VerbMem and KnowMem
on the forget set, KnowMem on the retain set. Every cell is mean ± std over the seeds.
Relearning shows as a cell after fine-tuning well above the unlearned column; ILU works if
its rows rise less than the base method's, by more than the spread over seeds.
Writes the tables (markdown) and every raw number (json) to --out.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ilu  # noqa: E402
import runlib  # noqa: E402

# (method, lam, env_grad_batch): the base method, ILU(GSM8K) at three lambdas, and the split estimator
VARIANTS = {"wmdp": [("npo", 0, 0), ("npo", 0.1, 0), ("npo", 1, 0), ("npo", 10, 0), ("npo", 1, 4),
                     ("rmu", 0, 0), ("rmu", 0.1, 0), ("rmu", 1, 0), ("rmu", 10, 0)],
            "muse": [("npo", 0, 0), ("npo", 0.1, 0), ("npo", 1, 0), ("npo", 10, 0), ("npo", 1, 4)]}


def label(method, lam, split):
    if not lam:
        return method.upper()
    return f"{method.upper()} + ILU λ={lam:g}" + (f" (split {split})" if split else "")


def ms(values, d=3):
    values = [v for v in values if v is not None]
    if not values:
        return "diverged"
    return f"{statistics.mean(values):.{d}f} ± {statistics.stdev(values) if len(values) > 1 else 0:.{d}f}"


class Setting:
    """One tiny setting: its target, forget/retain sets, fine-tuning data and metrics."""

    def __init__(self, part, data_dir, cache_dir, finetune_lr=0.0, finetune_steps=0):
        import run_muse
        import run_wmdp

        self.part, self.runner = part, (run_wmdp if part == "wmdp" else run_muse)
        cfg = self.runner.Config(tiny=True, data_dir=data_dir, cache_dir=cache_dir)
        self.cfg = runlib.resolve(cfg, set(), self.runner.TINY)
        # the attack keeps the --tiny fine-tuning (lr: WMDP's relearn_lr, else finetune_lr)
        self.attack_lr = getattr(self.cfg, "relearn_lr", None) or self.cfg.finetune_lr
        self.attack_steps = self.cfg.finetune_steps
        self.cfg.finetune_lr = finetune_lr or self.cfg.finetune_lr          # the unrelated fine-tunings
        self.cfg.finetune_steps = finetune_steps or self.cfg.finetune_steps
        self.tasks, _ = runlib.available_tasks(self.cfg.finetune_on, data_dir)
        model, tok, self.ev, forget, retain = self.runner.setup_tiny(self.cfg, sorted(set(self.tasks) | {"gsm8k"}))
        self.model, self.tok, self.theta = model, tok, ilu.state_of(model)
        L = self.cfg.max_length
        self.forget, self.retain = runlib.encode(tok, forget, L), runlib.encode(tok, retain, L)
        self.env = runlib.env_data(tok, self.cfg)["gsm8k"]                  # --ilu-env's default
        self.ft = {t: ilu.encode_pairs(tok, runlib.task_split(t, data_dir, None, None, 0)[0], max_length=L)
                   for t in self.tasks}
        if part == "wmdp":   # forget: one item per bio question, in order; attack the first half
            k = len(self.ev["bio"]) // 2
            self.attack, self.held_out = runlib.encode(tok, forget[:k], L), self.ev["bio"][k:]
        else:                # forget: the verbmem passages, then the QA pairs; attack the first half of each
            n = len(self.ev["verbmem"])
            self.attack = runlib.encode(tok, forget[:n // 2] + forget[n:n + n // 2], L)
            self.held_out = dict(verbmem=self.ev["verbmem"][n // 2:], qa=self.ev["forget_qa"][n // 2:])

    def measure(self) -> dict:
        m, tok, ev, b = self.model, self.tok, self.ev, self.cfg.eval_batch
        if self.part == "wmdp":
            return dict(bio=ilu.mc_accuracy(m, tok, ev["bio"], batch_size=b, progress=False),
                        mmlu=ilu.mc_accuracy(m, tok, ev["mmlu"], batch_size=b, progress=False))
        return dict(verbmem=ilu.verbmem(m, tok, ev["verbmem"], self.cfg.verbmem_tokens, b, progress=False),
                    knowmem_forget=ilu.knowmem(m, tok, ev["forget_qa"], [], self.cfg.knowmem_tokens, b,
                                               progress=False),
                    knowmem_retain=ilu.knowmem(m, tok, ev["retain_qa"], [], self.cfg.knowmem_tokens, b,
                                               progress=False))

    def held_out_score(self) -> float:
        m, tok, b = self.model, self.tok, self.cfg.eval_batch
        if self.part == "wmdp":
            return ilu.mc_accuracy(m, tok, self.held_out, batch_size=b, progress=False)
        return ilu.verbmem(m, tok, self.held_out["verbmem"], self.cfg.verbmem_tokens, b, progress=False)

    def unlearn(self, method, lam, split, seed):
        """The runner's own --tiny unlearning (runlib.unlearn_args), with this variant's lam, split and seed."""
        c = runlib.resolve(self.runner.Config(tiny=True, method=method, data_dir=self.cfg.data_dir), set(),
                           self.runner.TINY)
        c.lam, c.env_grad_batch, c.seed = lam, split, seed
        ilu.unlearn(self.model, self.forget, self.retain, envs={"gsm8k": self.env} if lam else {},
                    progress=False, log=lambda s: None, **runlib.unlearn_args(c))

    def finetune(self, data, seed, lr=None, steps=None):
        ilu.finetune(self.model, data, max_steps=steps or self.cfg.finetune_steps, batch_size=self.cfg.finetune_batch,
                     lr=lr or self.cfg.finetune_lr, hook_each_epoch=False, seed=seed, progress=False)

    def run(self, variant, seed) -> dict:
        """Unlearn (or not: variant None is the control), then each fine-tuning from that model."""
        runlib.restore(self.model, self.theta)
        if variant:
            try:
                self.unlearn(*variant, seed)
            except ilu.ILUError as e:
                return dict(error=str(e))
        start = ilu.state_of(self.model)
        out = dict(unlearned=self.measure(), held_out_before=self.held_out_score(), finetuned={})
        for t in self.tasks:
            runlib.restore(self.model, start)
            self.finetune(self.ft[t], seed)
            out["finetuned"][t] = self.measure()
        runlib.restore(self.model, start)
        self.finetune(self.attack, seed, lr=self.attack_lr, steps=self.attack_steps)
        out["held_out_after_attack"] = self.held_out_score()
        return out


def tables(part, tasks, runs, seeds, ft) -> str:
    """Markdown tables: the forget metric before and after each fine-tuning, the attack, what is kept."""
    key = "bio" if part == "wmdp" else "verbmem"
    keep = "mmlu" if part == "wmdp" else "knowmem_retain"
    name = "WMDP-Bio accuracy (chance 0.25)" if part == "wmdp" else "VerbMem on the forget passages"

    def col(rs, f):
        return ms([None if "error" in r else f(r) for r in rs], 3 if part == "wmdp" else 1)

    head = ["model", "before fine-tuning", *[f"after {t}" for t in tasks], "mean after", "attack: held-out half"
            " before → after", keep + " (unlearned)"]
    rows = []
    for lab, rs in runs.items():
        rows.append([lab, col(rs, lambda r: r["unlearned"][key]),
                     *[col(rs, lambda r, t=t: r["finetuned"][t][key]) for t in tasks],
                     col(rs, lambda r: statistics.mean(r["finetuned"][t][key] for t in tasks)),
                     col(rs, lambda r: r["held_out_before"]) + " → " + col(rs, lambda r: r["held_out_after_attack"]),
                     col(rs, lambda r: r["unlearned"][keep])])
    text = f"### {part.upper()}-tiny: {name}, mean ± std over seeds {', '.join(map(str, seeds))}\n\n"
    text += f"Fine-tuning on each task: {ft['steps']} steps, batch {ft['batch']}, lr {ft['lr']:g}.\n\n"
    text += runlib.markdown_table(head, rows) + "\n"
    if part == "muse":
        rows = [[lab, col(rs, lambda r: r["unlearned"]["knowmem_forget"]),
                 *[col(rs, lambda r, t=t: r["finetuned"][t]["knowmem_forget"]) for t in tasks]]
                for lab, rs in runs.items()]
        text += "\nKnowMem on the forget QA, before and after each fine-tuning:\n\n"
        text += runlib.markdown_table(["model", "before fine-tuning", *[f"after {t}" for t in tasks]], rows) + "\n"
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None, help="local data copies (default: the hub)")
    ap.add_argument("--cache-dir", default="~/.cache/ilu", help="where the tiny targets are cached")
    ap.add_argument("--part", choices=["wmdp", "muse", "both"], default="both")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=None,
                    help="only these rows, by label (e.g. NPO 'NPO + ILU λ=1'); default: all")
    ap.add_argument("--finetune-lr", type=float, default=0.0, help="unrelated fine-tuning lr (default: --tiny's, 1e-4)")
    ap.add_argument("--finetune-steps", type=int, default=0, help="unrelated fine-tuning steps (default: --tiny's, 40)")
    ap.add_argument("--out", default="runs/tiny_study", help="folder for study.md and study.json")
    args = ap.parse_args()
    runlib.check_data_dir(args.data_dir)
    os.makedirs(args.out, exist_ok=True)
    report, raw, t0 = "", {}, time.perf_counter()
    for part in (["wmdp", "muse"] if args.part == "both" else [args.part]):
        s = Setting(part, args.data_dir, args.cache_dir, args.finetune_lr, args.finetune_steps)
        runs = {"Original (control)": [s.run(None, seed) for seed in args.seeds]}
        print(f"{part}: control done ({time.perf_counter() - t0:.0f} s)", flush=True)
        for v in [v for v in VARIANTS[part] if not args.variants or label(*v) in args.variants]:
            runs[label(*v)] = [s.run(v, seed) for seed in args.seeds]
            print(f"{part}: {label(*v)} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        raw[part] = dict(tasks=s.tasks, seeds=args.seeds, runs=runs)
        ft = dict(steps=s.cfg.finetune_steps, batch=s.cfg.finetune_batch, lr=s.cfg.finetune_lr)
        report += tables(part, s.tasks, runs, args.seeds, ft) + "\n"
        runlib.write_atomic(Path(args.out) / "study.json", json.dumps(raw, indent=1))
        runlib.write_atomic(Path(args.out) / "study.md", report)
        print("\n" + report, flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s; tables in {args.out}/study.md")


if __name__ == "__main__":
    runlib.run_main(main)
