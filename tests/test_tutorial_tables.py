"""benchmarks/tutorial_tables.py: the mean ± std (min–max) cells and the tables, from saved results (no runs)."""
import json
import math
import statistics
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, ROOT + "/benchmarks")
import tutorial_tables as tt  # noqa: E402


def test_stat_is_mean_sample_std_and_range():
    v = [0.75, 0.75, 0.78125]
    mean, sd = sum(v) / 3, (sum((x - sum(v) / 3) ** 2 for x in v) / 2) ** 0.5   # by hand: n - 1 in the std
    assert tt.stat(v) == f"{mean:.2f} ± {sd:.2f} (0.75–0.78)"
    assert tt.stat([0.5], 100, 1) == "50.0 ± 0.0 (50.0–50.0)"
    assert tt.stat([None, None]) == "–"


def muse_eval(s=0, **changes):
    """One MUSE stage's metrics as run_muse writes them, for seed s."""
    return dict(dict(verbmem=95.0 + s, knowmem_forget=39.0, knowmem_retain=40.0 + s, privleak=-100.0,
                     verbmem_unseen=8.0), **changes)


def write_run(folder, summary=None, stages=None):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(dict(config={}, stages=stages or {}, summary=summary or {"x": 1})))


def test_report_renders_the_tables_from_saved_runs(tmp_path):
    fq, fa = [0.75, 0.75, 0.78125], [0.447, 0.373, 0.424]
    for s in range(3):
        row = dict(fq=fq[s], mmlu=1.0, avg_ra=0.75, avg_fa=fa[s])
        write_run(tmp_path / "wmdp-npo-ilu" / f"seed{s}", dict(original=dict(fq=0.0, mmlu=1.0, avg_ra=0.0, avg_fa=0.3),
                                                               unlearned=row))
        write_run(tmp_path / "wmdp-rmu" / f"seed{s}", dict(unlearned=dict(row, mmlu=0.875)))
        ev = muse_eval(s)
        write_run(tmp_path / "muse-npo-ilu" / f"seed{s}", stages=dict(original=ev, unlearned=dict(ev, verbmem=10.0 + s),
                                                                      **{"unlearned/finetune/sst2": dict(ev, fa=0.5)}))
    (tmp_path / "times.json").write_text(json.dumps({f"wmdp-npo-ilu/seed{s}": dict(wall_s=170 + s, target_s=80)
                                                     for s in range(3)}))
    r = subprocess.run([sys.executable, "benchmarks/tutorial_tables.py", "--report", "--out", str(tmp_path),
                        "--seeds", "0", "1", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "tables.md").read_text()
    assert text == r.stdout.rstrip("\n") + "\n"
    sd = statistics.stdev([100 * x for x in fa])
    assert f"| NPO + ILU(GSM8K) | {tt.stat(fq)} | 100.0 ± 0.0 (100.0–100.0) | 0.75 ± 0.00 (0.75–0.75) | " \
           f"{sum(fa) / 3 * 100:.1f} ± {sd:.1f} (37.3–44.7) |" in text
    assert "| RMU | " in text and "87.5 ± 0.0" in text
    assert "| NPO + ILU(GSM8K) | 11.0 ± 1.0 (10.0–12.0) |" in text                   # MUSE VerbMem 10, 11, 12
    assert "| NPO + ILU(GSM8K), fine-tuned on sst2 |" in text and "50.0 ± 0.0" in text
    assert "Original, fine-tuned on sst2" not in text                                # absent stages are left out
    assert "| wmdp-npo-ilu | 171 ± 1 (170–172) | 80 ± 0 (80–80) |" in text


def t_coverage(q, df, n=20000):
    """P(|T| <= q) for Student's t with df degrees of freedom, by Simpson's rule on its density."""
    pdf = lambda x: math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) \
        * (1 + x * x / df) ** (-(df + 1) / 2)
    h = 2 * q / n
    return h / 3 * (pdf(-q) + pdf(q) + sum((4 if i % 2 else 2) * pdf(-q + i * h) for i in range(1, n)))


def test_prediction_interval_holds_95_percent_of_new_draws():
    for df, q in tt.T975.items():                                   # the table against the t density itself
        assert abs(t_coverage(q, df) - 0.95) < 1e-4, df
    # one more draw X from n: (X - mean) / (sd sqrt(1 + 1/n)) is t with n - 1 df
    for n in (3, 5):
        half = tt.prediction_halfwidth(1.0, n)
        assert abs(t_coverage(half / math.sqrt(1 + 1 / n), n - 1) - 0.95) < 1e-4
    assert abs(t_coverage(2 / math.sqrt(4 / 3), 2) - 0.7746) < 1e-3     # the docstring's 77% for mean ± 2 sd
    assert abs(t_coverage(2 / math.sqrt(6 / 5), 4) - 0.858) < 1e-3      # and 86%


def test_chance_bound_is_the_binomial_95th_percentile():
    def cdf(k, n, p=0.05):
        return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))
    for n in (1, 10, 73, 200):
        k = tt.chance_bound(n)
        assert cdf(k, n) >= 0.95 and (k == 0 or cdf(k - 1, n) < 0.95)
    assert tt.chance_bound(73) == 7 and tt.chance_bound(1) == 0


