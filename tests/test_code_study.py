"""#37's study (benchmarks/code_study.py): the split by module, each metric against a hand computation, the
criterion's arithmetic, and a micro-scale run of the whole plumbing (tiny random model, synthetic data)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import ilu
import runlib
from conftest import DATA, model_for, needs_data

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import code_study  # noqa: E402

WORDS = "def return self import class for in if else while yield lambda none true false value key".split()


def _tok():
    texts = [" ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(40)) for i in range(50)]
    return runlib.train_tokenizer(texts, vocab_size=320)


@needs_data
def test_split_is_by_module_disjoint_covering_and_seeded():
    chunks = code_study.load_chunks(DATA)
    modules = {c["module"] for c in chunks}
    assert len(chunks) == 436 and len(modules) == 109
    T, V = code_study.split_modules(chunks, seed=0)
    mt, mv = {c["module"] for c in T}, {c["module"] for c in V}
    assert mt.isdisjoint(mv) and mt | mv == modules                       # by module: disjoint, covering
    assert len(mt) == round(0.5 * 109) and len(T) + len(V) == len(chunks)
    assert all(sum(c["module"] == m for c in T) == 4 for m in mt)          # a module's 4 chunks on one side
    assert code_study.split_modules(chunks, seed=0) == (T, V)              # the seed decides it
    T1, _ = code_study.split_modules(chunks, seed=1)
    assert {c["module"] for c in T1} != mt
    with pytest.raises(ilu.ILUError, match="leaves T or V empty"):
        code_study.split_modules(chunks, seed=0, share=0.001)


def test_code_nll_is_the_token_weighted_mean_by_hand():
    tok = _tok()
    model = model_for(tok, layers=2, seed=3, init=0.5)
    texts = ["def return self import class", "for in if else while yield lambda none true false value key"]
    length = 6
    total, count = 0.0, 0
    for t in texts:                                          # one position at a time, no batching, no padding
        ids = tok(t, truncation=True, max_length=length)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        for pos in range(len(ids) - 1):
            total -= float(logp[pos, ids[pos + 1]])
            count += 1
    assert code_study.code_nll(model, tok, texts, length=length, batch_size=2) == pytest.approx(total / count,
                                                                                                rel=1e-5)


def test_code_mem_splits_by_tokens_and_scores_rouge_by_hand(monkeypatch):
    tok = _tok()
    text = " ".join(WORDS * 2)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    recs = code_study.code_mem_records(tok, [text, "def"], prefix=4, new=3)
    assert recs == [dict(prompt=tok.decode(ids[:4]), gt=tok.decode(ids[4:7]))]   # too short: skipped
    model = model_for(tok)
    monkeypatch.setattr(ilu, "generate", lambda m, t, prompts, *a, **k: [r["gt"] for r in recs])
    assert code_study.code_mem(model, tok, [text], prefix=4, new=3) == pytest.approx(100.0)
    gt_words = recs[0]["gt"].split()
    half = " ".join(gt_words[:1])                                  # 1 of the gt's words, nothing else
    monkeypatch.setattr(ilu, "generate", lambda m, t, prompts, *a, **k: [half])
    p, r = 1 / 1, 1 / len(gt_words)                               # LCS 1 over a 1-word prediction
    assert code_study.code_mem(model, tok, [text], prefix=4, new=3) == pytest.approx(100 * 2 * p * r / (p + r))


def test_share_back_and_the_criterion_by_hand():
    assert code_study.share_back(unlearned=3.0, after=2.5, pretrained=2.0) == pytest.approx(0.5)
    assert code_study.share_back(3.0, 3.2, 2.0) == pytest.approx(-0.2)       # pushed further away
    assert math.isnan(code_study.share_back(2.0, 1.0, 2.0))
    # mean 0.4, std 0.1: >= 1/3, > 0.2, above a control of 0.05 -> relearns; a control of 0.5 -> does not
    assert code_study.relearns([0.3, 0.4, 0.5], [0.05, 0.05, 0.05])
    assert not code_study.relearns([0.3, 0.4, 0.5], [0.5, 0.5, 0.5])
    assert not code_study.relearns([0.0, 0.4, 0.8], [0.0, 0.0, 0.0])         # std 0.4: 0.4 < 2 x 0.4
    m, s, holds = code_study.holds_back([0.5, 0.6, 0.7], [0.2, 0.2, 0.2])     # gaps 0.3, 0.4, 0.5
    assert (m, s, holds) == (pytest.approx(0.4), pytest.approx(0.1), True)
    assert not code_study.holds_back([0.5, 0.2], [0.2, 0.5])[2]


def test_gradient_norms_match_autograd_on_the_losses():
    tok = _tok()
    model = model_for(tok, layers=2, seed=1, init=0.2)
    forget = ilu.encode_texts(tok, ["def return self import class for"] * 2)
    env = ilu.encode_pairs(tok, [dict(prompt="if else while", answer=" yield lambda")] * 3)
    ref = ilu.reference_logprobs(model, forget) + 1.0
    got = code_study.gradient_norms(model, forget, env, ref)
    assert all(p.grad is None for p in model.parameters())                 # measured, nothing accumulated
    fb, eb = ilu.collate(forget), ilu.collate(env)

    def grad_norm(loss):                                                   # by .backward(), one loss at a time
        model.zero_grad(set_to_none=True)
        loss.backward()
        return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))

    logits = lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # noqa: E731
    penalty = ilu.irm_penalty(logits(eb), eb["labels"])
    assert got["penalty"] == pytest.approx(float(penalty.detach()), rel=1e-6) and got["penalty"] > 0
    assert got["grad_penalty"] == pytest.approx(grad_norm(penalty), rel=1e-6)
    npo = ilu.npo_loss(ilu.sequence_logprob(logits(fb), fb["labels"]), ref)
    assert got["grad_unlearn"] == pytest.approx(grad_norm(npo), rel=1e-6) and got["grad_unlearn"] > 0


def _micro():
    """A tiny tokenizer, the study's data made of synthetic text, and a config sized for it."""
    tok = _tok()
    chunks = [dict(module=f"m{m}", chunk=c, text=" ".join(WORDS[(m + c + j) % len(WORDS)] for j in range(60)))
              for m in range(6) for c in range(2)]
    pairs = [dict(prompt=" ".join(WORDS[i % 5:i % 5 + 3]), answer=" " + WORDS[i % 7]) for i in range(12)]
    clf = [dict(prompt=" ".join(WORDS[i % 6:i % 6 + 4]), answer=" true", choices=[" true", " false"], label=i % 2)
           for i in range(8)]
    gen = [dict(prompt="if else", answer=" 3", choices=None, label="3") for _ in range(2)]
    data = dict(chunks=chunks, retain=[" ".join(WORDS[::-1])] * 4, news=[" ".join(WORDS)] * 2,
                wiki=[" ".join(WORDS[3:])] * 2, env=ilu.encode_pairs(tok, pairs),
                tasks={"gsm8k": (ilu.encode_pairs(tok, pairs), gen), "sst2": (ilu.encode_pairs(tok, clf), clf)})
    cfg = dict(code_study.DEFAULTS, tasks=["gsm8k", "sst2"], probe_chunk=1, nll_tokens=16, mem_prefix=8, mem_new=4, depth=0.05,
               max_steps=3, grad_accum=1, batch_size=2, lr=5e-3, env_batch_size=4, ft_steps=2, ft_batch=4,
               ft_lr=5e-3, checkpoints=[1, 2], max_length=32)
    return tok, data, cfg


