"""Every hub loader against its data set's published schema, without the hub (issue #30).

`datasets.load_dataset` is replaced by a fake hub that holds each data set the runners load,
with the configs, splits, column names, types and label encodings its card states (sources
below, read 2026-12). The fake refuses a repository, config or split the data set does not
have, checks that every row it is given has exactly the published columns, and records the
files a real `load_dataset` would download (every split of a config, or only the files named
by data_files). Each loader must return from those rows the same records as its local-file
path returns from the same rows written in the local format (runlib's layout).

Sources (dataset_info / configs in each card's README, and the viewer):
  cais/wmdp                    https://huggingface.co/datasets/cais/wmdp  (configs wmdp-bio/-chem/-cyber, split test;
                               answer int64, question string, choices list of string)
  cais/mmlu                    https://huggingface.co/datasets/cais/mmlu  (57 subject configs: test/validation/dev;
                               "all" adds auxiliary_train, commit c30699e; answer ClassLabel A-D, subject string)
  cais/wmdp-corpora            https://huggingface.co/datasets/cais/wmdp-corpora  (bio-retain-corpus,
                               cyber-forget-corpus, cyber-retain-corpus; split train; text)
  cais/wmdp-bio-forget-corpus  gated (access by form); WMDP's rmu/utils.py reads its "text" field, the one modelled
  muse-bench/MUSE-News, -Books https://huggingface.co/datasets/muse-bench/MUSE-News (and -Books) README on main:
                               raw (forget, retain1, retain2, holdout: text), verbmem (forget: prompt, gt), knowmem
                               (forget_qa, retain_qa, forget_qa_icl, retain_qa_icl: question, answer), privleak
                               (forget, retain, holdout: text); earlier revisions named the retain splits retain2*
  openai/gsm8k                 https://huggingface.co/datasets/openai/gsm8k  (main, socratic; train/test; question, answer)
  fancyzhx/ag_news             https://huggingface.co/datasets/fancyzhx/ag_news  (train/test; text = title + " " +
                               description; label ClassLabel World, Sports, Business, Sci/Tech)
  stanfordnlp/sst2             https://huggingface.co/datasets/stanfordnlp/sst2  (train/validation/test; idx int32,
                               sentence, label ClassLabel negative, positive; test labels -1)
  allenai/winogrande           https://huggingface.co/datasets/allenai/winogrande  (winogrande_xs..xl, debiased;
                               train/validation/test; sentence, option1, option2, answer as the string "1" or "2";
                               parquet on main since lhoestq's "Add 'winogrande_xl' config data files")
  nyu-mll/glue                 https://huggingface.co/datasets/nyu-mll/glue  (mnli: premise, hypothesis, label
                               ClassLabel entailment, neutral, contradiction, idx; train, validation_matched,
                               validation_mismatched, test_matched, test_mismatched; qqp: question1, question2,
                               label ClassLabel not_duplicate, duplicate, idx; train/validation/test)
"""
import csv
import json
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

import ilu  # noqa: E402
import runlib  # noqa: E402
from fake_hub import HUB, FakeHub  # noqa: E402

def write(root: Path, rel: str, text: str):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")


def write_csv(root: Path, rel: str, rows, delimiter=","):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE,
                   escapechar=None if delimiter == "," else "\\").writerows(rows)


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture
def hub(monkeypatch):
    def install(rows):
        fake = FakeHub(rows)
        monkeypatch.setattr(datasets, "load_dataset", fake)
        return fake
    return install


def same_both_ways(hub, tmp_path, rows, write_local, load):
    fake = hub(rows)
    from_hub = load(None)
    write_local(tmp_path)
    from_files = load(str(tmp_path))
    assert from_hub and from_hub == from_files
    return fake, from_hub


# -- WMDP and MMLU questions -------------------------------------------------------------------

QUESTIONS = [dict(answer=2, question="Which agent causes anthrax?", choices=["Variola", "Yersinia", "Bacillus", "Vibrio"]),
             dict(answer=0, question="What does a port scan find?", choices=["Open ports", "Keys", "Hashes", "Users"])]


@pytest.mark.parametrize("name", ["wmdp-bio", "wmdp-cyber", "wmdp-chem"])
def test_wmdp_questions(name, hub, tmp_path):
    _, got = same_both_ways(hub, tmp_path, {("cais/wmdp", name, "test"): QUESTIONS},
                            lambda d: write(d, f"wmdp/{name[5:]}_questions.json", json.dumps(QUESTIONS)),
                            lambda dd: runlib.load_questions(name, dd))
    assert [q["answer"] for q in got] == [2, 0] and got[0]["subject"] == runlib.WMDP[name]


def mmlu_rows(subjects):
    return [dict(question=f"{s} question {i}?", subject=s, choices=[f"{s} {i} {c}" for c in "wxyz"], answer=(i + k) % 4)
            for k, s in enumerate(subjects) for i in range(2)]


