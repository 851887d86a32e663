"""The README's tutorial tables, over seeds: every figure as mean ± std (and min–max) over seeds 0–4.

    python benchmarks/tutorial_tables.py --data-dir ../shared/data          # runs what is missing, then prints
    python benchmarks/tutorial_tables.py --data-dir ../shared/data --report # only re-renders from the saved runs

Runs the tutorial commands of the README, unchanged but for --seed, --out and --cache-dir:

    run_wmdp.py --method npo --ilu-env gsm8k --tiny      (the Original and NPO + ILU(GSM8K) rows)
    run_wmdp.py --method rmu --ilu-env none  --tiny      (the RMU row; reuses the seed's cached target)
    run_muse.py --method npo --ilu-env gsm8k --tiny      (the MUSE table)

one after another (two torch jobs at once on 2 cores slow each other several-fold), each into
OUT/<run>/seed<s>. The seed also changes the tiny target (the downstream texts it learns are
split by seed), so the spread is over targets as well as over unlearning and fine-tuning: the
kind of difference another CPU's floating-point kernels make where the runners' default
--cpu-kernels avx2 cannot apply (a CPU that is not x86-64, another torch version). A run whose results.json is
complete is not run again; its wall time is kept in OUT/times.json. The default cache is
OUT/cache, empty at first, so the first run of each seed includes the target's training.
Writes OUT/tables.md and prints it, with the machine the runs were made on.

A rerun elsewhere is checked figure by figure against the README's tables (saved per seed in
benchmarks/tutorial_reference.json by --save-reference):

    python benchmarks/tutorial_tables.py --data-dir ../shared/data --seeds 0 --out runs/rerun \
        --check benchmarks/tutorial_reference.json

With --flags, the same check says how far a variant of the runs lands from the tutorial's seeds, e.g. the
low-memory mode: --flags '--low-memory 8bit' --out runs/tutorial-8bit.

With the runners' default --cpu-kernels avx2, an x86-64 CPU with AVX2 is expected to give the
reference's seed-0 figures exactly; the check counts those. Each figure is also 'in range' (within
the reference seeds' min–max), 'in 95% PI' (the 95% prediction interval for one more seed,
mean ± t(0.975, n-1)·std·sqrt(1 + 1/n)), or 'OUTSIDE'. About 5% of the figures land outside by
chance alone; the command exits 1 when more do than chance explains (the binomial 95% bound: 7 of 73).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shlex
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
    cmd = [sys.executable, script, *extra, *shlex.split(args.flags), "--seed", str(seed), "--data-dir", args.data_dir,
           "--out", str(out), "--cache-dir", args.cache_dir or str(Path(args.out) / "cache")]
    print(f"{key}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (out / "log.txt").parent.mkdir(parents=True, exist_ok=True)
    (out / "log.txt").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        sys.exit(f"error: {key} failed (exit {r.returncode}); its output is in {out / 'log.txt'}")
    trained = re.search(r"tiny target: .* trained in (\d+) s", r.stdout)
    cpu = json.loads((out / "results.json").read_text()).get("cpu", {})
    times[key] = dict(wall_s=round(wall, 1), target_s=int(trained.group(1)) if trained else 0, machine=machine(cpu))
    times_path.write_text(json.dumps(times, indent=1))
    print(f"{key}: {wall:.0f} s", flush=True)


def machine(cpu: dict) -> str:
    """The CPU, the vector kernels and threads the run used (its results.json), torch's version: what a wall
    time and the last bits of a trained model depend on."""
    import os
    import platform

    name = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), name)
    return (f"{name}, {os.cpu_count()} cores, {cpu.get('kernels', '?')} kernels, torch {cpu.get('torch', '?')}, "
            f"{cpu.get('threads', '?')} threads")


def mean_sd(v: list[float]) -> tuple[float, float]:
    """Mean and sample std (n - 1) over the seeds; std 0 for one seed."""
    return statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0


def stat(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """'mean ± std (min–max)' of values × scale."""
    v = [x * scale for x in values if x is not None]
    if not v:
        return "–"
    mean, sd = mean_sd(v)
    return f"{mean:.{digits}f} ± {sd:.{digits}f} ({min(v):.{digits}f}–{max(v):.{digits}f})"


def load(out: Path, name: str, seeds) -> list[dict]:
    return [json.loads((out / name / f"seed{s}" / "results.json").read_text()) for s in seeds]


WMDP_ROWS = [("Original", "wmdp-npo-ilu", "original"), ("NPO + ILU(GSM8K)", "wmdp-npo-ilu", "unlearned"),
             ("RMU", "wmdp-rmu", "unlearned")]
WMDP_COLUMNS = [("fq", "FQ", 1, 2), ("mmlu", "MMLU", 100, 1), ("avg_ra", "Avg RA", 1, 2), ("avg_fa", "Avg FA", 100, 1)]


def muse_stages():
    stages = [("Original", "original"), ("NPO + ILU(GSM8K)", "unlearned")]
    for t in MUSE_TASKS:
        stages += [(f"Original, fine-tuned on {t}", f"original/finetune/{t}"),
                   (f"NPO + ILU(GSM8K), fine-tuned on {t}", f"unlearned/finetune/{t}")]
    return stages


def figures(out: Path, seeds) -> dict[str, list]:
    """Every figure the tables quote, as displayed (FA and MMLU in %), keyed 'table | row | column', one value
    per seed. The tables are rendered from it, and a rerun is checked against a saved copy of it (--check)."""
    fig = {}
    have = {n for n in RUNS if all(complete(out / n / f"seed{s}") for s in seeds)}
    for label, name, stage in WMDP_ROWS:
        if name in have:
            summaries = [r["summary"][stage] for r in load(out, name, seeds)]
            for key, head, scale, _ in WMDP_COLUMNS:
                fig[f"WMDP | {label} | {head}"] = [x[key] * scale for x in summaries]
    if "muse-npo-ilu" in have:
        runs = load(out, "muse-npo-ilu", seeds)
        for label, stage in muse_stages():
            if all(stage in r["stages"] for r in runs):
                for key, head in MUSE_COLUMNS:
                    v = [r["stages"][stage].get(key) for r in runs]
                    fig[f"MUSE | {label} | {head}"] = [None if x is None else x * (100 if key == "fa" else 1) for x in v]
        for label, stage in (("target", "original"), ("after NPO + ILU", "unlearned")):
            fig[f"MUSE | {label} | VerbMem unseen"] = [r["stages"][stage]["verbmem_unseen"] for r in runs]
        fig["MUSE | NPO + ILU(GSM8K) | KnowMem retain share %"] = [
            100 * r["stages"]["unlearned"]["knowmem_retain"] / r["stages"]["original"]["knowmem_retain"] for r in runs]
    return fig


def wmdp_table(fig: dict) -> str:
    lines = ["| method | " + " | ".join(h for _, h, _, _ in WMDP_COLUMNS) + " |", "|---" * (len(WMDP_COLUMNS) + 1) + "|"]
    for label, _, _ in WMDP_ROWS:
        if f"WMDP | {label} | FQ" not in fig:
            continue
        cells = [stat(fig[f"WMDP | {label} | {h}"], 1, d) for _, h, _, d in WMDP_COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def muse_table(fig: dict) -> str:
    lines = ["| model | " + " | ".join(h for _, h in MUSE_COLUMNS) + " |", "|---" * (len(MUSE_COLUMNS) + 1) + "|"]
    for label, _ in muse_stages():
        if f"MUSE | {label} | {MUSE_COLUMNS[0][1]}" in fig:
            lines.append(f"| {label} | " + " | ".join(stat(fig[f"MUSE | {label} | {h}"], 1, 1)
                                                      for _, h in MUSE_COLUMNS) + " |")
    unseen = {w: stat(fig[f"MUSE | {w} | VerbMem unseen"], 1, 1) for w in ("target", "after NPO + ILU")}
    share = stat(fig["MUSE | NPO + ILU(GSM8K) | KnowMem retain share %"], 1, 0)
    return ("\n".join(lines) + f"\n\nVerbMem on the 32 passages never trained (the floor): target {unseen['target']}, "
            f"after NPO + ILU {unseen['after NPO + ILU']}. KnowMem retain after NPO + ILU as a share of the target's: "
            f"{share} %.")


# Student's t quantile t(0.975, df) for df = 1..10 (published tables); beyond, 1.96 is within 0.12.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def prediction_halfwidth(sd: float, n: int) -> float:
    """Half-width of the 95% prediction interval for one more draw, from n draws with sample std sd:
    t(0.975, n-1) · sd · sqrt(1 + 1/n). With 3 seeds that is 4.97 sd, with 5 seeds 3.04 sd: 'mean ± 2 sd'
    would hold a new draw only 77% (3 seeds) or 86% (5 seeds) of the time."""
    return T975.get(n - 1, 1.96) * sd * (1 + 1 / n) ** 0.5


def chance_bound(n: int, p: float = 0.05, level: float = 0.95) -> int:
    """The most figures out of n that land outside their 95% interval by chance alone, at the given level
    (binomial; figures that move together make the real count lumpier)."""
    total, k = 0.0, 0
    while True:
        total += math.comb(n, k) * p ** k * (1 - p) ** (n - k)
        if total >= level:
            return k
        k += 1


def check(fig: dict, reference: dict, seeds) -> tuple[str, int]:
    """Each figure of a rerun against the reference's spread over its seeds: 'in range' (within their
    min–max), 'in 95% PI' (the prediction interval above), or 'OUTSIDE'. A rerun passes when no more figures
    land outside than chance explains. Returns the report and how many figures are outside beyond that."""
    lines = ["| figure | seed | rerun | reference mean ± std (min–max) | 95% PI | verdict |", "|---" * 6 + "|"]
    counts = {"in range": 0, "in 95% PI": 0, "OUTSIDE": 0}
    identical = 0        # figures equal to the reference's own run of the same seed: the same arithmetic
    missing = [k for k in reference["figures"] if k not in fig]
    for key, ref in reference["figures"].items():
        own = dict(zip(reference["seeds"], ref))
        ref = [x for x in ref if x is not None]
        if key not in fig or not ref:
            continue
        mean, sd = mean_sd(ref)
        eps = 1e-9 * max(1.0, abs(mean))                    # float noise in a recomputed share, not a tolerance
        half = prediction_halfwidth(sd, len(ref))
        for seed, v in zip(seeds, fig[key]):
            if v is None:
                continue
            verdict = ("in range" if min(ref) - eps <= v <= max(ref) + eps else
                       "in 95% PI" if abs(v - mean) <= half + eps else "OUTSIDE")
            counts[verdict] += 1
            identical += own.get(seed) is not None and abs(v - own[seed]) <= eps
            lines.append(f"| {key} | {seed} | {v:.2f} | {stat(ref)} | {mean - half:.2f}–{mean + half:.2f} | {verdict} |")
    total = sum(counts.values())
    bound = chance_bound(total)
    lines.append(f"\n{total} figures checked against the reference's seeds {', '.join(map(str, reference['seeds']))}: "
                 f"{counts['in range']} in range, {counts['in 95% PI']} in the 95% prediction interval, "
                 f"{counts['OUTSIDE']} outside (chance alone puts up to {bound} of {total} outside, 95% of the time): "
                 + ("PASS." if counts["OUTSIDE"] <= bound else "FAIL.")
                 + (f" {identical} of {total} are identical to the reference's run of the same seed"
                    + (" (this machine computed the same bits)." if identical == total else ".")
                    if set(seeds) & set(reference["seeds"]) else "")
                 + (f" Not in this rerun: {len(missing)} (run all three runs to check them)." if missing else ""))
    return "\n".join(lines), max(0, counts["OUTSIDE"] - bound)


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
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--report", action="store_true", help="only render the tables from the saved runs")
    ap.add_argument("--flags", default="", metavar="'FLAGS'",
                    help="more runner flags for every run, e.g. '--low-memory 8bit' (checked against the reference: "
                         "how far the variant lands from the tutorial's seeds)")
    ap.add_argument("--check", default="", metavar="REFERENCE.json",
                    help="compare every figure of these runs with a reference's spread over its seeds "
                         "(e.g. benchmarks/tutorial_reference.json, the README's tables); exit 1 if more land outside "
                         "their 95%% prediction interval than chance explains")
    ap.add_argument("--save-reference", default="", metavar="FILE", help="write the figures, per seed, to FILE")
    args = ap.parse_args()
    if args.data_dir and not Path(args.data_dir).is_dir():
        print(f"error: --data-dir {args.data_dir} does not exist", file=sys.stderr)
        sys.exit(2)
    if args.check and not Path(args.check).is_file():
        print(f"error: --check {args.check}: no such file (the README's reference is "
              f"benchmarks/tutorial_reference.json)", file=sys.stderr)
        sys.exit(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times_path = out / "times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    if not args.report:
        for seed in args.seeds:
            for name in args.runs:
                run(name, seed, args, times, times_path)
    fig = figures(out, args.seeds)
    parts = [f"Seeds {', '.join(map(str, args.seeds))}; each cell mean ± std (min–max) over them."]
    if any(k.startswith("WMDP") for k in fig):
        parts += ["### WMDP tutorial", wmdp_table(fig)]
    if any(k.startswith("MUSE") for k in fig):
        parts += ["### MUSE tutorial", muse_table(fig)]
    parts += ["### Wall times on this machine", times_table(times, args.seeds)]
    machines = sorted({t["machine"] for k, t in times.items() if "machine" in t and int(k.split("seed")[-1]) in args.seeds})
    if machines:
        parts.append("Measured on: " + "; ".join(machines) + ".")
    if args.check:
        reference = json.loads(Path(args.check).read_text())
        report, outside = check(fig, reference, args.seeds)
        parts += [f"### This rerun against {args.check}", report]
    text = "\n\n".join(parts) + "\n"
    (out / "tables.md").write_text(text)
    print(text)
    if args.save_reference:
        rows = ",\n".join(f"  {json.dumps(k, ensure_ascii=False)}: {json.dumps(v)}" for k, v in fig.items())
        Path(args.save_reference).write_text(f'{{"seeds": {json.dumps(args.seeds)}, "machines": {json.dumps(machines)},\n'
                                             f' "figures": {{\n{rows}\n }}}}\n')
        print(f"reference figures written to {args.save_reference}")
    if args.check and outside:
        sys.exit(1)


if __name__ == "__main__":
    main()