def test_micro_run_of_the_study_plumbing_and_resume(tmp_path):
    tok, data, cfg = _micro()
    model = model_for(tok, layers=2, seed=0)
    stages = code_study.Seed(cfg, 0, model, tok, data, tmp_path).run()
    expected = {"pretrained", "control/gsm8k", "control/sst2", "control/T",
                *(f"{v}/{s}" for v in code_study.VARIANTS
                  for s in ("unlearned", "finetune/gsm8k", "finetune/sst2", "finetune/T"))}
    assert set(stages) == expected
    for v in code_study.VARIANTS:
        u = stages[f"{v}/unlearned"]
        assert 1 <= len(u["history"]) <= 3 and len(u["stop_checks"]) == len(u["history"])
        assert set(u["grad_before"]) == {"penalty", "grad_unlearn", "grad_penalty"}
        for t in ("gsm8k", "sst2", "T"):
            e = stages[f"{v}/finetune/{t}"]
            assert [p["step"] for p in e["curve"]] == [1, 2] and len(e["share_back"]) == 2
            assert (e["accuracy"] is None) == (t == "T") and -1 <= e["cos_back"] <= 1
    assert stages["control/sst2"]["cos_back"] is None and 0 <= stages["control/sst2"]["accuracy"] <= 1
    assert stages["NPO + ILU(GSM8K)/unlearned"]["history"][0]["irm"] > 0      # the penalty acts in the ILU run
    assert stages["NPO/unlearned"]["history"][0]["irm"] == 0
    saved = json.loads((tmp_path / "seed0" / "results.json").read_text())
    again = code_study.Seed(cfg, 0, model_for(tok, layers=2, seed=0), tok, data, tmp_path).run()   # resume
    assert again == saved["stages"]
    text = code_study.report(tmp_path, [0])
    assert "gsm8k (ILU's environment)" in text and "sst2 (never seen by ILU)" in text and "NPO - ILU" in text
    assert "T (the relearning attack" in text
    ref = tmp_path / "reference.json"                                      # a rerun checked figure by figure
    code_study.save_reference(tmp_path, [0], ref)
    assert code_study.compare(tmp_path, [0], ref) == 0
    data = json.loads(ref.read_text())
    data["seed0"]["lambda 9/unlearned"] = {"v_nll": 1.0}                   # a stage saved from another folder
    ref.write_text(json.dumps(data))
    code_study.save_reference(tmp_path, [0], ref)                         # is kept when this folder's are saved
    assert json.loads(ref.read_text())["seed0"]["lambda 9/unlearned"] == {"v_nll": 1.0}
    data["seed0"]["pretrained"]["v_nll"] += 1e-9
    ref.write_text(json.dumps(data))
    assert code_study.compare(tmp_path, [0], ref) == 1


