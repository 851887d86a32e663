"""run_muse.py --relearn (the paper's Table 3 attack for MUSE): the split, the attack set, the share back,
the never-saw control, the stop rule, and a micro run end to end."""
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import ilu
import muse_relearn
import run_muse
import runlib
from conftest import DATA, ROOT, needs_data, run_script, tiny_llama, token_pairs, token_texts

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import real_study  # noqa: E402
from test_real_study import metrics  # noqa: E402


def distinct(n):
    """n passages that share no run of words."""
    return [dict(prompt=" ".join(f"p{i}.{k}" for k in range(12)), gt=" " + " ".join(f"g{i}.{k}" for k in range(12)))
            for i in range(n)]


@pytest.mark.parametrize("n, share, seed", [(16, 0.5, 0), (16, 0.5, 1), (15, 0.5, 2), (100, 0.25, 0), (2, 0.5, 0)])
def test_halves_are_disjoint_and_cover_the_passages(n, share, seed):
    attack, held = muse_relearn.relearn_split(distinct(n), share, seed)
    assert set(attack).isdisjoint(held) and sorted(attack + held) == list(range(n))
    assert len(attack) == round(share * n) and held
    assert muse_relearn.relearn_split(distinct(n), share, seed) == (attack, held)   # the seed decides it


def test_the_seed_changes_the_split_and_an_empty_half_is_refused():
    assert muse_relearn.relearn_split(distinct(16), 0.5, 0) != muse_relearn.relearn_split(distinct(16), 0.5, 1)
    with pytest.raises(ilu.ILUError, match="leaves a half of the 3 forget passages empty"):   # runner: exit 2
        muse_relearn.relearn_split(distinct(3), 0.1, 0)                          # round(0.3) = 0 attack passages


def test_passages_that_share_text_stay_in_one_half():
    words = [f"w{i}" for i in range(90)]
    p = distinct(8) + [dict(prompt=" ".join(words[:20]), gt=" " + " ".join(words[20:35])),    # 8 and 9: one
                       dict(prompt=" ".join(words[28:40]), gt=" " + " ".join(words[40:60]))]  # article, overlapping
    for seed in range(6):
        attack, held = muse_relearn.relearn_split(p, 0.5, seed)
        assert sorted(attack + held) == list(range(10)) and len(attack) == 5
        assert (8 in attack) == (9 in attack)


def test_a_text_holding_a_held_out_passage_never_joins_the_attack():
    p = [dict(prompt=f"prompt {i} " + "x" * 120 + f" end of prompt {i}", gt=f" truth {i} " + "y" * 120)
         for i in range(4)]
    docs = [p[0]["prompt"] + p[0]["gt"],                                     # attack passage alone
            "intro. " + p[1]["prompt"] + p[1]["gt"],                         # held-out passage alone
            p[2]["prompt"] + p[2]["gt"] + "\n\n" + p[1]["prompt"][-200:],    # attack + the end of a held-out prompt
            "news in the same style, no passage",
            "Question: who?\nAnswer: nobody"]
    assert muse_relearn.attack_texts(docs, p, attack=[0, 2], held=[1, 3]) == [docs[0]]
    assert muse_relearn.attack_texts(docs, p, attack=[0, 1, 2], held=[3]) == docs[:3]
    # two cuts of one article: the first's continuation runs into the second's prompt
    words = [f"w{i}" for i in range(60)]
    cut = [dict(prompt=" ".join(words[:20]), gt=" " + " ".join(words[20:35])),
           dict(prompt=" ".join(words[25:40]), gt=" " + " ".join(words[40:60]))]
    text = [c["prompt"] + c["gt"] for c in cut]
    assert muse_relearn.attack_texts(text, cut, attack=[1], held=[0]) == []
    assert muse_relearn.attack_texts(text + ["w1 w2"], cut, attack=[0, 1], held=[]) == text


def small_config(extra=()):
    argv = ["--small", "--data-dir", DATA, "--method", "npo", "--ilu-env", "none", "--relearn", *extra]
    cfg = runlib.parse_config(run_muse.Config, argv)
    return runlib.resolve(cfg, run_muse.SMALL)


