"""run_wmdp.py end to end in a subprocess with a micro budget: results.json, resume, bad input."""
import json
import subprocess
import sys

import pytest

from conftest import DATA, ROOT, needs_data, run_script

MICRO = ["--tiny", "--tiny-questions", "8", "--tiny-steps", "8", "--tiny-hidden", "32", "--tiny-layers", "2",
         "--tiny-general", "40", "--steps", "2", "--finetune-steps", "3", "--finetune-on", "sst2", "mnli",
         "--fa-limit", "8", "--env-batch-size", "4", "--curve-points", "2", "--relearn", "--tv-task", "sst2"]


def run(args, tmp_path, timeout=300):
    return run_script("run_wmdp.py", args, tmp_path, timeout)


@needs_data
def test_micro_run_results_and_resume(tmp_path):
    out = tmp_path / "run"
    args = ["--method", "npo", "--ilu-env", "gsm8k", "--data-dir", DATA, "--out", str(out), *MICRO]
    first = run(args, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"config", "stages", "summary", "cpu"}
    assert f"CPU kernels: {res['cpu']['kernels']}, {res['cpu']['threads']} threads" in first.stdout
    if has_avx2():                 # --cpu-kernels avx2 is the default
        assert res["cpu"]["kernels"] == "AVX2" and "could not apply" not in first.stdout
    assert res["config"]["method"] == "npo" and res["config"]["ilu_env"] == ["gsm8k"]
    st = res["stages"]
    want = {"original", "original/finetune/sst2", "original/finetune/mnli", "unlearn", "unlearned",
            "unlearned/finetune/sst2", "unlearned/finetune/mnli", "relearn", "task_vectors"}
    assert set(st) == want
    for name in ("original", "unlearned"):
        assert set(st[name]) >= {"wmdp_bio", "wmdp_cyber", "mmlu", "fq", "time_s"}
        assert st[name]["fq"] == pytest.approx(1 - st[name]["wmdp_bio"])
    ft = st["unlearned/finetune/sst2"]
    assert [p["step"] for p in ft["points"]] == [1, 2, 3]          # RA's checkpoints of a 3-step run
    assert ft["ra"] == pytest.approx(sum(p["fq"] for p in ft["points"]) / 3)
    assert 0 <= ft["fa"] <= 1 and ft["fa_examples"] == 8 and "note" in ft   # sst2 has no local train file
    assert len(st["unlearn"]["history"]) == 2 and st["unlearn"]["history"][0]["irm"] > 0
    assert {"fq_before", "fq_after", "samples"} <= set(st["relearn"])
    assert -1 <= st["task_vectors"]["cos_uft_ft"] <= 1
    s = res["summary"]
    assert s["unlearned"]["avg_ra"] == pytest.approx((st["unlearned/finetune/sst2"]["ra"]
                                                      + st["unlearned/finetune/mnli"]["ra"]) / 2)
    assert set(s["unlearned"]["fa"]) == {"sst2", "mnli"}
    md = (out / "results.md").read_text()
    assert "| method | FQ | MMLU | Avg RA | Avg FA |" in md and "| NPO + ILU(GSM8K) |" in md
    assert (out / "unlearned" / "config.json").exists()

    # resume: nothing is recomputed
    again = run(args, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stdout and "9 finished stages" in again.stdout
    assert json.loads((out / "results.json").read_text())["stages"] == st
    # resume after a lost stage: only that stage runs again
    res["stages"].pop("unlearned/finetune/mnli")
    (out / "results.json").write_text(json.dumps(res))
    third = run(args, tmp_path)
    assert third.returncode == 0, third.stderr[-2000:]
    st3 = json.loads((out / "results.json").read_text())["stages"]
    assert set(st3) == want
    assert all(st3[k] == st[k] for k in want - {"unlearned/finetune/mnli"})
    assert "unlearned/finetune/mnli: RA" in third.stdout and "unlearned/finetune/sst2: RA" not in third.stdout

    # report mode merges runs into Table 2 and Figure 4
    rep = subprocess.run([sys.executable, "run_wmdp.py", "--report", str(out), str(out), "--out", str(tmp_path / "rep")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "Figure 4" in text and "| method | sst2 | mnli |" in text


@pytest.mark.parametrize("args, message", [
    (["--method", "dpo"], "unknown method 'dpo'"),
    (["--ilu-env", "imdb"], "unknown ILU environment 'imdb'"),
    (["--lam", "-1"], "--lam must be >= 0"),
    (["--cpu-kernels", "avx9"], "unknown --cpu-kernels 'avx9'"),
    (["--env-grad-batch", "-2"], "--env-grad-batch must be >= 0"),
    (["--finetune-on", "cola"], "unknown fine-tuning set 'cola'"),
    (["--data-dir", "/nonexistent/data"], "--data-dir /nonexistent/data does not exist"),
    (["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["--model", "no-such-org/no-such-model-xyz", "--data-dir", "."], "cannot load model 'no-such-org/no-such-model-xyz'"),
])
def test_bad_input_one_line_exit_2_results_untouched(args, message, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    config = {}
    if "--model" in args:  # earlier results of this very config, so that the run would resume
        import dataclasses

        sys.path.insert(0, ROOT)
        import run_wmdp
        import runlib

        cfg = runlib.resolve(runlib.parse_config(run_wmdp.Config, args + ["--out", str(out)]), run_wmdp.TINY)
        config = dataclasses.asdict(cfg)
    earlier = json.dumps({"config": config, "stages": {"original": {"fq": 0.5}}, "summary": {}})
    (out / "results.json").write_text(earlier)
    r = run(args + ["--out", str(out)], tmp_path, timeout=120)
    assert r.returncode == 2
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert (out / "results.json").read_text() == earlier


@needs_data
def test_different_config_in_same_out_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"config": {"method": "rmu"}, "stages": {}, "summary": {}}))
    r = run(["--method", "npo", "--data-dir", DATA, "--out", str(out), *MICRO], tmp_path)
    assert r.returncode == 2 and "holds a run with different" in r.stderr


# -- --cpu-kernels avx2: the same arithmetic on any x86-64 machine ---------------------------------

FINGERPRINT = """
import hashlib, sys, torch
sys.path.insert(0, ".")
if len(sys.argv) > 1:
    import runlib
    print(runlib.pin_cpu_kernels(sys.argv[1]))
else:
    print(torch.backends.cpu.get_cpu_capability())
torch.manual_seed(0)
x = torch.randn(512, 128, requires_grad=True)
h = torch.nn.functional.silu(x @ (torch.randn(128, 344) * 0.05)) @ (torch.randn(344, 128) * 0.05)
logits = torch.nn.functional.rms_norm(h, (128,)) @ torch.randn(128, 2048)
loss = torch.nn.functional.cross_entropy(logits, torch.randint(0, 2048, (512,)))
loss.backward()
print(hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in (logits, loss, x.grad))).hexdigest())
"""


def fingerprint(args=(), env=None):
    import os

    r = subprocess.run([sys.executable, "-c", FINGERPRINT, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split()


def has_avx2() -> bool:
    import platform
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    return platform.machine() == "x86_64" and cpuinfo.exists() and " avx2" in cpuinfo.read_text()


@pytest.mark.skipif(not has_avx2(), reason="needs an x86-64 CPU with AVX2")
def test_pinned_kernels_match_torch_and_mkl_told_by_the_environment():
    """The oracle: torch and MKL told to use AVX2 by environment variables set before the process
    starts (their documented switches), against pin_cpu_kernels called after torch is imported."""
    import runlib

    told = fingerprint(env=runlib.AVX2_KERNELS)
    pinned = fingerprint(["avx2"])
    native = fingerprint(["native"])
    assert told[0] == pinned[0] == "AVX2"
    assert pinned[1] == told[1]
    if native[0] != "AVX2":       # an AVX-512 CPU: the pin changes the arithmetic (so the match above is no accident)
        assert native[1] != pinned[1]


def test_recipe_fills_only_what_the_command_line_left():
    """Each default in one place: the parser itself records the flags given (abbreviated, --flag=value and
    --no- forms too), and the --tiny recipe and the method's table fill only the others."""
    sys.path.insert(0, ROOT)
    import run_wmdp
    import runlib

    cfg = runlib.parse_config(run_wmdp.Config, ["--tiny", "--finetune-st", "3", "--lr=0.002", "--no-task-vectors"])
    assert cfg.given == {"tiny", "finetune_steps", "lr", "task_vectors"}
    cfg = runlib.resolve(cfg, run_wmdp.TINY)
    assert (cfg.finetune_steps, cfg.lr, cfg.task_vectors) == (3, 0.002, False)          # given: kept
    assert (cfg.steps, cfg.finetune_batch, cfg.relearn_batch) == (60, 8, 8)             # the recipe's
    assert (cfg.grad_accum, cfg.batch_size) == (1, 8)                                   # the recipe over the method's
    plain = runlib.resolve(runlib.parse_config(run_wmdp.Config, ["--method", "rmu"]), run_wmdp.TINY)
    assert (plain.lr, plain.batch_size, plain.steps) == (5e-5, 4, 150)                  # RMU's table, the flag's steps
