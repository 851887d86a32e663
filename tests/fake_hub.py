"""A fake Hugging Face hub for the tests: the data sets the runners load, in their published schemas.

HUB lists each repository's configs, splits and features as its card states them (the sources are
cited in tests/test_hub_schemas.py); FakeHub stands in for datasets.load_dataset over rows the test
gives it, refusing what a data set does not have and recording the files a real load would download.
mini_hub() holds a few rows of every split the runners read at full scale (tests/test_full_scale.py).
"""
import fnmatch
import random

from datasets import ClassLabel, Dataset, Features, List, Value

S, I64, I32 = Value("string"), Value("int64"), Value("int32")
MMLU_SUBJECTS = """abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology
college_chemistry college_computer_science college_mathematics college_medicine college_physics computer_security
conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts
high_school_biology high_school_chemistry high_school_computer_science high_school_european_history
high_school_geography high_school_government_and_politics high_school_macroeconomics high_school_mathematics
high_school_microeconomics high_school_physics high_school_psychology high_school_statistics high_school_us_history
high_school_world_history human_aging human_sexuality international_law jurisprudence logical_fallacies
machine_learning management marketing medical_genetics miscellaneous moral_disputes moral_scenarios nutrition
philosophy prehistory professional_accounting professional_law professional_medicine professional_psychology
public_relations security_studies sociology us_foreign_policy virology world_religions""".split()
assert len(MMLU_SUBJECTS) == 57


def _mmlu():
    f = Features(question=S, subject=S, choices=List(S), answer=ClassLabel(names=list("ABCD")))
    out = {s: {sp: f for sp in ("test", "validation", "dev")} for s in MMLU_SUBJECTS}
    out["all"] = {sp: f for sp in ("test", "validation", "dev", "auxiliary_train")}
    out["auxiliary_train"] = {"train": f}
    return out


def _muse():
    text, qa = Features(text=S), Features(answer=S, question=S)
    return {"raw": {s: text for s in ("forget", "retain1", "retain2", "holdout")},
            "verbmem": {"forget": Features(prompt=S, gt=S)},
            "knowmem": {s: qa for s in ("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl")},
            "privleak": {s: text for s in ("forget", "retain", "holdout")}}


def _glue_label(names):
    return ClassLabel(names=names)


HUB = {  # repository: {config (None: the only, default one): {split: features}}
    "cais/wmdp": {c: {"test": Features(answer=I64, question=S, choices=List(S))}
                  for c in ("wmdp-bio", "wmdp-chem", "wmdp-cyber")},
    "cais/mmlu": _mmlu(),
    "cais/wmdp-corpora": {c: {"train": Features(text=S)}
                          for c in ("bio-retain-corpus", "cyber-forget-corpus", "cyber-retain-corpus")},
    "cais/wmdp-bio-forget-corpus": {None: {"train": Features(text=S)}},
    "muse-bench/MUSE-News": _muse(),
    "muse-bench/MUSE-Books": _muse(),
    "openai/gsm8k": {c: {s: Features(question=S, answer=S) for s in ("train", "test")} for c in ("main", "socratic")},
    "fancyzhx/ag_news": {None: {s: Features(text=S, label=ClassLabel(names=["World", "Sports", "Business", "Sci/Tech"]))
                                for s in ("train", "test")}},
    "stanfordnlp/sst2": {None: {s: Features(idx=I32, sentence=S, label=ClassLabel(names=["negative", "positive"]))
                                for s in ("train", "validation", "test")}},
    "allenai/winogrande": {c: {s: Features(sentence=S, option1=S, option2=S, answer=S)
                               for s in ("train", "validation", "test")}
                           for c in ("winogrande_xs", "winogrande_s", "winogrande_m", "winogrande_l", "winogrande_xl",
                                     "winogrande_debiased")},
    "nyu-mll/glue": {
        "mnli": {s: Features(premise=S, hypothesis=S, label=_glue_label(["entailment", "neutral", "contradiction"]),
                             idx=I32)
                 for s in ("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched")},
        "qqp": {s: Features(question1=S, question2=S, label=_glue_label(["not_duplicate", "duplicate"]), idx=I32)
                for s in ("train", "validation", "test")}},
}


def repo_files(repo):
    """{file: (config, split)}: the parquet layout of these repositories (<config>/<split>-00000-of-00001.parquet)."""
    return {f"{c or 'data'}/{s}-00000-of-00001.parquet": (c, s) for c, splits in HUB[repo].items() for s in splits}