@needs_data
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_small_attack_set_holds_no_held_out_passage(seed):
    cfg = small_config(["--seed", str(seed)])
    d = run_muse.scaled_sets(cfg)
    tok = runlib.train_tokenizer([], merges=False)
    rl = muse_relearn.relearn_sets(cfg, tok, d["ev"], d["forget"])
    assert len(rl["held"]) == len(rl["attack"]) == 8 and rl["attack_texts"]
    # the attack set: the attack half's passages as the target learned them; two cuts of one article stay
    # together (passages 1 and 12 repeat a paragraph, 8 runs into 9)
    assert rl["attack_texts"] == [d["passages"][i] for i in rl["split"]["attack"]]
    assert (1 in rl["split"]["attack"]) == (12 in rl["split"]["attack"])
    assert (8 in rl["split"]["attack"]) == (9 in rl["split"]["attack"])
    for r in rl["held"]:           # an independent check: no 40 characters of a held-out passage are trained
        text = r["prompt"] + r["gt"]
        assert not any(text[i:i + 40] in t for i in range(0, len(text) - 40, 10) for t in rl["attack_texts"])
    assert not any(qa in rl["attack_texts"] for qa in d["forget_qa"])


@needs_data
def test_the_full_scale_attack_documents_hold_no_held_out_passage():
    cfg = runlib.parse_config(run_muse.Config, ["--data-dir", DATA, "--relearn"])
    ev = run_muse.load_eval(cfg)
    docs = json.loads(open(f"{DATA}/muse_news/raw/forget.json").read())
    attack, held = muse_relearn.relearn_split(ev["verbmem"], 0.5, 0)
    texts = muse_relearn.attack_texts(docs, ev["verbmem"], attack, held)
    assert 40 < len(texts) < 100                      # the documents the attack half was cut from (seed 0: 71)
    for i in held:                                                     # characters, not word runs
        gt = ev["verbmem"][i]["gt"]
        assert not any(gt[j:j + 40] in t for j in range(0, len(gt) - 40, 10) for t in texts), i
    covered = [i for i in attack if any(ev["verbmem"][i]["gt"][:60] in t for t in texts)]
    assert len(covered) >= 0.7 * len(attack)                            # seed 0: 43 of 50
    # a BPE of the passages: one character a token would put every ~4,000-character prompt past max_length
    # 2,048, and encode_pairs refuses pairs whose every answer is cut away (#36)
    tok = runlib.train_tokenizer([p["prompt"] + p["gt"] for p in ev["verbmem"]], vocab_size=2048)
    rl = muse_relearn.relearn_sets(cfg, tok, ev, docs)
    assert len(rl["attack_texts"]) == 60 and set(rl["attack_texts"]) <= set(texts)   # Table 3's 60 samples
    assert len(rl["nll_held"]) == len(held) and len(rl["nll_attack"]) == len(attack)  # every passage encoded


@needs_data
def test_a_leak_stops_the_run(monkeypatch):
    cfg = small_config()
    d = run_muse.scaled_sets(cfg)
    tok = runlib.train_tokenizer([], merges=False)
    monkeypatch.setattr(muse_relearn, "attack_texts", lambda texts, passages, attack, held: texts[:len(passages)])
    with pytest.raises(ilu.ILUError, match="attack set holds held-out passage"):   # the runner: one line, exit 2
        muse_relearn.relearn_sets(cfg, tok, d["ev"], d["forget"])


@needs_data
def test_holdout_texts_are_news_the_target_never_read():
    """--relearn-on holdout and the ILU environment "news": MUSE holdout texts past PrivLeak's, cut as the
    passages are, the two sets disjoint and none of them a forget, retain or PrivLeak text."""
    cfg = small_config(["--relearn-on", "holdout"])
    d = run_muse.scaled_sets(cfg)
    attack, env = muse_relearn.holdout_pool(cfg, d["ev"])
    assert len(attack) == len(env) == 42 and not set(attack) & set(env)
    assert all(len(t) <= cfg.tiny_prompt_chars + cfg.tiny_gt_chars for t in attack + env)
    seen = set(d["forget"]) | set(d["retain"]) | set(d["ev"]["privleak_holdout"])
    assert not any(t[200:300] in u for t in attack + env for u in seen)   # (the start can be boilerplate)
    rl = muse_relearn.relearn_sets(cfg, runlib.train_tokenizer([], merges=False), d["ev"], d["forget"])
    assert rl["attack_texts"] == attack[:len(rl["split"]["attack"])]


