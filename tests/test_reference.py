"""ilu.py as a reference to copy (#36): alone in an empty folder its docstring's examples run; every
ordinary mistake meets one ILUError line naming the argument; it mentions no scale machinery; every
script the README or docs tell a user to run answers --help."""
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ilu
import runlib
from conftest import ROOT, model_for, tiny_llama, token_pairs, token_texts

WORDS = "the a code vault tower north is in kept paris capital of france question what answer".split()


def _tokenizer():
    texts = [" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(10)) + f" {i} + {i % 7} = {i + i % 7}"
             for i in range(60)]
    return runlib.train_tokenizer(texts, vocab_size=300)


def _examples(doc: str) -> list[str]:
    """The indented code blocks of a docstring (each a run of lines indented by 4 spaces)."""
    blocks, cur = [], []
    for line in doc.splitlines() + [""]:
        if line.startswith("    ") or (cur and not line.strip()):
            cur.append(line[4:])
        elif cur:
            blocks.append("\n".join(cur).strip() + "\n")
            cur = []
    return [b for b in blocks if "import ilu" in b]


def test_ilu_alone_in_an_empty_folder_runs_its_docstring_examples(tmp_path):
    # what a copier does: ilu.py alone in a folder, the docstring's code pasted into a script. The hub
    # name is the one thing swapped: a tiny random model saved to a folder (no network here)
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(Path(ROOT) / "ilu.py", folder / "ilu.py")
    tok = _tokenizer()
    model_for(tok, layers=2).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    blocks = _examples(ilu.__doc__)
    assert len(blocks) == 2 and "ilu.unlearn(" in blocks[0] and "ilu.irm_penalty(" in blocks[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    runs = []
    for i, code in enumerate(blocks):
        assert re.search(r'^MODEL = "[^"]+"$', code, re.M), code
        script = re.sub(r'^MODEL = "[^"]+"$', f'MODEL = {str(tmp_path / "model")!r}', code, flags=re.M)
        (folder / f"example{i}.py").write_text(script)
        r = subprocess.run([sys.executable, f"example{i}.py"], cwd=folder, capture_output=True, text=True,
                           timeout=300, env=env)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert sorted(p.name for p in folder.iterdir() if p.suffix == ".py") == \
            sorted(["ilu.py"] + [f"example{k}.py" for k in range(i + 1)])   # nothing else of the repo was there
        runs.append(r)
    assert "'step': 4" in runs[0].stdout and "'irm'" in runs[0].stdout        # unlearn's last history entry
    rows = [line.split() for line in runs[1].stdout.splitlines()]             # step, loss, penalty
    assert [r[0] for r in rows] == ["0", "1", "2"] and all(math.isfinite(float(x)) for r in rows for x in r[1:])
    assert all("Warning" not in r.stderr and "Traceback" not in r.stderr for r in runs)   # a clean screen


def test_ilu_is_the_one_process_reference():
    text = (Path(ROOT) / "ilu.py").read_text()
    assert len(text.splitlines()) <= 1000
    assert not re.search(r"torch\.distributed|fully_shard|torchao|rank", text)
    assert "ilu_scale" not in text and "runlib" not in text
    assert set(ilu.__all__) <= set(dir(ilu)) and "irm_penalty" in ilu.__all__ and "unlearn" in ilu.__all__


def _one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert excinfo.type is ilu.ILUError and "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def test_texts_where_encoded_examples_belong():
    with pytest.raises(ilu.ILUError) as e:
        ilu.collate(["a forget text", "another one"])
    _one_line(e, "examples", "encode")
    with pytest.raises(ilu.ILUError) as e:
        ilu.unlearn(tiny_llama(layers=2), ["a forget text"], token_texts(4, 50, 97, 8, 1), progress=False)
    _one_line(e, "forget", "encoded examples")


def test_a_list_where_the_dict_of_environments_belongs():
    env = token_pairs(8, 2)
    with pytest.raises(ilu.ILUError) as e:
        ilu.unlearn(tiny_llama(layers=2), token_texts(4, 3, 50, 8, 0), token_texts(4, 50, 97, 8, 1),
                    envs=[env], env_batch_size=4, steps=1, progress=False)
    _one_line(e, "envs", "dict", "list")


def test_gsm8k_rows_into_encode_pairs():
    rows = [{"question": "Natalia sold 48 clips. How many?", "answer": "48 #### 48"}]
    with pytest.raises(ilu.ILUError) as e:
        ilu.encode_pairs(_tokenizer(), rows)
    _one_line(e, "encode_pairs", "'prompt'", "'answer'", "question")
    with pytest.raises(ilu.ILUError) as e:
        ilu.encode_pairs(_tokenizer(), "prompt and answer")
    _one_line(e, "pairs")


def test_every_answer_cut_off_is_an_error_not_an_empty_list():
    tok = _tokenizer()
    pairs = [{"prompt": "the code is in the north tower of the vault", "answer": " 4 + 1 = 5"}] * 3
    assert ilu.encode_pairs(tok, pairs, max_length=64)                     # room for the answer: encoded
    with pytest.raises(ilu.ILUError) as e:
        ilu.encode_pairs(tok, pairs, max_length=3)                         # the prompt alone is longer
    _one_line(e, "max_length 3", "every one of the 3 pairs")


def test_mc_accuracy_without_subject():
    tok = _tokenizer()
    qs = [dict(question="what is the capital of france", choices=["paris", "north", "vault", "tower"], answer=0)]
    with pytest.raises(ilu.ILUError) as e:
        ilu.mc_accuracy(model_for(tok), tok, qs, progress=False)
    _one_line(e, "mc_accuracy", "'subject'", "subject=")
    acc = ilu.mc_accuracy(model_for(tok), tok, qs, subject="geography", progress=False)   # told: it runs
    assert acc in (0.0, 1.0)


def test_environment_batch_larger_than_the_environment():
    with pytest.raises(ilu.ILUError) as e:
        ilu.unlearn(tiny_llama(layers=2), token_texts(4, 3, 50, 8, 0), token_texts(4, 50, 97, 8, 1),
                    envs={"gsm8k": token_pairs(2, 2)}, env_batch_size=48, steps=1, progress=False)
    _one_line(e, "env_batch_size 48", "'gsm8k'", "2 examples")


def test_progress_false_is_quiet(capfd):
    model = tiny_llama(layers=2)
    hist = ilu.unlearn(model, token_texts(4, 3, 50, 8, 0), token_texts(4, 50, 97, 8, 1), "npo",
                       envs={"a": token_pairs(8, 2)}, steps=2, batch_size=2, grad_accum=1, env_batch_size=4,
                       progress=False)
    ilu.finetune(model, token_pairs(8, 3), max_steps=2, batch_size=4, progress=False)
    out, err = capfd.readouterr()
    assert len(hist) == 2 and out == "" and err == ""
    ilu.unlearn(model, token_texts(4, 3, 50, 8, 0), token_texts(4, 50, 97, 8, 1), "npo", steps=1,
                batch_size=2, grad_accum=1, progress=True)
    out, err = capfd.readouterr()
    assert "step 1/1 | forget" in out + err                                # progress=True: the step line


def test_load_model_takes_float32_on_a_cpu(tmp_path):
    tok = _tokenizer()
    model_for(tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, _ = ilu.load_model(str(tmp_path), device="cpu")
    assert model.dtype == torch.float32
    with pytest.raises(ilu.ILUError) as e:
        ilu.load_model(str(tmp_path), "bfloat61", device="cpu")
    _one_line(e, "dtype", "bfloat61")


SCRIPTS = sorted({m for doc in [Path(ROOT) / "README.md", *sorted((Path(ROOT) / "docs").glob("*.md"))]
                  for m in re.findall(r"(?:python3?|torchrun[^`\n]*?)\s([\w/]+\.py)\b", doc.read_text())})


def test_the_scripts_the_docs_name_are_found():
    assert {"run_wmdp.py", "run_muse.py", "prepare_model.py", "benchmarks/real_study.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_of_every_script_the_docs_name(script):
    r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage:") and r.stderr == "", (r.stdout[:300], r.stderr[-1000:])