def test_unlearn_only_then_the_whole_study_resumes(tmp_path):
    tok, data, cfg = _micro()
    first = code_study.Seed(dict(cfg, unlearn_only=True), 0, model_for(tok, layers=2, seed=0), tok, data, tmp_path).run()
    assert set(first) == {"pretrained", *(f"{v}/unlearned" for v in code_study.VARIANTS)}
    whole = code_study.Seed(cfg, 0, model_for(tok, layers=2, seed=0), tok, data, tmp_path).run()
    assert {k: whole[k] for k in first} == first and "NPO/finetune/T" in whole and "control/sst2" in whole


def test_lambda_sweep_matches_the_depth_and_compares_with_npo(tmp_path):
    tok, data, cfg = _micro()
    run = code_study.Seed(dict(cfg, unlearn_only=True), 0, model_for(tok, layers=2, seed=0), tok, data, tmp_path)
    with pytest.raises(ilu.ILUError, match="run the study for this seed first"):
        run.sweep([10.0])
    run.run()
    stages = run.sweep([1.0, 10.0])
    one, base = stages["lambda 1/unlearned"], stages["NPO + ILU(GSM8K)/unlearned"]
    untimed = lambda h: [{k: v for k, v in x.items() if k != "ms"} for x in h]  # noqa: E731
    assert untimed(one["history"]) == untimed(base["history"]) and one["v_nll"] == base["v_nll"]   # the study's run
    ten = stages["lambda 10/unlearned"]
    assert ten["lam"] == 10.0 and -1 <= ten["cos_npo"] <= 1 and ten["norm_ratio"] > 0
    assert ten["history"][0]["irm"] == one["history"][0]["irm"]               # the same start, then lambda acts
    assert ten["v_nll"] != one["v_nll"] and ten["cos_npo"] < one["cos_npo"]
    assert "lambda 10/unlearned" in code_study.report(tmp_path, [0])
    # without --unlearn-only the swept model is attacked as the study's are, from its saved weights
    before = json.loads((tmp_path / "seed0" / "results.json").read_text())["stages"]["lambda 10/unlearned"]
    whole = code_study.Seed(cfg, 0, model_for(tok, layers=2, seed=0), tok, data, tmp_path)
    whole.run()                                                              # the study's attacks, for the report
    attacked = whole.sweep([10.0])
    assert attacked["lambda 10/unlearned"] == before                         # not unlearned again
    pre, u = attacked["pretrained"]["v_nll"], attacked["lambda 10/unlearned"]["v_nll"]
    for t in ("gsm8k", "sst2", "T"):
        e = attacked[f"lambda 10/finetune/{t}"]
        assert e["share_back"] == pytest.approx([(u - p["v_nll"]) / (u - pre) for p in e["curve"]])
    # the lambda-10 model, not another: its GSM8K attack from the saved weights by hand, V read after step 1
    model, got = model_for(tok, layers=2, seed=0), []
    runlib.restore(model, torch.load(tmp_path / "seed0" / "lambda10" / "unlearned.pt"))
    ilu.finetune(model, data["tasks"]["gsm8k"][0], max_steps=cfg["ft_steps"], batch_size=cfg["ft_batch"],
                 lr=cfg["ft_lr"], hook=lambda step, _: got.append(code_study.code_nll(model, tok, run.Vp, cfg["nll_tokens"])),
                 hook_steps=[1], hook_each_epoch=False, seed=0, progress=False)
    assert got == [attacked["lambda 10/finetune/gsm8k"]["curve"][0]["v_nll"]]
    text = code_study.report(tmp_path, [0])
    assert "NPO + ILU(GSM8K), lambda 10 (1 seed): share back" in text
    # another environment (item 5): ILU(SST-2) at lambda 1, its penalty read on SST-2's pairs, then attacked
    other = whole.sweep([1.0], "sst2")
    e = other["ILU(sst2) lambda 1/unlearned"]
    assert e["env"] == "sst2" and e["history"][0]["forget"] == one["history"][0]["forget"]
    model = model_for(tok, layers=2, seed=0)
    eb = ilu.collate(data["tasks"]["sst2"][0][:cfg["env_batch_size"]])
    penalty = ilu.irm_penalty(model(input_ids=eb["input_ids"], attention_mask=eb["attention_mask"]).logits, eb["labels"])
    assert e["grad_before"]["penalty"] == pytest.approx(float(penalty.detach()), rel=1e-6)
    assert e["grad_before"]["penalty"] != one["grad_before"]["penalty"]      # not GSM8K's
    assert "ILU(sst2) lambda 1/finetune/gsm8k" in other
    assert "NPO + ILU(sst2), lambda 1 (1 seed): share back" in code_study.report(tmp_path, [0])


