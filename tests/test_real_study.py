"""benchmarks/real_study.py on hand-built run folders: the tables' cells and the rerun comparison."""
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import real_study  # noqa: E402


def metrics(verbmem, nll=0.5, fa=None, geometry=None):
    e = dict(verbmem=verbmem, verbmem_unseen=12.0, knowmem_forget=40.0, knowmem_retain=30.0, forget_nll=nll,
             task_nll={"sst2": 1.0}, privleak=-100.0, time_s=3.0)
    if fa is not None:
        e["fa"] = fa
    if geometry is not None:
        e["geometry"] = dict(cos_back=geometry, cos_ft=0.8, norm_ratio=1.3)
    return e


def write_run(path, unlearned, after, seed):
    st = {"original": metrics(90.0), "original/finetune/sst2": metrics(89.0, fa=0.9),
          "unlearned": metrics(unlearned), "unlearned/finetune/sst2": metrics(after, fa=0.8, geometry=-0.1 * seed)}
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"config": {}, "stages": st, "summary": {"x": 1}}))


def test_tables_and_compare_by_hand(tmp_path, capsys):
    out = tmp_path / "study"
    for seed, (u, a) in enumerate([(30.0, 50.0), (34.0, 56.0)]):      # NPO gains 20 and 22
        write_run(real_study.folder(out, "base", "NPO", seed), u, a, seed)
        write_run(real_study.folder(out, "base", "NPO + ILU(GSM8K)", seed), u + 1, u + 2, seed)
    text = real_study.tables("base", real_study.load(out, "base", [0, 1]), [0, 1])
    assert "| NPO | 32.0 ± 2.8 | 53.0 ± 4.2 |" in text                 # mean and sample std of (30, 34), (50, 56)
    assert "| Original (control) | 90.0 ± 0.0 | 89.0 ± 0.0 |" in text
    # share back: (20/60 + 22/56) / 2 = 0.363 >= 1/3, gain 21 > 2 x 1.41, control keeps 89/90: relearning
    assert "| NPO | +0.36 (gain +21.0 ± 1.4) ✓ |" in text
    assert "| NPO + ILU(GSM8K) | +0.02 (gain +1.0 ± 0.0) |" in text
    assert "| NPO + ILU(GSM8K) | 1.0 ± 0.0 |" in text                  # |VerbMem unlearned - NPO's| per seed
    assert "-0.05 ± 0.07" in text                                       # cos back over seeds: 0, -0.1
    assert "VerbMem on the 16 forget passages" in text and "VerbMem on 16 passages the target never" in text
    shutil.copytree(out / "base", tmp_path / "more" / "more-passages")  # the recipe with --tiny-passages 32
    text = real_study.tables("more-passages", real_study.load(tmp_path / "more", "more-passages", [0, 1]), [0, 1])
    assert "VerbMem on the 32 forget passages" in text and "VerbMem on 32 passages the target never" in text

    other = tmp_path / "rerun"
    shutil.copytree(out, other)
    ref = tmp_path / "reference.json"
    ref.write_text(json.dumps(real_study.collect(out)))
    assert real_study.compare(other, ref) == 0 and "in all: 132 of 132" in capsys.readouterr().out
    assert real_study.compare(other, out) == 0         # a run: 4 stages x 7 metrics, FA twice, geometry 3
    assert "in all: 132 of 132 figures identical" in capsys.readouterr().out
    path = real_study.folder(other, "base", "NPO", 1) / "results.json"
    res = json.loads(path.read_text())
    res["stages"]["unlearned"]["verbmem"] = 34.5
    res["stages"]["unlearned"]["time_s"] = 99.0                          # timings never count
    path.write_text(json.dumps(res))
    assert real_study.compare(other, out) == 1
    printed = capsys.readouterr().out
    assert "base/npo-s1: 32 of 33 figures identical (first differing: /unlearned/verbmem: 34.5 vs 34.0)" in printed


def test_lever_runs_borrow_relearns_unlearning(tmp_path):
    """relearn-strong's runs start from relearn's finished unlearning: its three stages, marked, its config
    with only the differing flags changed, and its saved model as hard links (no second copy)."""
    out = tmp_path / "study"
    for variant in real_study.VARIANTS:
        src = real_study.folder(out, "relearn", variant, 0)
        cmd = real_study.command(out, "relearn", variant, 0, "data", "cache") if variant == "NPO" else None
        config = dict(out=str(src), relearn_lr=2e-5, relearn_on="forget", seed=0)
        stages = {k: metrics(30.0) for k in ("original", "unlearn", "unlearned", "relearn/unlearned")}
        stages["relearn/unlearned"]["curve"] = [dict(step=0, verbmem_held=24.5)]
        (src / "unlearned").mkdir(parents=True)
        (src / "unlearned" / "config.json").write_text("{}")
        (src / "results.json").write_text(json.dumps({"config": config, "stages": stages, "summary": {"x": 1}}))
        if cmd:
            assert "--stop-verbmem" in cmd and "--control-from" not in cmd
    dst = real_study.folder(out, "relearn-strong", "NPO", 0)
    cmd = real_study.command(out, "relearn-strong", "NPO", 0, "data", "cache")
    real_study.borrow_unlearning(out, "relearn-strong", "NPO", 0, cmd, "data", "cache")
    res = json.loads((dst / "results.json").read_text())
    assert set(res["stages"]) == {"original", "unlearn", "unlearned"} and not res["summary"]
    assert all(e["borrowed_from"].endswith("relearn/npo-s0") for e in res["stages"].values())
    assert res["config"] == dict(out=str(dst), relearn_lr=5e-5, relearn_on="forget", seed=0)
    src = real_study.folder(out, "relearn", "NPO", 0)
    assert os.path.samefile(dst / "unlearned" / "config.json", src / "unlearned" / "config.json")

    # the ILU run's stop rule comes from the lever's own NPO run, here at the same depth as relearn's
    res["stages"]["relearn/unlearned"] = dict(curve=[dict(step=0, verbmem_held=24.5)])
    (dst / "results.json").write_text(json.dumps(res))
    ilu_dst = real_study.folder(out, "relearn-strong", "NPO + ILU(GSM8K)", 0)
    cmd = real_study.command(out, "relearn-strong", "NPO + ILU(GSM8K)", 0, "data", "cache")
    real_study.borrow_unlearning(out, "relearn-strong", "NPO + ILU(GSM8K)", 0, cmd, "data", "cache")
    config = json.loads((ilu_dst / "results.json").read_text())["config"]
    assert config == dict(out=str(ilu_dst), relearn_lr=5e-5, relearn_on="forget", seed=0)
    before = (ilu_dst / "results.json").read_text()
    real_study.borrow_unlearning(out, "relearn-strong", "NPO + ILU(GSM8K)", 0, cmd, "data", "cache")
    assert (ilu_dst / "results.json").read_text() == before            # a started run is never overwritten