class FakeHub:
    """load_dataset(path, name, split=..., data_files=...) over HUB, holding `rows` {(repo, config, split): [row]}."""

    def __init__(self, rows):
        self.rows, self.downloaded = rows, []
        for (repo, config, split), rs in rows.items():
            cols = set(HUB[repo][config][split])
            assert all(set(r) == cols for r in rs), f"{repo}/{config}/{split}: rows must have exactly {sorted(cols)}"

    def __call__(self, path, name=None, split=None, data_files=None, **kwargs):
        if path not in HUB:
            raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub or cannot be accessed.")
        files = repo_files(path)
        if data_files is not None:
            (want, pattern), = data_files.items()
            hit = [f for f in files if fnmatch.fnmatch(f, pattern)]
            if not hit:
                raise FileNotFoundError(f"Unable to find '{pattern}' in {path}")
            if split != want:
                raise ValueError(f'Unknown split "{split}". Should be one of [\'{want}\'].')
            pairs = sorted({files[f] for f in hit}, key=str)
        else:
            configs = HUB[path]
            if name is None and None not in configs:
                raise ValueError(f"Config name is missing. Please pick one among the available configs: {list(configs)}")
            if name not in configs:
                raise ValueError(f"BuilderConfig '{name}' not found. Available: {list(configs)}")
            if split not in configs[name]:
                raise ValueError(f'Unknown split "{split}". Should be one of {list(configs[name])}.')
            hit = [f for f, (c, _) in files.items() if c == name]        # every split of the config
            pairs = [(name, split)]
        self.downloaded += hit
        features = HUB[path][pairs[0][0]][pairs[0][1]]
        return Dataset.from_list([r for c, s in pairs for r in self.rows.get((path, c, s), [])], features=features)




WORDS = ("the minister said council report police match season hospital company village river station plan "
         "school bank water energy court film music vote price team road house night morning city week").split()


def prose(rng: random.Random, words: int) -> str:
    """Made-up news-like text of about `words` words, sentences of 6-14 words."""
    out = []
    while sum(len(s.split()) for s in out) < words:
        w = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        out.append(" ".join(w).capitalize() + ".")
    return " ".join(out)


def mini_hub(seed: int = 0, n: int = 4, train: int = 48) -> dict:
    """{(repo, config, split): rows}: n rows (train for the tasks' train splits) of every split the runners
    read at full scale, in each data set's schema; texts of the lengths the real ones have (a few
    hundred words for corpora and passages)."""
    rng = random.Random(seed)
    mc = lambda i: dict(question=prose(rng, 12)[:-1] + "?", choices=[prose(rng, 3) for _ in range(4)],  # noqa: E731
                        answer=i % 4)
    rows = {("cais/wmdp", c, "test"): [mc(i) for i in range(n)] for c in ("wmdp-bio", "wmdp-cyber")}
    rows[("cais/mmlu", "all", "test")] = [dict(mc(i), subject=s) for s in ("college_biology", "virology")
                                          for i in range(n // 2)]
    docs = lambda: [prose(rng, 300) for _ in range(n)]  # noqa: E731
    rows[("cais/wmdp-bio-forget-corpus", None, "train")] = [dict(text=t) for t in docs()]
    for c in ("bio-retain-corpus", "cyber-forget-corpus", "cyber-retain-corpus"):
        rows[("cais/wmdp-corpora", c, "train")] = [dict(text=t) for t in docs()]
    news = "muse-bench/MUSE-News"
    # as in MUSE, the verbmem passages are cut from the forget documents: a prompt and the text that follows it
    cuts = [(prose(rng, 150), " " + prose(rng, 80), " " + prose(rng, 70)) for _ in range(n)]
    rows[(news, "raw", "forget")] = [dict(text="".join(c)) for c in cuts]
    rows[(news, "verbmem", "forget")] = [dict(prompt=p, gt=gt) for p, gt, _ in cuts]
    for split in ("retain1", "holdout"):
        rows[(news, "raw", split)] = [dict(text=t) for t in docs()]
    for split, k in (("forget_qa", n), ("retain_qa", n), ("forget_qa_icl", 10), ("retain_qa_icl", 10)):  # MUSE: 10 shots
        rows[(news, "knowmem", split)] = [dict(question=prose(rng, 10)[:-1] + "?", answer=prose(rng, 3)[:-1])
                                          for _ in range(k)]
    for split in ("forget", "retain", "holdout"):
        rows[(news, "privleak", split)] = [dict(text=t) for t in docs()]
    for split, k in (("train", train), ("test", n)):
        rows[("openai/gsm8k", "main", split)] = [
            dict(question=prose(rng, 25)[:-1] + "?", answer=f"{prose(rng, 20)} <<{i}+2={i + 2}>>\n#### {i + 2}")
            for i in range(k)]
        rows[("fancyzhx/ag_news", None, split)] = [dict(text=prose(rng, 30), label=i % 4) for i in range(k)]
    for split, k in (("train", train), ("validation", n)):
        rows[("stanfordnlp/sst2", None, split)] = [dict(idx=i, sentence=prose(rng, 12).lower()[:-1] + " . ", label=i % 2)
                                                   for i in range(k)]
        rows[("allenai/winogrande", "winogrande_xl", split)] = [
            dict(sentence=prose(rng, 10) + " _ " + prose(rng, 5), option1="Anna", option2="Ben", answer=str(1 + i % 2))
            for i in range(k)]
        rows[("nyu-mll/glue", "qqp", split)] = [dict(question1=prose(rng, 8)[:-1] + "?", question2=prose(rng, 8)[:-1] + "?",
                                                     label=i % 2, idx=i) for i in range(k)]
    for split, k in (("train", train), ("validation_matched", n)):
        rows[("nyu-mll/glue", "mnli", split)] = [dict(premise=prose(rng, 15), hypothesis=prose(rng, 8), label=i % 3,
                                                      idx=i) for i in range(k)]
    return rows