def test_a_seed_resumes_with_other_attacks_and_sweeps(tmp_path):
    """Which attacks and sweeps run may change between invocations on one seed's folder (a folder written
    before --sweep-env existed included); a setting that changes what a stage means is refused."""
    tok, data, cfg = _micro()
    code_study.Seed(dict(cfg, unlearn_only=True), 0, model_for(tok, layers=2, seed=0), tok, data, tmp_path).run()
    path = tmp_path / "seed0" / "results.json"
    saved = json.loads(path.read_text())
    del saved["config"]["sweep_env"]                                         # as written before the flag
    path.write_text(json.dumps(saved))
    run = code_study.Seed(dict(cfg, tasks=["gsm8k"], sweep_env="sst2"), 0, model_for(tok, layers=2, seed=0), tok,
                          data, tmp_path)
    assert run.results.done("NPO/unlearned")
    with pytest.raises(ilu.ILUError, match="holds a run with different lr"):
        code_study.Seed(dict(cfg, lr=1e-3), 0, model_for(tok, layers=2, seed=0), tok, data, tmp_path)


def test_a_longer_attack_continues_the_studys_step_for_step(tmp_path):
    """--attack-steps (a lever): each task attacked longer from the same weights, stages "task@N" beside the
    study's; the lr is constant and the sampler seeded, so its first ft_steps are the study's attack's."""
    tok, data, cfg = _micro()
    code_study.Seed(cfg, 0, model_for(tok, layers=2, seed=0), tok, data, tmp_path).run()
    run = code_study.Seed(dict(cfg, tasks=["gsm8k"], attack_steps=4), 0, model_for(tok, layers=2, seed=0), tok,
                          dict(data, tasks={"gsm8k": data["tasks"]["gsm8k"]}), tmp_path)
    assert run.attack_names() == ["gsm8k@4"]
    stages = run.run()
    new = {k for k in stages if "@" in k}
    assert new == {"control/gsm8k@4", *(f"{v}/finetune/gsm8k@4" for v in code_study.VARIANTS)}
    for who in ("control", *(f"{v}/finetune" for v in code_study.VARIANTS)):
        long, short = stages[f"{who}/gsm8k@4"], stages[f"{who}/gsm8k"]
        assert [p["step"] for p in long["curve"]] == [1, 2, 3, 4]      # the study's checkpoints, then every 1
        assert long["curve"][:2] == short["curve"]                     # the same first two steps, bit for bit
        assert long["curve"][3] != short["curve"][1]
    u, pre = stages["NPO/unlearned"]["v_nll"], stages["pretrained"]["v_nll"]
    assert stages["NPO/finetune/gsm8k@4"]["share_back"][3] == pytest.approx(
        (u - stages["NPO/finetune/gsm8k@4"]["curve"][3]["v_nll"]) / (u - pre))
    text = code_study.report(tmp_path, [0])
    assert "gsm8k (ILU's environment), 4 steps" in text and "  step 4: control" in text
    # a second seed without the longer attack: it is reported on the seed that ran it, and says so
    code_study.Seed(cfg, 1, model_for(tok, layers=2, seed=0), tok, data, tmp_path).run()
    text = code_study.report(tmp_path, [0, 1])
    assert "gsm8k (ILU's environment), 4 steps (seeds [0])" in text
    assert "gsm8k (ILU's environment)\n" in text and "± " in text.split("4 steps")[0]   # the study's, over 2 seeds