def mmlu_local(root, split, rows):
    by = {}
    for r in rows:
        by.setdefault(r["subject"], []).append([r["question"], *r["choices"], "ABCD"[r["answer"]]])
    for subject, rs in by.items():
        write_csv(root, f"mmlu/{split}/{subject}_{split}.csv", rs)


def test_mmlu_all_subjects_reads_only_the_test_split(hub, tmp_path):
    rows = mmlu_rows(["college_biology", "computer_security", "virology"])
    aux = [dict(question="aux?", subject="", choices=list("abcd"), answer=1)]
    fake, got = same_both_ways(hub, tmp_path, {("cais/mmlu", "all", "test"): rows,
                                               ("cais/mmlu", "all", "auxiliary_train"): aux},
                               lambda d: mmlu_local(d, "test", rows), lambda dd: runlib.load_questions("mmlu", dd))
    assert len(got) == 6 and got[0]["subject"] == "college biology" and [q["answer"] for q in got[:2]] == [0, 1]
    assert fake.downloaded == ["all/test-00000-of-00001.parquet"]           # not the 100k auxiliary_train questions


def test_mmlu_one_subject_validation_split(hub, tmp_path):
    rows = mmlu_rows(["virology"])
    same_both_ways(hub, tmp_path, {("cais/mmlu", "virology", "validation"): rows},
                   lambda d: mmlu_local(d, "val", rows), lambda dd: runlib.load_questions("mmlu:virology", dd, "val"))


def test_the_fake_hub_refuses_what_a_data_set_does_not_have(hub):
    hub({})
    with pytest.raises(ilu.ILUError, match=r"cannot load cais/mmlu .*Unable to find 'astrology/test-\*'"):
        runlib.load_questions("mmlu:astrology")
    with pytest.raises(ValueError, match="BuilderConfig 'wmdp-physics' not found"):
        datasets.load_dataset("cais/wmdp", "wmdp-physics", split="test")
    with pytest.raises(ValueError, match='Unknown split "train"'):
        datasets.load_dataset("cais/wmdp", "wmdp-bio", split="train")
    with pytest.raises(ValueError, match="Config name is missing"):
        datasets.load_dataset("nyu-mll/glue", split="train")
    with pytest.raises(AssertionError, match="exactly"):
        FakeHub({("cais/wmdp", "wmdp-bio", "test"): [dict(question="q", choices=list("abcd"), label=1)]})


# -- corpora -----------------------------------------------------------------------------------

TEXTS = ["The first document of the corpus, long enough to be kept by the runners' filters.",
         "A second document,\nwith a line break and \"quotes\"."]


@pytest.mark.parametrize("name", ["wmdp-bio-forget", "wmdp-bio-retain", "wmdp-cyber-forget", "wmdp-cyber-retain"])
def test_wmdp_corpora(name, hub, tmp_path):
    repo, config, split, file, _ = runlib.CORPORA[name]
    same_both_ways(hub, tmp_path, {(repo, config, split): [dict(text=t) for t in TEXTS]},
                   lambda d: write(d, file, jsonl([dict(text=t) for t in TEXTS])),
                   lambda dd: runlib.load_corpus(name, dd))


@pytest.mark.parametrize("corpus", ["news", "books"])
@pytest.mark.parametrize("part, split", [("forget", "forget"), ("retain", "retain1"), ("holdout", "holdout")])
def test_muse_raw_corpora(corpus, part, split, hub, tmp_path):
    repo = f"muse-bench/MUSE-{corpus.title()}"
    same_both_ways(hub, tmp_path, {(repo, "raw", split): [dict(text=t) for t in TEXTS]},
                   lambda d: write(d, f"muse_{corpus}/raw/{split}.json", json.dumps(TEXTS)),
                   lambda dd: runlib.load_corpus(f"muse-{corpus}-{part}", dd))


# -- MUSE evaluation sets ----------------------------------------------------------------------

@pytest.mark.parametrize("corpus", ["news", "books"])
@pytest.mark.parametrize("subset, split, local", [
    ("verbmem", "forget", "forget"),
    ("knowmem", "forget_qa", "forget_qa"), ("knowmem", "forget_qa_icl", "forget_qa_icl"),
    ("knowmem", "retain_qa", "retain2_qa"), ("knowmem", "retain_qa_icl", "retain2_qa_icl"),   # the GitHub copy's names
    ("privleak", "forget", "forget"), ("privleak", "retain", "retain2"), ("privleak", "holdout", "holdout")])
