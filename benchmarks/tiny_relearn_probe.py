"""A first probe for the tiny-scale study: does a relearning attack bring forgotten WMDP answers back?

    python benchmarks/tiny_relearn_probe.py --data-dir ../shared/data            # ~5 min on 2 cores

On the WMDP tiny target of run_wmdp.py --tiny (trained once and cached), for each method,
lambda and seed: unlearn, then fine-tune on the answers of half of the forget questions
(Table 3's attack) and measure accuracy on the *other* half, which the attack never shows.
Chance is 0.25 (answers balanced over the letters). Held-out accuracy rising above chance
means the unlearned model still held those answers. Prints one row per setting (mean and
std over seeds), not a conclusion: the held-out half is 32 questions (steps of 0.031).
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ilu  # noqa: E402
import run_wmdp  # noqa: E402
import runlib  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None, help="local data copies (default: the hub)")
    ap.add_argument("--cache-dir", default="~/.cache/ilu", help="where the tiny target is cached")
    ap.add_argument("--methods", nargs="+", default=["npo", "rmu"])
    ap.add_argument("--lams", nargs="+", type=float, default=[0.0, 1.0], help="0 = the base method")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--relearn-epochs", type=float, default=5)
    ap.add_argument("--relearn-lr", type=float, default=1e-3)
    args = ap.parse_args()
    tasks = ["agnews", "gsm8k", "mnli", "sst2", "winogrande"]
    base = run_wmdp.Config(tiny=True, data_dir=args.data_dir, cache_dir=args.cache_dir)
    base = runlib.resolve(base, set(), run_wmdp.TINY)
    model, tok, qs, forget, retain = run_wmdp.setup_tiny(base, tasks)
    theta = ilu.state_of(model)
    env = ilu.encode_pairs(tok, runlib.task_split("gsm8k", args.data_dir, None, None, 0)[0], max_length=256)
    k = len(forget) // 2
    attack, held_out = runlib.encode(tok, forget[:k], 256), qs["bio"][k:]
    rows = []
    for method in args.methods:
        cfg = runlib.resolve(run_wmdp.Config(tiny=True, method=method, data_dir=args.data_dir), set(), run_wmdp.TINY)
        for lam in args.lams:
            before, after, mmlu = [], [], []
            for seed in args.seeds:
                runlib.restore(model, theta)
                ilu.unlearn(model, runlib.encode(tok, forget, 256), runlib.encode(tok, retain, 256), method,
                            envs={"gsm8k": env} if lam else {}, lam=lam, steps=cfg.steps, batch_size=cfg.batch_size,
                            grad_accum=1, env_batch_size=cfg.env_batch_size, lr=cfg.lr, rmu_layer=cfg.rmu_layer,
                            rmu_coeff=cfg.rmu_coeff, rmu_alpha=cfg.rmu_alpha,
                            max_grad_norm=None if method == "rmu" else 1.0, seed=seed, progress=False,
                            log=lambda s: None)
                before.append(ilu.mc_accuracy(model, tok, held_out, progress=False))
                mmlu.append(ilu.mc_accuracy(model, tok, qs["mmlu"], progress=False))
                ilu.finetune(model, attack, epochs=args.relearn_epochs, batch_size=8, lr=args.relearn_lr,
                             hook_each_epoch=False, seed=seed, progress=False)
                after.append(ilu.mc_accuracy(model, tok, held_out, progress=False))
            label = runlib.method_label(dict(method=method, ilu_env=["gsm8k"] if lam else ["none"]))
            rows.append([f"{label} (lam {lam:g})" if lam else label, *[ms(v) for v in (before, after, mmlu)]])
            print(rows[-1], flush=True)
    print("\nheld-out WMDP-Bio accuracy (chance 0.25), mean ± std over seeds " + ", ".join(map(str, args.seeds)) + ":\n")
    print(runlib.markdown_table(["method", "before the attack", "after the attack", "MMLU (kept)"], rows))


def ms(values):
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"


if __name__ == "__main__":
    main()