def test_a_stronger_attack_runs_at_its_lr_from_the_saved_weights(tmp_path):
    """--attack-lr (a lever): each task fine-tuned at another lr from the same unlearned weights, stages "task@lrLR"
    beside the study's; with --attack-steps too, "task@N@lrLR"."""
    tok, data, cfg = _micro()
    code_study.Seed(cfg, 0, model_for(tok, layers=2, seed=0), tok, data, tmp_path).run()
    only_gsm8k = dict(data, tasks={"gsm8k": data["tasks"]["gsm8k"]})
    run = code_study.Seed(dict(cfg, tasks=["gsm8k"], attack_lr=2e-2), 0, model_for(tok, layers=2, seed=0), tok,
                          only_gsm8k, tmp_path)
    assert run.attack_names() == ["gsm8k@lr0.02"]
    stages = run.run()
    assert {k for k in stages if "@" in k} == {"control/gsm8k@lr0.02",
                                               *(f"{v}/finetune/gsm8k@lr0.02" for v in code_study.VARIANTS)}
    # by hand: NPO's saved weights fine-tuned on GSM8K at lr 0.02, V read after each step
    model, got = model_for(tok, layers=2, seed=0), []
    runlib.restore(model, torch.load(tmp_path / "seed0" / "NPO" / "unlearned.pt"))
    ilu.finetune(model, data["tasks"]["gsm8k"][0], max_steps=cfg["ft_steps"], batch_size=cfg["ft_batch"], lr=2e-2,
                 hook=lambda step, _: got.append(code_study.code_nll(model, tok, run.Vp, cfg["nll_tokens"])),
                 hook_steps=[1, 2], hook_each_epoch=False, seed=0, progress=False)
    strong, study = stages["NPO/finetune/gsm8k@lr0.02"], stages["NPO/finetune/gsm8k"]
    assert [p["v_nll"] for p in strong["curve"]] == got and [p["step"] for p in strong["curve"]] == [1, 2]
    assert strong["curve"][0]["v_nll"] != study["curve"][0]["v_nll"]           # not the study's lr
    assert "gsm8k (ILU's environment), lr 0.02\n" in code_study.report(tmp_path, [0])
    both = code_study.Seed(dict(cfg, tasks=["gsm8k"], attack_steps=3, attack_lr=2e-2), 0, model_for(tok, layers=2, seed=0),
                           tok, only_gsm8k, tmp_path)
    assert both.attack_names() == ["gsm8k@3@lr0.02"]
    assert code_study.parse_attack("gsm8k@3@lr0.02") == ("gsm8k", 3, 0.02)
    assert code_study.parse_attack("T") == ("T", None, None)
    stages = both.run()
    assert stages["NPO/finetune/gsm8k@3@lr0.02"]["curve"][:2] == strong["curve"]    # the same two steps, then one more
    assert "gsm8k (ILU's environment), 3 steps, lr 0.02" in code_study.report(tmp_path, [0])


