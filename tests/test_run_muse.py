"""run_muse.py end to end in a subprocess with a micro budget: results.json, the table, merge, bad input."""
import json
import subprocess
import sys

import pytest

from conftest import DATA, ROOT, needs_data, run_script

MICRO = ["--tiny", "--tiny-passages", "4", "--tiny-steps", "6", "--tiny-hidden", "32", "--tiny-layers", "2",
         "--tiny-general", "20", "--steps", "2", "--finetune-steps", "2", "--finetune-on", "mnli",
         "--fa-limit", "4", "--env-batch-size", "4", "--verbmem-tokens", "8", "--knowmem-tokens", "4"]


def run(args, tmp_path, timeout=300):
    return run_script("run_muse.py", args, tmp_path, timeout)


@needs_data
def test_micro_runs_results_table_and_merge(tmp_path):
    for name, env in (("npo", "none"), ("npo-ilu", "gsm8k")):
        r = run(["--method", "npo", "--ilu-env", env, "--data-dir", DATA, "--out", str(tmp_path / "muse" / name),
                 *MICRO], tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "muse" / "npo-ilu" / "results.json").read_text())
    assert set(res) == {"config", "stages", "summary", "cpu"}
    st = res["stages"]
    assert set(st) == {"original", "original/finetune/mnli", "unlearn", "unlearned", "unlearned/finetune/mnli"}
    for name in ("original", "unlearned", "unlearned/finetune/mnli"):
        assert {"verbmem", "knowmem_forget", "knowmem_retain", "privleak", "auc", "verbmem_unseen"} <= set(st[name])
        assert 0 <= st[name]["verbmem"] <= 100 and 0 <= st[name]["auc"] <= 1
    assert 0 <= st["unlearned/finetune/mnli"]["fa"] <= 1
    assert len(st["unlearn"]["history"]) == 2 and set(st["unlearn"]["envs"]) == {"gsm8k"}
    assert st["unlearn"]["history"][0]["irm"] > 0
    md = (tmp_path / "muse" / "npo-ilu" / "results.md").read_text()
    assert "| model | VerbMem ↓ | KnowMem forget ↓ | KnowMem retain ↑ | PrivLeak | FA ↑ |" in md
    assert "| NPO + ILU(GSM8K), fine-tuned on mnli |" in md

    # one command merges the NPO and NPO + ILU runs found under the same parent into the paper's layout
    rep = subprocess.run([sys.executable, "run_muse.py", "--report", str(tmp_path / "muse"), "--out",
                          str(tmp_path / "muse")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    rows = [line.split(" | ")[0].strip("| ") for line in (tmp_path / "muse" / "report.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| model")]
    assert rows == ["Original", "NPO", "NPO + ILU(GSM8K)", "Original, fine-tuned on mnli",
                    "NPO, fine-tuned on mnli", "NPO + ILU(GSM8K), fine-tuned on mnli"]


@pytest.mark.parametrize("args, message", [
    (["--corpus", "poems"], "unknown corpus 'poems'"),
    (["--method", "ga"], "unknown method 'ga'"),
    (["--ilu-env", "imdb"], "unknown ILU environment 'imdb'"),
    (["--lam", "-1"], "--lam must be >= 0"),
    (["--data-dir", "/nonexistent/data"], "--data-dir /nonexistent/data does not exist"),
    (["--tiny", "--corpus", "books"], "--tiny is built from MUSE-News"),
    (["--model", "no-such-org/no-such-model-xyz", "--data-dir", "."], "cannot load model 'no-such-org/no-such-model-xyz'"),
])
def test_bad_input_one_line_exit_2(args, message, tmp_path):
    out = tmp_path / "run"
    r = run(args + ["--out", str(out)], tmp_path, timeout=120)
    assert r.returncode == 2
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
