"""Shared fixtures: tiny randomly initialised models (no download) and token data."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

VOCAB = 97


def pytest_configure(config):
    # pytest shows every warning raised inside a test, runlib's filters notwithstanding (it resets the
    # filters per test). Two come from third-party code the low-memory tests import, not from ours:
    # torchao's 8/4-bit optimizer state has no AOT cache hash (the runners drop the same message), and
    # torchao's TorchScript helpers call torch.jit.script_method, deprecated in recent torch.
    # (the same pattern as runlib.NO_CACHE_HASH; conftest imports no project module before collection)
    config.addinivalue_line("filterwarnings", r"ignore:\w+ does not implement _stable_hash_for_caching:UserWarning")
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def tiny_llama(layers=4, seed=0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype)


def token_texts(n, lo, hi, length, seed):
    """n encoded examples of random tokens in [lo, hi), every token a target."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ln = length - (i % 3)  # mixed lengths, so batches carry padding
        ids = torch.randint(lo, hi, (ln,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def token_pairs(n, seed, prompt_len=6, answer_len=3):
    """n encoded prompt/answer pairs: the answer is the prompt's first tokens (learnable)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = torch.randint(3, VOCAB, (prompt_len,), generator=g).tolist()
        a = p[:answer_len]
        out.append({"input_ids": p + a, "labels": [-100] * prompt_len + a})
    return out


@pytest.fixture
def llama():
    return tiny_llama()


DATA = os.environ.get("ILU_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason=f"real data files not found at {DATA}")


def model_for(tokenizer, layers=2, seed=0, init=0.02):
    """A tiny random Llama whose vocabulary matches `tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      initializer_range=init, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


ROOT = os.path.join(os.path.dirname(__file__), "..")


def run_script(script, args, tmp_path, timeout=300):
    """Run a runner in a subprocess, offline, with its tiny-target cache under tmp_path."""
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, script, *args, "--cache-dir", str(tmp_path / "cache")],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