def test_depth_sets_where_the_unlearning_stops(tmp_path):
    """--depth (a lever): both variants unlearn until V's probe NLL is depth nats above the pretrained model's,
    checked after every step; a deeper target takes more steps."""
    tok, data, cfg = _micro()
    runs = {}
    for depth in (0.05, 0.3):
        c = dict(cfg, depth=depth, max_steps=8, lr=1e-3, unlearn_only=True)      # a small lr: a step at a time
        runs[depth] = code_study.Seed(c, 0, model_for(tok, layers=2, seed=0), tok, data, tmp_path / str(depth)).run()
    for depth, stages in runs.items():
        target = stages["pretrained"]["v_nll"] + depth
        for v in code_study.VARIANTS:
            checks = stages[f"{v}/unlearned"]["stop_checks"]
            assert checks[-1]["v_nll"] >= target and all(x["v_nll"] < target for x in checks[:-1])
    assert len(runs[0.3]["NPO/unlearned"]["history"]) > len(runs[0.05]["NPO/unlearned"]["history"])
    with pytest.raises(ilu.ILUError, match="holds a run with different depth"):
        code_study.Seed(dict(cfg, depth=0.3, max_steps=8, lr=1e-3), 0, model_for(tok, layers=2, seed=0), tok, data, tmp_path / "0.05")


@pytest.mark.parametrize("flag, value, message", [
    ("--attack-steps", "0", "--attack-steps 0: the attack needs at least one step"),
    ("--attack-lr", "0", "--attack-lr 0.0: the attack's learning rate must be above 0"),
    ("--depth", "-0.5", "--depth -0.5: the unlearning must raise V's NLL, by more than 0 nats")])
def test_a_lever_out_of_range_is_one_line(tmp_path, flag, value, message):
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "code_study.py"),
                          flag, value, "--out", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and message in out.stderr
    assert "Traceback" not in out.stderr
