"""Loaders: real files give the row counts of ../shared/data/SOURCES.md; synthetic files of
each published format parse as expected; bad paths and names give one clear line."""
import json

import pytest

import ilu
import runlib
from conftest import DATA, needs_data


@needs_data
@pytest.mark.parametrize("name, rows", [("wmdp-bio", 1273), ("wmdp-cyber", 1987), ("wmdp-chem", 408),
                                        ("mmlu", 1124), ("mmlu:virology", 166), ("mmlu:high_school_biology", 310)])
def test_questions_real_row_counts(name, rows):
    qs = runlib.load_questions(name, DATA)
    assert len(qs) == rows
    assert all(len(q["choices"]) == 4 and 0 <= q["answer"] < 4 for q in qs)


@needs_data
def test_questions_real_fields():
    bio = runlib.load_questions("wmdp-bio", DATA)
    assert bio[0]["subject"] == "biology" and bio[0]["answer"] == 0
    assert bio[0]["choices"][0] == "SpyCEP from Streptococcus pyogenes"
    assert {q["subject"] for q in runlib.load_questions("mmlu", DATA)} >= {"virology", "college biology"}
    vir = runlib.load_questions("mmlu:virology", DATA)
    assert vir[0]["question"] == "How many human polyomaviruses are known at present?"
    assert vir[0]["choices"] == ["100", "1", "10", "unknown"] and vir[0]["answer"] == 0
    # choices keep their surrounding whitespace (lm-eval does not strip them)
    cyber = runlib.load_questions("wmdp-cyber", DATA)
    assert any(c != c.strip() for q in cyber for c in q["choices"])
    assert len(runlib.load_questions("mmlu", DATA, split="dev")) == 35


@needs_data
@pytest.mark.parametrize("subset, split, rows, keys", [
    ("verbmem", "forget", 100, {"prompt", "gt"}), ("knowmem", "forget_qa", 100, {"question", "answer"}),
    ("knowmem", "retain_qa", 100, {"question", "answer"}), ("knowmem", "forget_qa_icl", 10, {"question", "answer"}),
    ("knowmem", "retain_qa_icl", 10, {"question", "answer"}), ("privleak", "forget", 100, None),
    ("privleak", "retain", 100, None), ("privleak", "holdout", 100, None)])
def test_muse_real_row_counts(subset, split, rows, keys):
    data = runlib.load_muse(subset, split, "news", DATA)
    assert len(data) == rows
    assert all(isinstance(d, str) for d in data) if keys is None else all(set(d) == keys for d in data)


@needs_data
def test_corpus_real_and_missing():
    assert len(runlib.load_corpus("muse-news-forget", DATA)) == 889
    with pytest.raises(ilu.ILUError, match=r"missing file .*muse_news/raw/retain1\.json"):
        runlib.load_corpus("muse-news-retain", DATA)      # not in the shared copy (over 4 MiB upstream)


@needs_data
@pytest.mark.parametrize("task, split, rows", [("gsm8k", "train", 7473), ("gsm8k", "test", 1319),
                                               ("agnews", "test", 7600), ("sst2", "test", 872),
                                               ("winogrande", "test", 1267), ("mnli", "test", 11)])
def test_tasks_real_row_counts(task, split, rows):
    data = runlib.load_task(task, split, DATA)
    assert len(data) == rows
    for r in data:
        assert r["prompt"] and r["answer"].startswith(" ")
        if r["choices"] is not None:
            assert r["answer"] == r["choices"][r["label"]]


@needs_data
def test_tasks_real_labels():
    ag = runlib.load_task("agnews", "test", DATA)
    assert ag[0]["answer"] == " Business"                       # class 3 in the CSV
    assert ag[0]["prompt"].startswith("Article: Fears for T N pension after talks Unions representing")
    sst = runlib.load_task("sst2", "test", DATA)
    assert sst[0] == {"prompt": "Review: one long string of cliches .\nSentiment:", "answer": " negative",
                      "choices": [" negative", " positive"], "label": 0}
    wg = runlib.load_task("winogrande", "test", DATA)[0]
    assert wg["choices"] == [" Sarah", " Maria"] and wg["label"] == 1
    mnli = runlib.load_task("mnli", "test", DATA)
    assert [r["answer"] for r in mnli[:2]] == [" neutral", " contradiction"]
    gsm = runlib.load_task("gsm8k", "test", DATA)[0]
    assert gsm["label"] == "18" and gsm["prompt"].startswith("Question: Janet") and gsm["prompt"].endswith("\nAnswer:")


# -- synthetic files of each published format --------------------------------------------------

