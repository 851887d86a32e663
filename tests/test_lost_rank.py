"""A torchrun group that loses a process mid-stage (issue #30): under `torchrun --nproc-per-node 2` (gloo,
CPU) one rank is killed with SIGKILL while the other fine-tunes, then again while they unlearn. The
survivor must exit within seconds (no hang) with one line of its own and no traceback; the same command
then resumes from the last finished stage, and the final results equal an uninterrupted run's within
tests/test_distributed.py's tolerance."""
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from conftest import DATA, ROOT, needs_data
from test_distributed import ATOL, ENV, MICRO, TORCHRUN, compare

ARGS = [*MICRO["run_muse.py"], "--method", "npo", "--ilu-env", "gsm8k", "--steps", "30", "--finetune-steps", "30"]


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of a torchrun worker of this launcher by its RANK (read from /proc: Linux)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if f"RANK={rank}".encode() in env and parent == launcher:
            return int(pid)
    return None


def run_and_kill(cmd, results, after_stage, rank):
    """Start cmd; once results.json records after_stage, SIGKILL the worker of `rank` half a second later.
    Returns (exit status, seconds from the kill to the launcher's exit, output)."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    out = []
    reader = threading.Thread(target=lambda: out.extend(p.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        try:
            if after_stage in json.loads(results.read_text())["stages"]:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    time.sleep(0.5)
    pid = rank_pid(p.pid, rank)
    assert p.poll() is None and pid, "the run ended before the kill: lengthen the stage"
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    try:
        code = p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("the surviving rank hangs after losing its peer")
    reader.join(5)
    return code, time.time() - killed, "".join(out)


@needs_data
def test_a_lost_rank_stops_the_group_in_one_line_and_the_run_resumes(tmp_path):
    common = [*ARGS, "--data-dir", DATA, "--cache-dir", str(tmp_path / "cache")]
    ref = subprocess.run([*TORCHRUN, "run_muse.py", *common, "--out", str(tmp_path / "ref")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert ref.returncode == 0, ref.stderr[-3000:]
    cmd = [*TORCHRUN, "run_muse.py", *common, "--out", str(tmp_path / "two")]
    results = tmp_path / "two" / "results.json"
    for after, victim, stage in (("original", 1, "original/finetune/mnli"),       # killed while fine-tuning
                                 ("original/finetune/mnli", 0, "unlearn")):     # rank 0 killed while unlearning
        code, seconds, out = run_and_kill(cmd, results, after, victim)
        survivor = 1 - victim
        said = [line for line in out.splitlines() if line.startswith(f"error: rank {survivor}: ")]
        assert code != 0 and seconds < 30, (code, seconds)
        assert len(said) == 1, out[-3000:]
        assert "another process of the torchrun group is gone" in said[0] or "stopped by SIGTERM" in said[0]
        assert said[0].endswith("run the same command to resume")
        assert 'run_muse.py", line' not in out and "runlib.py\", line" not in out      # no traceback of ours
        done = json.loads(results.read_text())["stages"]
        assert after in done and stage not in done                                # the stage cut short is not saved
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stdout and "2 finished stages" in again.stdout
    worst = compare(tmp_path / "ref", tmp_path / "two")
    assert worst[1] <= ATOL, worst