def test_muse_evaluation_sets(corpus, subset, split, local, hub, tmp_path):
    repo = f"muse-bench/MUSE-{corpus.title()}"
    cols = set(HUB[repo][subset][split])
    if cols == {"prompt", "gt"}:
        rows = [dict(prompt=f"Prompt {i}: the opening of a passage", gt=f" and its continuation {i}") for i in range(2)]
    elif cols == {"question", "answer"}:
        rows = [dict(question=f"Who said {i}?", answer=f"Person {i}") for i in range(2)]
    else:
        rows = [dict(text=t) for t in TEXTS]
    on_disk = [r["text"] for r in rows] if cols == {"text"} else rows
    _, got = same_both_ways(hub, tmp_path, {(repo, subset, split): rows},
                            lambda d: write(d, f"muse_{corpus}/{subset}/{local}.json", json.dumps(on_disk)),
                            lambda dd: runlib.load_muse(subset, split, corpus, dd))
    assert got == on_disk


# -- downstream tasks --------------------------------------------------------------------------

def gsm8k(root, split, rows):
    write(root, f"gsm8k/{split}.jsonl", jsonl(rows))


TASK_CASES = {  # task: (hub rows per split, writer of the local files from the same rows)
    "gsm8k": ({s: [dict(question=f"Tom has {i} apples and buys 2. How many?", answer=f"{i} + 2 = <<{i}+2={i + 2}>>{i + 2}"
                                                                                       f"\n#### {i + 2}") for i in range(3)]
               for s in ("train", "test")},
              lambda root, rows: [write(root, f"gsm8k/{s}.jsonl", jsonl(rs)) for s, rs in rows.items()]),
    "agnews": ({s: [dict(text=f"Title {i} Description {i}, with a comma", label=i % 4) for i in range(4)]
                for s in ("train", "test")},
               lambda root, rows: [write_csv(root, f"ag_news/{s}.csv",
                                             [[str(r["label"] + 1), r["text"].split(" Description")[0],
                                               "Description" + r["text"].split(" Description")[1]] for r in rs])
                                   for s, rs in rows.items()]),
    "sst2": ({"train": [dict(idx=i, sentence=f"a {w} film ", label=i % 2) for i, w in enumerate(["dull", "fine"])],
              "validation": [dict(idx=i, sentence=f"it 's {w} . ", label=1 - i % 2) for i, w in enumerate(["great", "bad"])]},
             lambda root, rows: [write(root, f"sst2/stsa.binary.{'train' if s == 'train' else 'dev'}",
                                       "".join(f"{r['label']} {r['sentence'].strip()}\n" for r in rs))
                                 for s, rs in rows.items()]),
    "winogrande": ({s: [dict(sentence=f"The cup did not fit in the bag because _ was too big {i}.", option1="cup",
                             option2="bag", answer=str(1 + i % 2)) for i in range(3)] for s in ("train", "validation")},
                   lambda root, rows: [write(root, f"winogrande/{'train_xl' if s == 'train' else 'dev'}.jsonl",
                                             jsonl([dict(qID=f"q{i}", **r) for i, r in enumerate(rs)]))
                                       for s, rs in rows.items()]),
    "mnli": ({s: [dict(premise=f"A man plays {i}.", hypothesis=f"Someone plays {i}.", label=i % 3, idx=i)
                  for i in range(3)] for s in ("train", "validation_matched")},
             lambda root, rows: [write_csv(root, f"mnli/{'train' if s == 'train' else 'dev_matched'}.tsv",
                                           [["index", "genre", "sentence1", "sentence2", "gold_label"]]
                                           + [[r["idx"], "fiction", r["premise"], r["hypothesis"],
                                               runlib.MNLI_LABELS[r["label"]]] for r in rs], delimiter="\t")
                                 for s, rs in rows.items()]),
    "qqp": ({s: [dict(question1=f"How do I learn {i}?", question2=f"What is the way to learn {i}?", label=i % 2, idx=i)
                 for i in range(2)] for s in ("train", "validation")},
            lambda root, rows: [write_csv(root, f"qqp/{'train' if s == 'train' else 'dev'}.tsv",
                                          [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]]
                                          + [[r["idx"], 2 * r["idx"], 2 * r["idx"] + 1, r["question1"], r["question2"],
                                              r["label"]] for r in rs], delimiter="\t")
                                for s, rs in rows.items()]),
}


@pytest.mark.parametrize("task", list(TASK_CASES))
@pytest.mark.parametrize("split", ["train", "test"])
def test_tasks(task, split, hub, tmp_path):
    (repo, config, hub_splits), _ = runlib.TASKS[task]
    rows, writer = TASK_CASES[task]
    _, got = same_both_ways(hub, tmp_path, {(repo, config, s): rs for s, rs in rows.items()},
                            lambda d: writer(d, rows), lambda dd: runlib.load_task(task, split, dd))
    assert hub_splits[split] in rows and len(got) == len(rows[hub_splits[split]])
    if task != "gsm8k":                  # the label names the right choice, as the hub's ClassLabel int says
        assert [r["label"] for r in got] == [int(r.get("answer", 0)) - 1 if task == "winogrande" else r["label"]
                                             for r in rows[hub_splits[split]]]