def test_check_sorts_each_figure_by_the_reference_spread():
    half = 4.303 * 2.0 * math.sqrt(4 / 3)                            # 'A': mean 12, sd 2, n 3: 12 ± 9.94
    ref = dict(seeds=[0, 1, 2], figures={"A": [10.0, 12.0, 14.0],
                                         "B": [100.0, 100.0, 100.0],    # no spread: only 100 itself passes
                                         "C": [None, None, None],       # nothing to compare with
                                         "D": [1.0, 2.0, 3.0]})         # not in the rerun
    report, beyond = tt.check({"A": [14.0], "B": [100.0], "C": [5.0]}, ref, [0])
    assert beyond == 0
    assert f"| A | 0 | 14.00 | 12.00 ± 2.00 (10.00–14.00) | {12 - half:.2f}–{12 + half:.2f} | in range |" in report
    assert "| B | 0 | 100.00 |" in report and "| C |" not in report
    assert "2 figures checked" in report and "Not in this rerun: 1" in report and "PASS" in report
    assert "1 of 2 are identical to the reference's run of the same seed." in report        # seed 0's A is 10
    assert ("2 of 2 are identical to the reference's run of the same seed (this machine computed the same bits)"
            in tt.check({"A": [12.0], "B": [100.0]}, ref, [1])[0])                            # seed 1's A is 12
    assert "identical" not in tt.check({"A": [10.0]}, ref, [7])[0]                         # no such seed in ref
    report, beyond = tt.check({"A": [12 + half - 0.01], "B": [99.99]}, ref, [0])
    assert report.count("| in 95% PI |") == 1 and report.count("| OUTSIDE |") == 1
    assert "| B | 0 | 99.99 | 100.00 ± 0.00 (100.00–100.00) | 100.00–100.00 | OUTSIDE |" in report
    assert beyond == 0 and "up to 1 of 2 outside" in report and "PASS" in report    # 0.95² < 0.95: one is chance
    report, beyond = tt.check({"A": [12 + half + 0.01], "B": [99.99]}, ref, [0])
    assert beyond == 1 and report.count("| OUTSIDE |") == 2 and "FAIL" in report
    figs = {f"F{i}": [0.0] * 3 for i in range(73)}
    many = dict(seeds=[0, 1, 2], figures=figs)
    rerun = {k: [5.0 if i < 7 else 0.0] for i, k in enumerate(figs)}    # 7 of 73 outside: what chance allows
    report, beyond = tt.check(rerun, many, [0])
    assert beyond == 0 and "7 outside (chance alone puts up to 7 of 73" in report and "PASS" in report
    rerun["F7"] = [5.0]
    assert tt.check(rerun, many, [0])[1] == 1


def test_check_and_save_reference_from_the_command_line(tmp_path):
    for s in range(3):
        write_run(tmp_path / "ref" / "muse-npo-ilu" / f"seed{s}",
                  stages=dict(original=muse_eval(s), unlearned=muse_eval(s, verbmem=10.0 + s)))
    ref = tmp_path / "reference.json"
    cmd = [sys.executable, "benchmarks/tutorial_tables.py", "--report"]
    r = subprocess.run(cmd + ["--out", str(tmp_path / "ref"), "--seeds", "0", "1", "2", "--save-reference", str(ref)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    saved = json.loads(ref.read_text())
    assert saved["seeds"] == [0, 1, 2] and saved["figures"]["MUSE | NPO + ILU(GSM8K) | VerbMem ↓"] == [10.0, 11.0, 12.0]
    assert saved["figures"]["MUSE | NPO + ILU(GSM8K) | KnowMem retain share %"] == [100.0, 100.0, 100.0]
    # reference: VerbMem 10, 11, 12 (95% PI 11 ± 4.97), PrivLeak -100 and KnowMem forget 39 (no spread); 11 figures
    # in all, of which chance alone puts up to 2 outside their interval
    cases = [(dict(verbmem=15.9), 0, "in 95% PI"), (dict(verbmem=16.0), 0, "OUTSIDE"),
             (dict(verbmem=16.0, privleak=-99.0), 0, "OUTSIDE"),
             (dict(verbmem=16.0, privleak=-99.0, knowmem_forget=39.5), 1, "OUTSIDE")]
    for i, (unlearned, code, verdict) in enumerate(cases):
        rerun = tmp_path / f"rerun{i}"
        write_run(rerun / "muse-npo-ilu" / "seed0", stages=dict(original=muse_eval(), unlearned=muse_eval(**unlearned)))
        r = subprocess.run(cmd + ["--out", str(rerun), "--seeds", "0", "--check", str(ref)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == code, r.stdout + r.stderr
        assert (f"| MUSE | NPO + ILU(GSM8K) | VerbMem ↓ | 0 | {unlearned['verbmem']:.2f} | 11.00 ± 1.00 (10.00–12.00) | "
                f"6.03–15.97 | {verdict} |") in r.stdout
        outside = 0 if verdict != "OUTSIDE" else len(unlearned)
        assert "11 figures checked" in r.stdout and f"{outside} outside (chance alone puts up to 2 of 11" in r.stdout
    r = subprocess.run(cmd + ["--out", str(rerun), "--check", str(tmp_path / "nope.json")], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such file" in r.stderr
