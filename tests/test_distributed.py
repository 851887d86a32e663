"""FSDP2 under torchrun on CPU (gloo, 2 processes): the sharded run against one process on the same
global batch. tests/dist_worker.py does the steps; these tests read what it measured.

Tolerance (fp32): losses and penalties within 1e-5 relative, parameters within 1e-5 absolute after
steps that move them by 1.5e-3 or more (lr 1e-3): the sharded sums run in another order, nothing else."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import DATA, ROOT, needs_data

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
REL, ATOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    r = subprocess.run([*TORCHRUN, "tests/dist_worker.py", str(tmp / "out.json"), str(tmp)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((tmp / "out.json").read_text())


UNLEARN = ["npo_ilu_micro_split", "npo_ilu_row_split", "npo_ilu_env_micro", "npo_ilu_split_estimator",
           "graddiff_ilu", "rmu_ilu"]


@pytest.mark.parametrize("case", UNLEARN)
def test_unlearning_step_matches_one_process(measured, case):
    m = measured[case]
    assert measured["world"] == 2
    assert m["loss_diff"] <= REL * 20          # losses are O(1)-O(14): NPO's forget loss starts at 2/beta * log 2
    assert m["irm_rel"] <= REL and all(v > 0 for v in m["irm"])
    assert m["param_diff"] <= ATOL
    assert m["moved"] >= 1e-3                  # the steps did move the weights: equality is not trivial


def test_penalty_is_the_global_batch_penalty_not_a_mean_of_rank_penalties(measured):
    p = measured["penalty"]
    assert p["sharded"] == pytest.approx(p["global_penalty"], rel=REL)
    # the two objectives differ on this batch, so the check above can tell them apart
    assert abs(p["mean_of_rank_penalties"] - p["global_penalty"]) > 0.05 * p["global_penalty"]


def test_finetuning_steps_and_evaluation_between_them_match(measured):
    m = measured["finetune"]
    assert m["loss_diff"] <= REL and m["param_diff"] <= ATOL
    whole, sharded = m["hook_outputs"]
    assert len(whole) == len(sharded) == 3
    assert sharded == pytest.approx(whole, rel=REL)


def test_evaluation_saving_loading_and_task_vectors(measured):
    e = measured["eval"]
    assert e["preds_equal"] and e["acc"][0] == e["acc"][1]
    assert e["generations_equal"]
    assert e["min_k_diff"] <= 1e-6
    assert e["loaded_logit_diff"] <= 1e-6      # rank 0 read the folder, rank 1 started on the meta device
    assert e["saved_diff"] <= ATOL             # save_model of the sharded model = the whole model's weights
    assert e["cos"][1] == pytest.approx(e["cos"][0], rel=REL)   # the weights differ by the step's 1e-7
    assert e["norm"][1] == pytest.approx(e["norm"][0], rel=REL)


def floats(a, b, path=""):
    """(path, |a - b|) of every number of two results.json stages, timings left out; non-numbers must be equal."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            if k not in ("time_s", "ms"):
                yield from floats(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            yield from floats(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        yield path, abs(a - b)
    else:
        assert a == b, path


MICRO = {
    "run_wmdp.py": ["--tiny", "--tiny-questions", "8", "--tiny-steps", "8", "--tiny-hidden", "32", "--tiny-layers", "2",
                    "--tiny-general", "40", "--steps", "2", "--finetune-steps", "3", "--finetune-on", "sst2", "mnli",
                    "--fa-limit", "8", "--env-batch-size", "4", "--curve-points", "2", "--relearn", "--tv-task", "sst2",
                    "--method", "npo", "--ilu-env", "gsm8k"],
    "run_muse.py": ["--tiny", "--tiny-passages", "4", "--tiny-steps", "6", "--tiny-hidden", "32", "--tiny-layers", "2",
                    "--tiny-general", "20", "--steps", "2", "--finetune-steps", "2", "--finetune-on", "mnli",
                    "--fa-limit", "4", "--env-batch-size", "4", "--verbmem-tokens", "8", "--knowmem-tokens", "4"],
}


def compare(one: Path, two: Path) -> tuple[str, float]:
    a = json.loads((one / "results.json").read_text())["stages"]
    b = json.loads((two / "results.json").read_text())["stages"]
    diffs = list(floats(a, b))
    assert len(diffs) > 30
    return max(diffs, key=lambda d: d[1])


@needs_data
@pytest.mark.parametrize("script", ["run_wmdp.py", "run_muse.py"])
def test_runner_under_torchrun_matches_one_process(script, tmp_path):
    common = [*MICRO[script], "--data-dir", DATA, "--cache-dir", str(tmp_path / "cache")]
    one = subprocess.run([sys.executable, script, *common, "--out", str(tmp_path / "one")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=ENV)
    assert one.returncode == 0, one.stderr[-2000:]
    two_cmd = [*TORCHRUN, script, *common, "--out", str(tmp_path / "two")]
    two = subprocess.run(two_cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("config: ") == 1 and "torchrun: 2 processes, gloo" in two.stdout   # rank 0 speaks
    worst = compare(tmp_path / "one", tmp_path / "two")
    assert worst[1] <= ATOL, worst
    assert (tmp_path / "two" / "unlearned" / "model.safetensors").exists()
    if script == "run_muse.py":
        return
    assert (tmp_path / "two" / "results.md").read_text().count("| NPO + ILU(GSM8K) |") == 1
    # resume under torchrun: a lost stage runs again from the saved unlearned model, read into the shards
    path = tmp_path / "two" / "results.json"
    res = json.loads(path.read_text())
    res["stages"].pop("unlearned/finetune/mnli")
    path.write_text(json.dumps(res))
    again = subprocess.run(two_cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "8 finished stages" in again.stdout and "unlearned/finetune/mnli: RA" in again.stdout
    assert compare(tmp_path / "one", tmp_path / "two")[1] <= ATOL


@pytest.mark.parametrize("args, message", [
    (["--finetune-batch", "3"], "--finetune-batch 3 cannot be split evenly across 2 processes"),
    (["--env-batch-size", "5"], "--env-batch-size 5 cannot be split evenly across 2 processes"),
    (["--batch-size", "1", "--grad-accum", "3"], "2 processes can split neither --batch-size 1 nor --grad-accum 3"),
    # a backend this machine cannot use: the wording depends on the build (the CPU wheel has no nccl; the CUDA
    # wheel has it but sees no GPU), so the line is asked to name the backend and the one to use instead
    (["--dist-backend", "mpi"], ["'mpi'", "use gloo on CPUs"]),
    (["--dist-backend", "nccl"], ["nccl", "use gloo on CPUs"]),
])
def test_bad_distributed_setup_one_line_exit_2(args, message, tmp_path):
    # one process of a torchrun group of two, as torchrun starts it: the line and status 2, before any work
    backend = args[1] if args[0] == "--dist-backend" else None
    if backend and dist.is_backend_available(backend) and (backend != "nccl" or torch.cuda.is_available()):
        pytest.skip(f"{backend} is usable here, so it is not bad input")
    env = dict(ENV, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")
    r = subprocess.run([sys.executable, "run_wmdp.py", "--out", str(tmp_path / "run"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=env)
    needles = message if isinstance(message, list) else [message]
    assert r.returncode == 2 and all(n in r.stderr for n in needles), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_bad_distributed_setup_under_torchrun(tmp_path):
    # the real launcher: both processes exit 2, the line is said once (rank 0), no traceback of ours
    r = subprocess.run([*TORCHRUN, "run_wmdp.py", "--out", str(tmp_path / "run"), "--finetune-batch", "3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert out.count("error: --finetune-batch 3 cannot be split evenly across 2 processes") == 1
    assert "exitcode  : 2" in out and "run_wmdp.py\", line" not in out