def test_a_text_environment_trains_every_token():
    tok = runlib.train_tokenizer([], merges=False)
    cfg = runlib.parse_config(run_muse.Config, ["--ilu-env", "news", "--max-length", "16"])
    envs = runlib.env_data(tok, cfg, {"news": ["Some news of the day.", "More news"]})
    assert list(envs) == ["news"] and len(envs["news"]) == 2
    assert all(e["labels"] == e["input_ids"] and len(e["input_ids"]) <= 16 for e in envs["news"])


def test_share_back_by_hand():
    assert muse_relearn.share_back(88.0, 20.0, 29.0) == pytest.approx(9 / 68)     # a third of the way is 42.7
    assert muse_relearn.share_back(88.0, 20.0, 20.0) == 0.0
    assert muse_relearn.share_back(45.0, 20.0, 15.0) == pytest.approx(-0.2)
    assert muse_relearn.share_back(30.0, 30.0, 35.0) == 0.0                         # nothing was forgotten


def test_checkpoints_are_the_quartiles():
    assert runlib.relearn_points(40) == [10, 20, 30, 40]
    assert runlib.relearn_points(2) == [1, 2]


def test_one_relearning_attack_for_both_runners(capsys):
    """runlib.relearning_attack: --relearn-steps, else --relearn-epochs over ceil(n / batch) batches; measure()
    before the attack and at its quartiles; the same as ilu.finetune run alone. Both runners take its flags
    from the common config, with the same defaults."""
    import run_wmdp

    model, data = tiny_llama(), token_pairs(10, seed=1)
    cfg = runlib.CommonConfig(relearn_batch=4, relearn_epochs=2.0, relearn_lr=1e-3, low_memory="")
    state, calls = ilu.state_of(model), []

    def measure():
        calls.append(0)
        return dict(n=len(calls))

    out = runlib.relearning_attack(model, data, cfg, measure, "rl", lambda e: f"n {e['n']}")
    assert out["steps"] == 6                                   # 2 epochs x ceil(10 / 4); quartiles 1.5, 3, 4.5, 6 rounded half to even
    assert [p["step"] for p in out["curve"]] == [0, 2, 3, 4, 6] and [p["n"] for p in out["curve"]] == [1, 2, 3, 4, 5]
    assert "rl, step 0: n 1" in capsys.readouterr().out
    attacked = ilu.state_of(model)
    runlib.restore(model, state)
    losses = ilu.finetune(model, data, max_steps=6, batch_size=4, lr=1e-3, hook_each_epoch=False, progress=False)
    assert (out["loss_first"], out["loss_last"]) == (losses[0], losses[-1])
    assert all(torch.equal(attacked[k], v) for k, v in ilu.state_of(model).items())
    cfg.relearn_steps = 3
    assert runlib.relearning_attack(model, data, cfg, dict, "rl", str)["steps"] == 3
    for name in ("relearn", "relearn_samples", "relearn_steps", "relearn_epochs", "relearn_batch", "relearn_lr"):
        assert getattr(run_wmdp.Config(), name) == getattr(run_muse.Config(), name) == getattr(runlib.CommonConfig(), name)


def test_unlearn_stops_where_the_callers_rule_says():
    model, forget, retain = tiny_llama(layers=2), token_texts(8, 3, 50, 10, 0), token_texts(8, 50, 97, 10, 1)
    args = dict(steps=5, batch_size=2, grad_accum=1, lr=1e-3, progress=False)
    seen = []

    def stop(step):
        seen.append((step, model.training))
        return step == 3

    full = ilu.unlearn(copy.deepcopy(model), forget, retain, "npo", **args)
    hist = ilu.unlearn(model, forget, retain, "npo", stop=stop, **args)
    assert seen == [(1, False), (2, False), (3, False)]                # after each step, in eval mode
    assert [h["forget"] for h in hist] == [h["forget"] for h in full[:3]]  # the same steps, then it ends
    with_envs = ilu.unlearn(tiny_llama(layers=2), forget, retain, "npo", envs={"e": token_pairs(8, 2)},
                            stop=lambda step: True, env_batch_size=4, **args)
    assert len(with_envs) == 1


