"""What run_wmdp.py and run_muse.py share: the CLI made from a config dataclass, one-line
errors with exit status 2, the results file (atomic writes, resume by stage), tiny-target
caching, task splits, weight snapshots and Markdown tables. ilu.py holds the method itself."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import ilu


# -- configuration and errors ----------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage plus an error; we print one line
        fail(f"{message} (see --help)")


def fail(message: str):
    """Print one line saying what is wrong and exit with status 2 (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_config(cls, argv=None, description: str = ""):
    """A dataclass instance from the command line; each field's metadata["help"] is its --help text."""
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag, help_ = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        kind = f.metadata.get("type", type(default) if default is not None else str)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif isinstance(default, list):
            parser.add_argument(flag, nargs="+", default=default, metavar=f.name.upper(),
                                help=f"{help_} (default: {' '.join(map(str, default))})")
        else:
            parser.add_argument(flag, type=kind, default=default, metavar=f.name.upper(),
                                help=f"{help_} (default: {default})")
    return cls(**vars(parser.parse_args(argv)))


def run_main(main: Callable[[], None]):
    """Run a runner's main; bad input of any kind (ilu.ILUError) becomes one line and exit 2."""
    try:
        main()
    except ilu.ILUError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted: finished stages are saved in results.json; run the same command to resume")


# -- results: one JSON file, written atomically after every stage ----------------------------

class Results:
    """OUT/results.json = {"config": ..., "stages": {name: entry}, "summary": ...}.

    Re-running with the same --out skips stages already recorded (resume); a different
    config in the same folder is refused rather than mixed with the old results.
    """

    def __init__(self, out: str | Path, config: dict, resume_keys: list[str]):
        self.dir = Path(out)
        self.path = self.dir / "results.json"
        self.data = {"config": config, "stages": {}, "summary": {}}
        if self.path.exists():
            try:
                old = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                fail(f"{self.path} is not valid JSON: move it away or choose another --out")
            changed = [k for k in resume_keys if old.get("config", {}).get(k) != config.get(k)]
            if changed:
                more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
                fail(f"{self.path} holds a run with different {', '.join(changed[:3])}{more}: choose another --out")
            self.data["stages"] = old.get("stages", {})
            done = list(self.data["stages"])
            if done:
                print(f"resuming {self.path}: {len(done)} finished stages ({', '.join(done)})")

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def get(self, stage: str) -> dict:
        return self.data["stages"][stage]

    def record(self, stage: str, entry: dict, started: float | None = None):
        if started is not None:
            entry["time_s"] = round(time.perf_counter() - started, 1)
        self.data["stages"][stage] = entry
        self.save()

    def save(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(self.data, indent=1))


def write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_out_dir(out: str):
    """Refuse an --out that exists as a file or cannot be created, before any work starts."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        fail(f"--out {out} is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create --out {out}: {e.strerror}")


def check_data_dir(data_dir: str | None):
    if data_dir is not None and not Path(data_dir).is_dir():
        fail(f"--data-dir {data_dir} does not exist: give the folder of local data copies, or leave it out to use the hub")


# -- models ------------------------------------------------------------------------------------

def cached_tiny_target(cache_dir: str, recipe: dict, texts: list[str], **kwargs):
    """ilu.tiny_target, saved under cache_dir/<hash of recipe and texts> and reloaded when present."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = hashlib.sha256(json.dumps([recipe, texts], sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir).expanduser() / f"tiny-{recipe.get('name', 'target')}-{key}"
    if (path / "config.json").exists():
        print(f"tiny target: cached at {path}")
        return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), path
    start = time.perf_counter()
    model, tok = ilu.tiny_target(texts, **kwargs)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny target: {n / 1e6:.1f}M parameters trained in {time.perf_counter() - start:.0f} s, cached at {path}")
    return model, tok, path


def restore(model, state: dict):
    """Copy a snapshot from ilu.state_of back into the model's parameters."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state[n])


class SavedState(dict):
    """The tensors of a save_pretrained folder, read one at a time (safetensors), by parameter name."""

    def __init__(self, folder: str | Path, names):
        from safetensors import safe_open

        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise ilu.ILUError(f"no .safetensors files in {folder}")
        self._where = {}
        for f in files:
            with safe_open(str(f), "pt") as h:
                self._where.update({k: f for k in h.keys()})
        super().__init__({n: None for n in names if n in self._where})

    def __getitem__(self, name):
        from safetensors import safe_open

        with safe_open(str(self._where[name]), "pt") as h:
            return h.get_tensor(name)


# -- data ----------------------------------------------------------------------------------------

def task_split(name: str, data_dir: str | None, n_train: int | None, n_eval: int | None, seed: int):
    """(fine-tuning records, FA records) of a task: its train and test splits; where only a
    test file is available locally, that file shuffled and cut in two (noted in the result)."""
    import random

    note = ""
    try:
        train = ilu.load_task(name, "train", data_dir)
        test = ilu.load_task(name, "test", data_dir)
    except ilu.ILUError:
        if not data_dir:
            raise
        rows = ilu.load_task(name, "test", data_dir)
        random.Random(seed).shuffle(rows)
        half = len(rows) // 2
        train, test = rows[:half], rows[half:]
        note = f"no local train file: {len(rows)} test rows split into {half} for fine-tuning and {len(rows) - half} for FA"
    return train[:n_train], test[:n_eval], note


def available_tasks(names: list[str], data_dir: str | None) -> tuple[list[str], dict]:
    """The tasks whose data can be read (every one from the hub; locally, those with files)."""
    ok, skipped = [], {}
    for name in names:
        try:
            ilu.load_task(name, "test", data_dir)
            ok.append(name)
        except ilu.ILUError as e:
            skipped[name] = str(e)
    return ok, skipped


# -- tables ----------------------------------------------------------------------------------------

def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else ("–" if v is None else str(v))
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
