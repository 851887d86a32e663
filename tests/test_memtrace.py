"""benchmarks/memtrace.py: a traced stage (fake tensors, no storage) against the same stage run
for real, category by category, at micro scale; and the traced parameters against their count."""
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import memtrace  # noqa: E402
from conftest import ROOT  # noqa: E402

MICRO = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096)
STAGES = memtrace.stages(512, seq=32, env_len=16, rmu_seq=16, rmu_layer=1, finetune_len=16, eval_len=32, gen_len=16)
TOLERANCE = 0.03   # of the real peak: fake tensors of the real inputs and index tensors differ a little


# the low-memory rows differ from one another only by method or by the optimizer's bits: two of them stand for all
CHECKED = [n for n in STAGES if not n.startswith("low memory") or n.endswith("NPO + ILU(GSM8K)")]   # 8 and 4 bits


@pytest.mark.parametrize("name", CHECKED)
def test_trace_matches_real_allocations(name):
    fake = memtrace.trace(STAGES[name], MICRO, fake=True, answer_tokens=8)
    real = memtrace.trace(STAGES[name], MICRO, fake=False, answer_tokens=8)
    assert real["total"] > real["PARAM"] > 0
    for key in (*memtrace.CATEGORIES, "total"):
        assert abs(fake[key] - real[key]) <= TOLERANCE * real["total"], (key, fake, real)


def test_peak_does_not_grow_past_two_micro_batches():
    peaks = []
    for accum in (2, 4):
        stage = memtrace.stages(512, seq=32, env_len=16, grad_accum=accum)["NPO + ILU(GSM8K), full estimator"]
        peaks.append(memtrace.trace(stage, MICRO, answer_tokens=8))
    assert peaks[0] == peaks[1]


def test_traced_parameters_are_the_models_without_storage():
    """A 1.2B-parameter model (7B width, 4 layers) traced in seconds: bf16 parameters, 2 bytes each."""
    import torch

    big = dict(MICRO, vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
               num_attention_heads=32, num_key_value_heads=8)
    seen = {}
    out = memtrace.trace(lambda m: seen.update(n=sum(p.numel() for p in m.parameters())), big, fake=True)
    assert seen["n"] > 1.1e9 and out["PARAM"] == 2 * seen["n"]
    assert torch.get_default_dtype() == torch.float32                  # restored after building in bf16


def test_bench_trace_prints_every_stage():
    r = subprocess.run([sys.executable, "benchmarks/bench.py", "--size", "micro", "--trace"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0][2:] for row in rows] == list(STAGES)
    assert "Task-vector analysis (CPU memory, arithmetic" in r.stdout