def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_synthetic_formats(tmp_path):
    q = {"question": " Q? ", "choices": ["a", " b", "c", "d"], "answer": 2}
    write(tmp_path / "wmdp/chem_questions.json", json.dumps([q]))
    write(tmp_path / "mmlu/test/anatomy_test.csv", '"What, exactly?",x,y,"z, w",v,C\n')
    write(tmp_path / "wmdp/cyber-forget-corpus.jsonl", '{"text": "t1"}\n\n{"text": "t2"}\n')
    write(tmp_path / "muse_books/raw/forget.json", json.dumps(["book text"]))
    write(tmp_path / "muse_books/knowmem/retain2_qa.json", json.dumps([{"question": "q", "answer": "a"}]))
    write(tmp_path / "muse_books/privleak/holdout.json", json.dumps(["h"]))
    write(tmp_path / "gsm8k/train.jsonl", json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n")
    write(tmp_path / "ag_news/train.csv", '"4","Title","Desc, with comma"\n')
    write(tmp_path / "sst2/stsa.binary.train", "1 a fine film .\n0 dull .\n")
    write(tmp_path / "winogrande/train_xl.jsonl",
          json.dumps({"sentence": "A _ b", "option1": "x", "option2": "y", "answer": "1"}) + "\n")
    write(tmp_path / "mnli/train.tsv", "index\tsentence1\tsentence2\tgold_label\n0\tP\tH\tcontradiction\n1\tP\tH\t-\n")
    write(tmp_path / "qqp/train.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n0\t1\t2\tA?\tB?\t1\n")
    (chem,) = runlib.load_questions("wmdp-chem", tmp_path)
    assert chem == {"question": " Q? ", "choices": ["a", " b", "c", "d"], "answer": 2, "subject": "chemistry"}
    (mm,) = runlib.load_questions("mmlu", tmp_path)
    assert mm == {"question": "What, exactly?", "choices": ["x", "y", "z, w", "v"], "answer": 2, "subject": "anatomy"}
    assert runlib.load_corpus("wmdp-cyber-forget", tmp_path) == ["t1", "t2"]
    assert runlib.load_corpus("muse-books-forget", tmp_path) == ["book text"]
    assert runlib.load_muse("knowmem", "retain_qa", "books", tmp_path) == [{"question": "q", "answer": "a"}]
    assert runlib.load_muse("privleak", "holdout", "books", tmp_path) == ["h"]
    assert runlib.load_task("gsm8k", "train", tmp_path)[0]["label"] == "2"
    ag = runlib.load_task("agnews", "train", tmp_path)[0]
    assert ag["prompt"] == "Article: Title Desc, with comma\nTopic:" and ag["answer"] == " Sci/Tech"
    assert [r["label"] for r in runlib.load_task("sst2", "train", tmp_path)] == [1, 0]
    assert runlib.load_task("winogrande", "train", tmp_path)[0]["answer"] == " x"
    assert [r["answer"] for r in runlib.load_task("mnli", "train", tmp_path)] == [" contradiction"]  # "-" dropped
    qqp = runlib.load_task("qqp", "train", tmp_path)[0]
    assert qqp["prompt"] == "Question 1: A?\nQuestion 2: B?\nSame meaning:" and qqp["answer"] == " yes"


@pytest.mark.parametrize("file, text, call, message", [
    ("wmdp/bio_questions.json", "[{", lambda d: runlib.load_questions("wmdp-bio", d), r"bio_questions\.json: not valid JSON"),
    ("wmdp/bio_questions.json", '[{"question": "q"}]', lambda d: runlib.load_questions("wmdp-bio", d),
     r"bio_questions\.json record 0: missing choices, answer"),
    ("mmlu/test/x_test.csv", "q,a,b,c\n", lambda d: runlib.load_questions("mmlu:x", d), r"x_test\.csv row 1: 4 fields, expected 6"),
    ("sst2/stsa.binary.train", "positive film\n", lambda d: runlib.load_task("sst2", "train", d),
     r"stsa\.binary\.train line 1: expected '<0\|1> <sentence>'"),
    ("ag_news/test.csv", '"9","t","d"\n', lambda d: runlib.load_task("agnews", "test", d), "class column must be 1-4"),
    ("gsm8k/test.jsonl", '{"question": "q"}\n', lambda d: runlib.load_task("gsm8k", "test", d), "record 0: missing answer"),
    ("mnli/train.tsv", "a\tb\n1\t2\n", lambda d: runlib.load_task("mnli", "train", d), "missing columns"),
])
def test_malformed_files_name_the_file(tmp_path, file, text, call, message):
    write(tmp_path / file, text)
    with pytest.raises(ilu.ILUError, match=message) as e:
        call(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("call, message", [
    (lambda d: runlib.load_questions("wmdp-bio", d), r"missing file .*wmdp/bio_questions\.json"),
    (lambda d: runlib.load_task("qqp", "test", d), r"missing file .*qqp/dev\.tsv"),
    (lambda d: runlib.load_muse("verbmem", "forget", "news", d), r"missing file .*muse_news/verbmem/forget\.json"),
    (lambda d: runlib.load_questions("wmdp-physics", d), "unknown question set 'wmdp-physics'"),
    (lambda d: runlib.load_task("imdb", "train", d), "unknown task 'imdb'"),
    (lambda d: runlib.load_corpus("wikitext", d), "unknown corpus 'wikitext'"),
    (lambda d: runlib.load_muse("verbmem", "retain", "news", d), "unknown MUSE set 'verbmem/retain'"),
    (lambda d: runlib.load_muse("verbmem", "forget", "poems", d), "unknown MUSE corpus 'poems'"),
])
def test_bad_paths_and_names(tmp_path, call, message):
    with pytest.raises(ilu.ILUError, match=message):
        call(tmp_path)


def test_hub_failure_is_one_line(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'cais/wmdp' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ilu.ILUError, match=r"cannot load cais/wmdp \(wmdp-bio, test\) from the hub: Couldn't reach") as e:
        runlib.load_questions("wmdp-bio")
    assert "\n" not in str(e.value)


# -- corpora as training examples: MUSE's windows ----------------------------------------------

@needs_data
def test_muse_forget_corpus_windows_cover_every_token():
    docs = runlib.load_corpus("muse-news-forget", DATA)
    tok = runlib.train_tokenizer(docs[:200], vocab_size=2048)
    stream = tok("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    L = 512
    before = ilu.encode_texts(tok, docs, max_length=L)             # one truncated example per document
    covered = sum(len(e["input_ids"]) - 1 for e in before) / len(stream)   # less each BOS
    assert covered < 0.6                                          # about half of each document is lost
    windows = runlib.encode_windows(tok, docs, max_length=L)
    assert all(len(w["input_ids"]) == L and w["labels"] == w["input_ids"] for w in windows)
    assert all(w["input_ids"][0] == tok.bos_token_id for w in windows)
    step, n = L - 1, len(windows)
    assert n == -(-len(stream) // step)                           # ceil: every token in some window
    for k, w in enumerate(windows[:-1]):                          # exact, consecutive, no overlap, no gap
        assert w["input_ids"][1:] == stream[k * step:(k + 1) * step]
    tail = stream[(n - 1) * step:]
    last = windows[-1]["input_ids"]
    assert last[1:1 + len(tail)] == tail                          # the end of the corpus ...
    assert last[1 + len(tail):] == windows[0]["input_ids"][:L - 1 - len(tail)]   # ... then MUSE's rotation
    trained = [t for w in windows[:-1] for t in w["input_ids"][1:]] + tail
    assert trained == stream                                      # coverage 1.0: every token, once


def test_windows_without_bos_and_short_corpus():
    tok = runlib.train_tokenizer([], merges=False)                   # one token per byte
    tok.bos_token = None
    out = runlib.encode_windows(tok, ["abcdefg", "hi"], max_length=4)   # "abcdefg\n\nhi": 11 tokens
    assert [tok.decode(w["input_ids"]) for w in out] == ["abcd", "efg\n", "\nhia"]
    assert runlib.encode_windows(tok, [], max_length=4) == []
    with pytest.raises(ilu.ILUError, match="no room"):
        runlib.encode_windows(runlib.train_tokenizer([], merges=False), ["abc"], max_length=1)


@needs_data
def test_privleak_scores_each_text_whole_up_to_the_window(monkeypatch):
    from conftest import model_for

    texts = runlib.load_muse("privleak", "forget", "news", DATA)[:6]
    tok = runlib.train_tokenizer(texts, vocab_size=1024)
    model = model_for(tok)                                        # a 4,096-position window
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    assert max(lengths) > 2048                                    # the old fixed cap would have cut these
    seen, real = [], ilu._logits
    monkeypatch.setattr(ilu, "_logits", lambda m, seqs: seen.extend(map(len, seqs)) or real(m, seqs))
    ilu.min_k_scores(model, tok, texts, batch_size=2, progress=False)
    assert sorted(seen) == sorted(min(n, 4096) for n in lengths)
    model.config.max_position_embeddings = 1000
    seen.clear()
    ilu.min_k_scores(model, tok, texts, batch_size=2, progress=False)
    assert seen == [1000] * len(texts)
