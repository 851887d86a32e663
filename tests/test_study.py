"""benchmarks/tiny_study.py: the relearning criterion and the held-out NLL, on hand-computed cases."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import runlib  # noqa: E402
import tiny_study  # noqa: E402
from conftest import tiny_llama, token_pairs  # noqa: E402


def _run(unlearned, after):
    return {"unlearned": {"bio": unlearned}, "finetuned": {"sst2": {"bio": after}}}


def test_relearning_criterion_by_hand():
    control = [_run(1.0, 0.95), _run(1.0, 0.93)]                  # the target: 1.0; control keeps 94%
    back = [_run(0.25, 0.55), _run(0.25, 0.60)]                   # gains 0.30, 0.35: share (0.4 + 0.4667) / 2
    r = tiny_study.relearning("wmdp", ["sst2"], control, back)["sst2"]
    assert r["share"] == pytest.approx((0.30 / 0.75 + 0.35 / 0.75) / 2)
    assert r["gain"] == pytest.approx(0.325) and r["spread"] == pytest.approx(0.05 / 2 ** 0.5)
    assert r["control_kept"] == pytest.approx(0.94) and r["relearns"]
    noisy = [_run(0.25, 0.25), _run(0.25, 0.85)]                  # share 0.4, but gain 0.3 < 2 x std 0.42
    assert not tiny_study.relearning("wmdp", ["sst2"], control, noisy)["sst2"]["relearns"]
    small = [_run(0.25, 0.40), _run(0.25, 0.41)]                  # consistent, but a fifth of the way
    assert not tiny_study.relearning("wmdp", ["sst2"], control, small)["sst2"]["relearns"]
    weak_control = [_run(1.0, 0.80), _run(1.0, 0.80)]             # the fine-tuning itself erases (80%)
    assert not tiny_study.relearning("wmdp", ["sst2"], weak_control, back)["sst2"]["relearns"]


def test_answer_nll_weighs_every_answer_token_equally():
    model = tiny_llama(layers=2).eval()
    data = token_pairs(5, seed=1, answer_len=3) + token_pairs(3, seed=2, answer_len=1)
    total = count = 0.0
    with torch.no_grad():
        for ex in data:                                           # one example at a time, summed by hand
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(ex["labels"][1:])
            keep = labels != -100
            total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    assert runlib.answer_nll(model, data, batch_size=3) == pytest.approx(total / count, rel=1e-5)
