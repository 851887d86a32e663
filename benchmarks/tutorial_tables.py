"""The README's tutorial tables, over seeds: every figure as mean ± std (and min–max) over seeds 0–2.

    python benchmarks/tutorial_tables.py --data-dir ../shared/data          # runs what is missing, then prints
    python benchmarks/tutorial_tables.py --data-dir ../shared/data --report # only re-renders from the saved runs

Runs the tutorial commands of the README, unchanged but for --seed, --out and --cache-dir:

    run_wmdp.py --method npo --ilu-env gsm8k --tiny      (the Original and NPO + ILU(GSM8K) rows)
    run_wmdp.py --method rmu --ilu-env none  --tiny      (the RMU row; reuses the seed's cached target)
    run_muse.py --method npo --ilu-env gsm8k --tiny      (the MUSE table)

one after another (two torch jobs at once on 2 cores slow each other several-fold), each into
OUT/<run>/seed<s>. The seed also changes the tiny target (the downstream texts it learns are
split by seed), so the spread is over targets as well as over unlearning and fine-tuning: the
kind of difference another CPU's floating-point kernels make. A run whose results.json is
complete is not run again; its wall time is kept in OUT/times.json. The default cache is
OUT/cache, empty at first, so the first run of each seed includes the target's training.
Writes OUT/tables.md and prints it.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = {  # name: (script, arguments)
    "wmdp-npo-ilu": ("run_wmdp.py", ["--method", "npo", "--ilu-env", "gsm8k", "--tiny"]),
    "wmdp-rmu": ("run_wmdp.py", ["--method", "rmu", "--ilu-env", "none", "--tiny"]),
    "muse-npo-ilu": ("run_muse.py", ["--method", "npo", "--ilu-env", "gsm8k", "--tiny"]),
}
MUSE_TASKS = ["gsm8k", "agnews", "sst2", "winogrande", "mnli"]
MUSE_COLUMNS = [("verbmem", "VerbMem ↓"), ("knowmem_forget", "KnowMem forget ↓"),
                ("knowmem_retain", "KnowMem retain ↑"), ("privleak", "PrivLeak"), ("fa", "FA ↑")]


def complete(out: Path) -> bool:
    p = out / "results.json"
    return p.exists() and bool(json.loads(p.read_text()).get("summary"))


def run(name: str, seed: int, args, times: dict, times_path: Path):
    script, extra = RUNS[name]
    out = Path(args.out) / name / f"seed{seed}"
    key = f"{name}/seed{seed}"
    if complete(out) and key in times:
        return
    cmd = [sys.executable, script, *extra, "--seed", str(seed), "--data-dir", args.data_dir, "--out", str(out),
           "--cache-dir", args.cache_dir or str(Path(args.out) / "cache")]
    print(f"{key}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (out / "log.txt").parent.mkdir(parents=True, exist_ok=True)
    (out / "log.txt").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        sys.exit(f"error: {key} failed (exit {r.returncode}); its output is in {out / 'log.txt'}")
    trained = re.search(r"tiny target: .* trained in (\d+) s", r.stdout)
    times[key] = dict(wall_s=round(wall, 1), target_s=int(trained.group(1)) if trained else 0)
    times_path.write_text(json.dumps(times, indent=1))
    print(f"{key}: {wall:.0f} s", flush=True)


def stat(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """'mean ± std (min–max)' of values × scale; std is the sample std over the seeds."""
    v = [x * scale for x in values if x is not None]
    if not v:
        return "–"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.mean(v):.{digits}f} ± {sd:.{digits}f} ({min(v):.{digits}f}–{max(v):.{digits}f})"


def load(out: Path, name: str, seeds) -> list[dict]:
    return [json.loads((out / name / f"seed{s}" / "results.json").read_text()) for s in seeds]


def wmdp_table(out: Path, seeds) -> str:
    npo, rmu = load(out, "wmdp-npo-ilu", seeds), load(out, "wmdp-rmu", seeds)
    rows = [("Original", [r["summary"]["original"] for r in npo]),
            ("NPO + ILU(GSM8K)", [r["summary"]["unlearned"] for r in npo]),
            ("RMU", [r["summary"]["unlearned"] for r in rmu])]
    lines = ["| method | FQ | MMLU | Avg RA | Avg FA |", "|---|---|---|---|---|"]
    for label, s in rows:
        lines.append(f"| {label} | {stat([x['fq'] for x in s])} | {stat([x['mmlu'] for x in s], 100, 1)} | "
                     f"{stat([x['avg_ra'] for x in s])} | {stat([x['avg_fa'] for x in s], 100, 1)} |")
    return "\n".join(lines)


def muse_table(out: Path, seeds) -> str:
    runs = load(out, "muse-npo-ilu", seeds)
    stages = [("Original", "original"), ("NPO + ILU(GSM8K)", "unlearned")]
    for t in MUSE_TASKS:
        stages += [(f"Original, fine-tuned on {t}", f"original/finetune/{t}"),
                   (f"NPO + ILU(GSM8K), fine-tuned on {t}", f"unlearned/finetune/{t}")]
    lines = ["| model | " + " | ".join(h for _, h in MUSE_COLUMNS) + " |", "|---" * (len(MUSE_COLUMNS) + 1) + "|"]
    for label, stage in stages:
        if not all(stage in r["stages"] for r in runs):
            continue
        cells = [stat([r["stages"][stage].get(k) for r in runs], 100 if k == "fa" else 1, 1)
                 for k, _ in MUSE_COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    unseen = {who: stat([r["stages"][who]["verbmem_unseen"] for r in runs], 1, 1) for who in ("original", "unlearned")}
    share = [r["stages"]["unlearned"]["knowmem_retain"] / r["stages"]["original"]["knowmem_retain"] for r in runs]
    return ("\n".join(lines) + f"\n\nVerbMem on the 32 passages never trained (the floor): target {unseen['original']}, "
            f"after NPO + ILU {unseen['unlearned']}. KnowMem retain after NPO + ILU as a share of the target's: "
            f"{stat(share, 100, 0)} %.")


def times_table(times: dict, seeds) -> str:
    lines = ["| run | wall time (s) | of which the target's training (s) |", "|---|---|---|"]
    for name in RUNS:
        t = [times[f"{name}/seed{s}"] for s in seeds if f"{name}/seed{s}" in times]
        if t:
            lines.append(f"| {name} | {stat([x['wall_s'] for x in t], 1, 0)} | {stat([x['target_s'] for x in t], 1, 0)} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None, help="local data copies (default: the hub)")
    ap.add_argument("--out", default="runs/tutorial", help="runs, times.json and tables.md")
    ap.add_argument("--cache-dir", default="", help="tiny-target cache (default: OUT/cache)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--report", action="store_true", help="only render the tables from the saved runs")
    args = ap.parse_args()
    if args.data_dir and not Path(args.data_dir).is_dir():
        sys.exit(f"error: --data-dir {args.data_dir} does not exist")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times_path = out / "times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    if not args.report:
        for seed in args.seeds:
            for name in args.runs:
                run(name, seed, args, times, times_path)
    have = {n for n in RUNS if all(complete(out / n / f"seed{s}") for s in args.seeds)}
    parts = [f"Seeds {', '.join(map(str, args.seeds))}; each cell mean ± std (min–max) over them."]
    if {"wmdp-npo-ilu", "wmdp-rmu"} <= have:
        parts += ["### WMDP tutorial", wmdp_table(out, args.seeds)]
    if "muse-npo-ilu" in have:
        parts += ["### MUSE tutorial", muse_table(out, args.seeds)]
    parts += ["### Wall times on this machine", times_table(times, args.seeds)]
    text = "\n\n".join(parts) + "\n"
    (out / "tables.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
