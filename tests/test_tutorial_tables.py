"""benchmarks/tutorial_tables.py: the mean ± std (min–max) cells and the tables, from saved results (no runs)."""
import json
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
        ev = dict(verbmem=95.0 + s, knowmem_forget=39.0, knowmem_retain=40.0 + s, privleak=-100.0, verbmem_unseen=8.0)
        write_run(tmp_path / "muse-npo-ilu" / f"seed{s}", stages=dict(original=ev, unlearned=dict(ev, verbmem=10.0 + s),
                                                                      **{"unlearned/finetune/sst2": dict(ev, fa=0.5)}))
    (tmp_path / "times.json").write_text(json.dumps({f"wmdp-npo-ilu/seed{s}": dict(wall_s=170 + s, target_s=80)
                                                     for s in range(3)}))
    r = subprocess.run([sys.executable, "benchmarks/tutorial_tables.py", "--report", "--out", str(tmp_path)],
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


def test_check_sorts_each_figure_by_the_reference_spread():
    ref = dict(seeds=[0, 1, 2], figures={"A": [10.0, 12.0, 14.0],       # mean 12, sample std 2: range 10–14, 2 std 8–16
                                         "B": [100.0, 100.0, 100.0],    # no spread: only 100 itself passes
                                         "C": [None, None, None],       # nothing to compare with
                                         "D": [1.0, 2.0, 3.0]})         # not in the rerun
    report, outside = tt.check({"A": [14.0], "B": [100.0], "C": [5.0]}, ref, [0])
    assert outside == 0 and "| A | 0 | 14.00 | 12.00 ± 2.00 (10.00–14.00) | in range |" in report
    assert "| B | 0 | 100.00 |" in report and "| C |" not in report
    assert "2 figures checked" in report and "Not in this rerun: 1" in report
    report, outside = tt.check({"A": [15.9], "B": [99.99]}, ref, [0])
    assert outside == 1 and "| A | 0 | 15.90 |" in report and report.count("within 2 std |") == 1
    assert "| B | 0 | 99.99 | 100.00 ± 0.00 (100.00–100.00) | OUTSIDE |" in report
    _, outside = tt.check({"A": [7.9, 16.1, 12.0]}, ref, [0, 1, 2])                  # each seed judged on its own
    assert outside == 2


def test_check_and_save_reference_from_the_command_line(tmp_path):
    for s in range(3):
        ev = dict(verbmem=95.0 + s, knowmem_forget=39.0, knowmem_retain=40.0 + s, privleak=-100.0, verbmem_unseen=8.0)
        write_run(tmp_path / "ref" / "muse-npo-ilu" / f"seed{s}", stages=dict(original=ev, unlearned=dict(ev, verbmem=10.0 + s)))
    ref = tmp_path / "reference.json"
    cmd = [sys.executable, "benchmarks/tutorial_tables.py", "--report"]
    r = subprocess.run(cmd + ["--out", str(tmp_path / "ref"), "--save-reference", str(ref)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    saved = json.loads(ref.read_text())
    assert saved["seeds"] == [0, 1, 2] and saved["figures"]["MUSE | NPO + ILU(GSM8K) | VerbMem ↓"] == [10.0, 11.0, 12.0]
    assert saved["figures"]["MUSE | NPO + ILU(GSM8K) | KnowMem retain share %"] == [100.0, 100.0, 100.0]
    for verbmem, code in ((12.0, 0), (12.9, 0), (13.5, 1)):     # range 10–12, mean 11 ± 2 × 1
        ev = dict(verbmem=95.0, knowmem_forget=39.0, knowmem_retain=40.0, privleak=-100.0, verbmem_unseen=8.0)
        rerun = tmp_path / f"rerun{verbmem}"
        write_run(rerun / "muse-npo-ilu" / "seed0", stages=dict(original=ev, unlearned=dict(ev, verbmem=verbmem)))
        r = subprocess.run(cmd + ["--out", str(rerun), "--seeds", "0", "--check", str(ref)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == code, r.stdout + r.stderr
        assert f"| MUSE | NPO + ILU(GSM8K) | VerbMem ↓ | 0 | {verbmem:.2f} |" in r.stdout
    r = subprocess.run(cmd + ["--out", str(rerun), "--check", str(tmp_path / "nope.json")], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such file" in r.stderr