@pytest.mark.parametrize("readings, tolerance, kept", [
    ([50.0, 40.0, 27.0], 0, 3), ([50.0, 32.0, 10.0], 0, 2), ([29.0], 0, 1),
    ([50.0, 32.5, 31.0], 2, 3), ([50.0, 32.5, 31.5, 20.0], 1, 3), ([40.0, 31.0], 2, 2)])
def test_the_stop_rule_ends_on_the_step_nearer_the_threshold(monkeypatch, readings, tolerance, kept):
    """--stop-verbmem 30: the first step at or below 30 (+ --stop-tolerance) ends unlearning, on it or on the step
    before, whichever reading is nearer 30; going back restores the weights the step before left."""
    model = tiny_llama(layers=1)
    cfg = runlib.parse_config(run_muse.Config, ["--relearn", "--stop-verbmem", "30", "--stop-tolerance", str(tolerance)])
    it = iter(readings)
    monkeypatch.setattr(ilu, "verbmem", lambda *a, **k: next(it))
    stop = muse_relearn.HeldOutStop(model, None, {"held": []}, cfg)
    for step in range(1, len(readings) + 1):
        with torch.no_grad():
            model.lm_head.weight.fill_(float(step))                     # "step" leaves its mark on the weights
        if stop(step):
            break
    assert step == len(readings)                                        # it ends at the first reading <= 30
    assert [c["step"] for c in stop.checks if c.get("kept")] == [kept]
    assert model.lm_head.weight.unique().tolist() == [float(kept)]


def test_the_tiny_never_saw_control_learns_no_forget_text(monkeypatch, tmp_path):
    """--tiny's second control is the tiny recipe without the forget passages and QA, read with the target's
    tokenizer; it is a different model from the target."""
    if not __import__("os").path.isdir(DATA):
        pytest.skip("real data files not found")
    trained = []
    real = runlib.tiny_target

    def spy(texts, **kw):
        trained.append((list(texts), kw.get("tokenizer")))
        return real(texts, **dict(kw, steps=2, hidden=16, layers=1))

    monkeypatch.setattr(runlib, "tiny_target", spy)
    argv = ["--tiny", "--data-dir", DATA, "--relearn", "--tiny-passages", "4", "--tiny-general", "8",
            "--finetune-on", "sst2", "--ilu-env", "none", "--cache-dir", str(tmp_path)]
    cfg = runlib.resolve(runlib.parse_config(run_muse.Config, argv), run_muse.TINY)
    model, tok, ev, forget, retain = run_muse.setup_tiny(cfg, ["sst2"])
    (target_texts, target_tok), (never_texts, never_tok) = trained
    assert target_tok is None and never_tok is not None
    assert never_tok.get_vocab() == tok.get_vocab()                     # the target's tokenizer
    assert all(t in target_texts for t in forget)                       # the target learned every forget text
    assert not any(t in never_texts for t in forget)                    # the control none of them
    assert set(retain) <= set(never_texts)
    folder = run_muse.never_saw_folder(cfg, ev)
    saved = runlib.SavedState(folder, ilu.state_of(model), model)
    assert not torch.equal(saved["model.embed_tokens.weight"], model.model.embed_tokens.weight)


@needs_data
def test_small_never_saw_is_the_pretrained_model_not_the_target(tmp_path):
    base = tmp_path / "smollm2-135m"
    base.mkdir()
    (base / "source.json").write_text("{}")
    cfg = small_config(["--cache-dir", str(tmp_path)])
    assert run_muse.never_saw_folder(cfg, {}) == str(base)
    cfg.never_saw = str(tmp_path)                                        # an explicit folder wins
    assert run_muse.never_saw_folder(cfg, {}) == str(tmp_path)


MICRO = ["--tiny", "--tiny-passages", "4", "--tiny-steps", "6", "--tiny-hidden", "32", "--tiny-layers", "2",
         "--tiny-general", "20", "--steps", "3", "--env-batch-size", "4", "--verbmem-tokens", "8",
         "--knowmem-tokens", "4", "--relearn", "--relearn-steps", "4"]


@needs_data
def test_relearn_at_tiny_end_to_end_with_borrowed_controls(tmp_path):
    npo, ilu_run = tmp_path / "npo", tmp_path / "npo-ilu"
    r = run_script("run_muse.py", ["--method", "npo", "--ilu-env", "none", "--data-dir", DATA, "--out", str(npo),
                                   *MICRO, "--stop-verbmem", "100"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((npo / "results.json").read_text())
    st = res["stages"]
    assert set(st) == {"original", "unlearn", "unlearned", "relearn/unlearned", "relearn/original",
                       "relearn/never_saw"}                               # no other fine-tuning with --relearn
    checks = st["unlearn"]["stop_checks"]
    assert [c["step"] for c in checks] == [1] and checks[0]["kept"] and len(st["unlearn"]["history"]) == 1
    for who in ("unlearned", "original", "never_saw"):
        e = st[f"relearn/{who}"]
        assert [p["step"] for p in e["curve"]] == [0, 1, 2, 3, 4] and e["split"] == {"attack": [0, 2], "held": [1, 3]}
        assert e["attack_texts"] == 2 and 0 <= e["curve"][-1]["verbmem_held"] <= 100
    assert st["relearn/original"]["curve"][0]["forget_nll_held"] < st["relearn/never_saw"]["curve"][0]["forget_nll_held"]
    g = st["relearn/unlearned"]["geometry"]
    assert -1 <= g["cos_back"] <= 1 and g["norm_u"] > 0 and g["norm_rl"] > 0
    md = (npo / "results.md").read_text()
    for row in ("| Target (control) |", "| Never saw the passages (control) |", "| NPO |", "| NPO: share back |"):
        assert row in md
    assert "fine-tuned on the attack half (2 passages), read on the held-out half (2 passages)" in md

    r = run_script("run_muse.py", ["--method", "npo", "--ilu-env", "gsm8k", "--data-dir", DATA, "--out",
                                   str(ilu_run), *MICRO, "--control-from", str(npo)], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    st2 = json.loads((ilu_run / "results.json").read_text())["stages"]
    assert st2["relearn/never_saw"]["borrowed_from"] == str(npo) and "borrowed_from" not in st2["relearn/unlearned"]
    assert st2["relearn/original"]["curve"] == st["relearn/original"]["curve"]
    assert len(st2["unlearn"]["history"]) == 3 and "stop_checks" not in st2["unlearn"]

    again = run_script("run_muse.py", ["--method", "npo", "--ilu-env", "none", "--data-dir", DATA, "--out",
                                       str(npo), *MICRO, "--stop-verbmem", "100"], tmp_path)
    assert again.returncode == 0 and "resuming" in again.stdout
    assert json.loads((npo / "results.json").read_text())["stages"] == st   # nothing recomputed


@pytest.mark.parametrize("args, message", [
    (["--stop-verbmem", "20"], "--stop-verbmem reads the held-out half of --relearn's split: add --relearn"),
    (["--relearn", "--relearn-on", "wiki"], "unknown --relearn-on 'wiki'"),
    (["--relearn", "--relearn-share", "1.5"], "--relearn-share must be between 0 and 1"),
    (["--ilu-env", "news"], "--ilu-env news is cut from the MUSE holdout texts that PrivLeak reads at full scale"),
    (["--ilu-env", "wiki"], "unknown ILU environment 'wiki': use none or tasks among gsm8k"),
])
def test_bad_relearn_options_one_line_exit_2(args, message, tmp_path):
    r = run_script("run_muse.py", [*args, "--out", str(tmp_path / "run")], tmp_path, timeout=120)
    assert r.returncode == 2 and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def relearn_run(path, target, never, unlearned, matched_stop=3):
    """A hand-built --relearn run: held-out VerbMem along the attack (steps 0, 20, 40) of each model."""
    def curve(held):
        return [dict(step=s, verbmem_held=v, verbmem_attack=v + 10, forget_nll_held=1.0, forget_nll_attack=0.5,
                     knowmem_forget=20.0) for s, v in zip((0, 20, 40), held)]

    split = dict(attack=[0, 2], held=[1, 3])
    unlearn = dict(history=[{}] * (matched_stop + 1), stop_checks=[dict(step=matched_stop, kept=True),
                                                                  dict(step=matched_stop + 1)])
    st = {"original": metrics(90.0), "unlearn": unlearn, "unlearned": metrics(unlearned[0]),
          "relearn/original": dict(curve=curve(target), split=split),
          "relearn/never_saw": dict(curve=curve(never), split=split),
          "relearn/unlearned": dict(curve=curve(unlearned), split=split,
                                    geometry=dict(cos_back=-0.3, norm_u=2.0, norm_rl=1.0))}
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"config": {}, "stages": st, "summary": {"x": 1}}))


def test_relearn_tables_and_criterion_by_hand(tmp_path):
    out = tmp_path / "study"
    # NPO: target 80 -> 80, 78; never-saw 15 -> 16, 17; unlearned 30 -> 45, 50 (seed 0) and 20 -> 40, 44 (seed 1)
    for seed, (u, ilu_after) in enumerate([((30.0, 45.0, 50.0), 33.0), ((20.0, 40.0, 44.0), 22.0)]):
        relearn_run(real_study.folder(out, "relearn", "NPO", seed), (80.0, 80.0, 78.0), (15.0, 16.0, 17.0), u)
        relearn_run(real_study.folder(out, "relearn", "NPO + ILU(GSM8K)", seed), (80.0, 80.0, 78.0),
                    (15.0, 16.0, 17.0), (u[0] + 1, u[0] + 2, ilu_after), matched_stop=5)
    runs = real_study.load(out, "relearn", [0, 1])
    text = real_study.tables("relearn", runs, [0, 1])
    assert "| Target (control) | 80.0 ± 0.0 | 80.0 ± 0.0 | 78.0 ± 0.0 |" in text
    assert "| Never saw the passages (control) | 15.0 ± 0.0 | 16.0 ± 0.0 | 17.0 ± 0.0 |" in text
    assert "| NPO | 25.0 ± 7.1 | 42.5 ± 3.5 | 47.0 ± 4.2 |" in text          # mean, sample std of (30, 20) ...
    # share back at step 20: (45 - 30) / (80 - 30) = 0.3 and (40 - 20) / (80 - 20) = 0.333; at step 40: 0.4, 0.4
    assert "| NPO | 0.00 ± 0.00 | 0.32 ± 0.02 | 0.40 ± 0.00 |" in text
    # ILU, step 40: (33 - 31) / 49 = 0.0408, (22 - 21) / 59 = 0.0169 -> mean 0.0289
    v = real_study.relearn_verdict(runs["NPO + ILU(GSM8K)"])
    assert v["share"] == pytest.approx((2 / 49 + 1 / 59) / 2) and not v["relearns"]
    r = real_study.relearn_verdict(runs["NPO"])
    # gains 20 and 24: mean 22 > 2 x 2.83 and > the never-saw control's +2; target keeps 78/80 = 97.5%
    assert r["gain"] == 22.0 and r["spread"] == pytest.approx(2 ** 1.5) and r["never_saw_gain"] == 2.0
    assert r["target_kept"] == pytest.approx(0.975) and r["relearns"]
    assert "| NPO | 40 | +0.40 | +22.0 ± 2.8 | +2.0 | 98% | yes |" in text
    assert "| NPO | 20 | +0.32 | +17.5 ± 3.5 | +1.0 | 100% | no |" in text    # a third not reached at step 20
    assert real_study.relearn_verdict(runs["NPO"], 1)["share"] == pytest.approx((0.3 + 1 / 3) / 2)
    assert "| NPO + ILU(GSM8K) | 5.0 ± 0.0 | 1.0 ± 0.0 |" in text          # steps to the stop, |Δ held-out VerbMem|
    assert "2 passages attack, 2 are held out" in text
    # the ILU run's stop rule: within 2 points of the depth NPO reached on the same seed (seed 0: 30)
    assert real_study.matched_stop(real_study.folder(out, "relearn", "NPO", 0)) == [
        "--stop-verbmem", "30.0", "--stop-tolerance", "2"]
    # --save-reference adds the runs to a reference that holds others (the base recipe's)
    ref = tmp_path / "reference.json"
    ref.write_text(json.dumps({"base/npo-s0": {"original": {"verbmem": 87.7}}}))
    r = subprocess.run([sys.executable, "benchmarks/real_study.py", "--out", str(out), "--recipes", "relearn",
                        "--seeds", "0", "1", "--report", "--save-reference", str(ref)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(json.loads(ref.read_text())) == ["base/npo-s0", "relearn/npo-ilu-s0", "relearn/npo-ilu-s1",
                                                   "relearn/npo-s0", "relearn/npo-s1"]
    # a never-saw control that gains as much as NPO: learning the attack half itself, not relearning
    out2 = tmp_path / "study2"
    for seed, u in enumerate([(30.0, 45.0, 50.0), (20.0, 40.0, 44.0)]):
        relearn_run(real_study.folder(out2, "relearn", "NPO", seed), (80.0, 80.0, 78.0), (15.0, 30.0, 40.0), u)
    assert not real_study.relearn_verdict(real_study.load(out2, "relearn", [0, 1])["NPO"])["relearns"]


def test_relearn_gap_paired_by_seed_by_hand(tmp_path):
    """NPO's share back minus ILU's, paired by seed, and the rule that says ILU holds relearning back."""
    out = tmp_path / "study"
    # target 80 at step 0; NPO 30 -> 45, 50 and 20 -> 40, 44; ILU 31 -> 32, 33 and 21 -> 22, 26 (seeds 0, 1)
    for seed, (u, ilu_after) in enumerate([((30.0, 45.0, 50.0), 33.0), ((20.0, 40.0, 44.0), 26.0)]):
        relearn_run(real_study.folder(out, "relearn", "NPO", seed), (80.0, 80.0, 78.0), (15.0, 16.0, 17.0), u)
        relearn_run(real_study.folder(out, "relearn", "NPO + ILU(GSM8K)", seed), (80.0, 80.0, 78.0),
                    (15.0, 16.0, 17.0), (u[0] + 1, u[0] + 2, ilu_after))
    runs = real_study.load(out, "relearn", [0, 1])
    # step 20: 15/50 - 1/49 = 0.2796 and 20/60 - 1/59 = 0.3164 (mean 0.298, std 0.026): held back
    g = real_study.ilu_gap(runs["NPO"], runs["NPO + ILU(GSM8K)"], 1)
    assert g["gaps"] == pytest.approx([0.3 - 1 / 49, 1 / 3 - 1 / 59]) and g["lower"] == 2 and g["holds"]
    # step 40: 20/50 - 2/49 = 0.359 and 24/60 - 5/59 = 0.315 (mean 0.337, std 0.031)
    text = real_study.tables("relearn", runs, [0, 1])
    assert "| NPO + ILU(GSM8K) | 40 | +0.36 +0.32 | +0.34 ± 0.03 | 2 of 2 | yes |" in text
    assert real_study.ilu_gap(runs["NPO + ILU(GSM8K)"], runs["NPO"], 1)["lower"] == 0      # the other way round
    g = real_study.ilu_gap(runs["NPO"], runs["NPO"], 2)                 # no gap is no holding back
    assert g["gap"] == 0.0 and g["lower"] == 0 and not g["holds"]
    # a positive mean within twice its spread is not holding back: gaps +0.30 and -0.10
    mixed = [dict(s, **{"relearn/unlearned": dict(curve=[dict(verbmem_held=v) for v in c])})
             for s, c in zip(runs["NPO"], [(30.0, 45.0, 50.0), (20.0, 40.0, 44.0)])]
    other = [dict(s, **{"relearn/unlearned": dict(curve=[dict(verbmem_held=v) for v in c])})
             for s, c in zip(runs["NPO"], [(30.0, 30.0, 30.0), (20.0, 46.0, 50.0)])]
    g = real_study.ilu_gap(mixed, other, 1)
    assert g["gaps"] == pytest.approx([0.3, 1 / 3 - 26 / 60]) and g["gap"] > 0 and not g["holds"]
    # too few seeds run for one method: the paired table is left out, not paired wrongly
    shutil.rmtree(real_study.folder(out, "relearn", "NPO + ILU(GSM8K)", 1))
    assert "paired by seed" not in real_study.tables("relearn", real_study.load(out, "relearn", [0, 1]), [0, 1])


def test_relearn_check_against_the_seeds_spread(tmp_path):
    """real_study.py --check: a rerun's relearning figures judged against the reference seeds' spread (within
    their range, within the 95% prediction interval of one more seed, or outside), the tutorial tables' rule."""
    ref_out, ref = tmp_path / "reference", tmp_path / "reference.json"
    # NPO's unlearned held-out VerbMem at step 0 over seeds 0-2: 30, 20, 25 (mean 25, sd 5): the 95% prediction
    # interval for one more seed is 25 ± t(0.975, 2) · 5 · sqrt(1 + 1/3) = 25 ± 4.303 · 5.7735 = 25 ± 24.84
    for seed, u in enumerate([30.0, 20.0, 25.0]):
        for variant in real_study.VARIANTS:
            relearn_run(real_study.folder(ref_out, "relearn", variant, seed), (80.0, 80.0, 78.0), (15.0, 16.0, 17.0),
                        (u, u + 10, u + 15))
    ref.write_text(json.dumps(real_study.collect(ref_out)))

    def check(npo_held_0=30.0, target=(80.0, 80.0, 78.0), never=(15.0, 16.0, 17.0)):
        out = tmp_path / f"rerun-{npo_held_0}-{target[0]}"
        relearn_run(real_study.folder(out, "relearn", "NPO", 0), target, never, (npo_held_0, 40.0, 45.0))
        relearn_run(real_study.folder(out, "relearn", "NPO + ILU(GSM8K)", 0), target, never, (30.0, 40.0, 45.0))
        r = subprocess.run([sys.executable, "benchmarks/real_study.py", "--out", str(out), "--recipes", "relearn",
                            "--seeds", "0", "--report", "--check", str(ref)], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        return r, (out / "check.md").read_text()

    r, table = check()                                        # seed 0 again, the same bits: every figure identical
    assert r.returncode == 0, r.stderr
    assert "74 figures checked against the reference's seeds 0, 1, 2: 74 in range, 0 in the 95% prediction" in r.stdout
    assert "PASS. 74 of 74 are identical to the reference's run of the same seed (this machine" in r.stdout
    # and the published tables with the rerun's seed 0 beside the reference's seeds 1 and 2
    mixed = table.split("## The tables with this rerun's seeds in place of the reference's")[1]
    assert "seeds 0, 1, 2 (NPO: 3 finished, NPO + ILU(GSM8K): 3 finished)" in mixed
    assert "| NPO | 25.0 ± 5.0 | 35.0 ± 5.0 | 40.0 ± 5.0 |" in mixed
    r, table = check(npo_held_0=49.0)                          # 49 is within 25 ± 24.84: in the interval, not the range
    assert r.returncode == 0 and "| relearn | NPO | verbmem_held step 0 | 0 | 49.00 |" in table
    assert "| NPO | 31.3 ± 15.5 | 35.0 ± 5.0 | 40.0 ± 5.0 |" in table     # (49 + 20 + 25) / 3 at step 0
    assert "| 0.16–49.84 | in 95% PI |" in table
    r, table = check(npo_held_0=51.0)                          # 51 is outside it; one figure alone still passes
    assert r.returncode == 0 and "| 51.00 | 25.00 ± 5.00 (20.00–30.00) | 0.16–49.84 | OUTSIDE |" in table
    # both controls 15 and 20 points higher: their VerbMem on both halves at three steps, where every reference
    # seed has the same (sd 0), 12 outside, more than chance explains among 74 (7); the shares back, which the
    # target's VerbMem enters, move within their seeds' spread
    r, table = check(target=(95.0, 95.0, 93.0), never=(35.0, 36.0, 37.0))
    assert r.returncode == 1 and "12 outside (chance alone puts up to 7 of 74 outside, 95% of the time): FAIL." in r.stdout


@pytest.mark.parametrize("flag", ["--check", "--same-bits", "--compare"])
def test_real_study_missing_reference_one_line_exit_2(flag, tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/real_study.py", "--report", "--out", str(tmp_path), flag,
                        str(tmp_path / "nothing.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"{flag} {tmp_path / 'nothing.json'}: no such file or folder" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
