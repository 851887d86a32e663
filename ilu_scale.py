"""ILU at scale, beside ilu.py: many GPUs (FSDP2 under torchrun) and one GPU in less memory.

ilu.py is the method in one process. This file runs the same unlearning and fine-tuning steps
when a model is cut across GPUs or must fit a smaller card, and imports ilu for everything
else (losses, the penalty's terms, data, samplers, each method's terms, the log line):

    torchrun --nproc-per-node 4 run_wmdp.py --method npo --ilu-env gsm8k    # FSDP2, 4 GPUs
    python run_wmdp.py --method npo --ilu-env gsm8k --low-memory 8bit       # 7B NPO + ILU in 40 GiB

The seam: `unlearn` and `finetune` take ilu's arguments plus `low_memory`. For a model that is
not sharded and no low_memory they are ilu's own functions; otherwise they run a second copy of
ilu's loop with the scale parts added, as cleanrl keeps its multi-GPU PPO beside `ppo.py` and
torchtune its distributed recipe beside the single-device one. tests/test_distributed.py
(sharded = one process, within 1e-5) and tests/test_low_memory.py (low memory = plain) hold the
copies in step. `load_model`, `save_model`, `state_of`, `load_state`, `norm` and `cosine` here
also take sharded models and fall back to ilu's for any other.

Many GPUs. `torchrun --nproc-per-node N` starts N copies of the program, one per GPU. `shard`
cuts the model with torch's FSDP2 (`fully_shard`, one unit per decoder layer): each rank holds
1/N of every weight, gradient and optimizer moment, and gathers a layer's weights only while it
runs. The loops split each step's rows across the ranks: every rank draws the same global
batches from the same seeded samplers and runs its own rows. A loss that is a mean over a
micro-batch becomes this rank's part of that mean (its mean x its share of the tokens or rows),
and FSDP sums the gradients rather than averaging them, so the ranks add up to the one-process
objective. The IRM penalty needs one step more: the environment's g = sum of (E_p[z] - z_y) /
token count is summed over the ranks before it is squared (a mean of per-rank penalties would
be another, biased objective). Evaluation (ilu's functions as they are) runs every batch on
every rank and gives the same numbers everywhere; only rank 0 prints and writes.

One GPU in less memory (`low_memory`). See `Updater`: one packed forward and one backward a
step, each parameter's optimizer stepping inside that backward (torchao's 8-bit or 4-bit AdamW
moments, or AdamWSR's), so the model's gradients never all exist at once.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import ilu
from ilu import ILUError

# -----------------------------------------------------------------------------
# Many GPUs: the process group, sharding, loading and saving


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """True on rank 0 of a torchrun group, and in a single process: the one that prints and writes."""
    return not _distributed() or dist.get_rank() == 0


def is_sharded(model) -> bool:
    """Whether `model` was cut by `shard` (FSDP2) across the ranks of a torchrun group."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) and _distributed()


def init_distributed(backend: str | None = None) -> torch.device:
    """Join the process group that torchrun set up (WORLD_SIZE > 1) and return this rank's device:
    cuda:LOCAL_RANK with NCCL when GPUs are present, else the CPU with gloo. One process: nothing to
    join, and the device is cuda when available, else cpu."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return torch.device("cuda" if cuda else "cpu")
    backend = backend or ("nccl" if cuda else "gloo")
    if not dist.is_available() or not dist.is_backend_available(backend):
        raise ILUError(f"the torch.distributed backend '{backend}' is not available in this build of torch: "
                       "use gloo on CPUs, nccl on NVIDIA GPUs")
    if backend == "nccl" and not cuda:
        raise ILUError("the nccl backend needs CUDA GPUs, and none is visible: use gloo on CPUs")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda and local >= torch.cuda.device_count():
        raise ILUError(f"LOCAL_RANK {local} has no GPU: this node has {torch.cuda.device_count()}; "
                       "give --nproc-per-node at most that many")
    device = torch.device(f"cuda:{local}" if cuda and backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return device


def shard(model, device=None):
    """Cut `model` across the ranks with FSDP2: each decoder layer one unit, then the rest (embeddings,
    final norm, LM head). Parameters on the CPU (or on the meta device, see `load_model`) move to
    `device` as shards. Gradients are summed over the ranks, not averaged (see the module's note).
    One process: the model is returned as it is."""
    if not _distributed():
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    device = torch.device(device) if device is not None else next(model.parameters()).device
    if device.type == "meta":
        device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in ilu.decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)   # a plain SUM (gloo has no PREMUL_SUM)
    return model


def load_model(name_or_path: str, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
               gradient_checkpointing: bool = False, sharded: bool = False):
    """ilu.load_model, or with sharded=True under torchrun (after `init_distributed`; device: its
    return value): rank 0 reads the weights into CPU memory, the other ranks build the model on the
    meta device (no memory), `shard` cuts it across the ranks onto `device`, and rank 0's weights
    are broadcast into the shards. The node's CPU memory holds one copy of the model, not one per GPU."""
    if not (sharded and _distributed()):
        return ilu.load_model(name_or_path, dtype, device, gradient_checkpointing)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if is_main():
        model, tokenizer = ilu.load_model(name_or_path, dtype, "cpu", gradient_checkpointing)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name_or_path),
                                                         dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        except (OSError, ValueError) as e:
            raise ILUError(f"cannot load model '{name_or_path}': {str(e).strip().splitlines()[0]}") from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token                 # as rank 0's ilu.load_model does
        model.config.pad_token_id = tokenizer.pad_token_id
        if gradient_checkpointing:
            ilu.enable_checkpointing(model)
    return _shard_from_rank0(model, device), tokenizer


def _shard_from_rank0(model, device):
    """`shard` a model that holds real weights on rank 0 and meta tensors elsewhere, then fill
    every rank's shards from rank 0 (the buffers, e.g. rotary frequencies, are broadcast whole)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = model.state_dict() if is_main() else {}
    shard(model, device)
    if not is_main():
        model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for b in model.buffers():
        dist.broadcast(b, src=0)
    return model


def save_model(model, tokenizer, path) -> None:
    """save_pretrained of model and tokenizer into the folder `path`; a sharded model is gathered to full
    CPU tensors first and rank 0 writes (the others wait)."""
    if not is_sharded(model):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main():
        model.save_pretrained(path, state_dict=state)
        tokenizer.save_pretrained(path)
    dist.barrier()


def _reshard(model) -> None:
    """Put every unit of a sharded model back to its shards. While a unit's weights are gathered,
    FSDP2 registers the gathered tensors as the module's parameters, and it keeps the root unit
    (embeddings, final norm, LM head) gathered after a forward: model.parameters() read after an
    evaluation or NPO's reference pass would hand the optimizer tensors that receive no gradient.
    Called before the parameters are collected and at the start of every training step."""
    if is_sharded(model):
        for m in model.modules():
            if hasattr(m, "reshard"):
                m.reshard()


def _mine(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter or gradient (a DTensor); any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def local_part(model, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a full tensor of parameter `name` (FSDP2 cuts dim 0 into world-size
    torch.chunk pieces); a tensor already of the shard's shape (a `state_of` snapshot) as it is;
    any tensor as it is for a model that is not sharded."""
    _reshard(model)                                   # gathered weights are not this rank's shards
    local = _mine(model.get_parameter(name))
    if not is_sharded(model) or tensor.shape == local.shape:
        return tensor
    pieces = tensor.chunk(dist.get_world_size(), dim=0)
    rank = dist.get_rank()
    part = pieces[rank] if rank < len(pieces) else tensor[:0]
    if part.shape != local.shape:
        raise ILUError(f"{name}: a tensor of shape {tuple(tensor.shape)} is neither the full parameter nor this "
                       f"rank's shard {tuple(local.shape)}")
    return part


def state_of(model) -> dict[str, torch.Tensor]:
    """ilu.state_of; of a sharded model, this rank's shards (norms and cosines then sum over the
    ranks: across_ranks=True)."""
    if not is_sharded(model):
        return ilu.state_of(model)
    _reshard(model)
    return {n: _mine(p).detach().to("cpu", copy=True) for n, p in model.named_parameters()}


@torch.no_grad()
def load_state(model, state: Mapping[str, torch.Tensor]) -> None:
    """ilu.load_state; a sharded model takes this rank's part of each full tensor (`local_part`)."""
    if not is_sharded(model):
        return ilu.load_state(model, state)
    _reshard(model)
    for n, p in model.named_parameters():
        _mine(p).copy_(local_part(model, n, state[n]))


def _all_sum(*values: float) -> list[float]:
    """Each value summed over the ranks (fp64, on the device the backend needs)."""
    if not _distributed():
        return list(values)
    nccl = dist.get_backend() == "nccl"
    t = torch.tensor(values, dtype=torch.float64, device=torch.cuda.current_device() if nccl else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def norm(a: Mapping[str, torch.Tensor], across_ranks: bool = False) -> float:
    """ilu.norm; across_ranks: the tensors are this rank's shards (`state_of` a sharded model)."""
    if not across_ranks:
        return ilu.norm(a)
    return math.sqrt(_all_sum(sum(float(a[n].double().pow(2).sum()) for n in a))[0])


def cosine(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], across_ranks: bool = False) -> float:
    """ilu.cosine; across_ranks: the tensors are this rank's shards (`state_of` a sharded model)."""
    if not across_ranks:
        return ilu.cosine(a, b)
    dot = na = nb = 0.0
    for n in a:
        x, y = a[n].double().flatten(), b[n].double().flatten()
        dot, na, nb = dot + float(x @ y), na + float(x @ x), nb + float(y @ y)
    dot, na, nb = _all_sum(dot, na, nb)
    return dot / math.sqrt(na * nb) if na > 0 and nb > 0 else float("nan")


# -----------------------------------------------------------------------------
# Many GPUs: each rank's part of a step


def _world(model) -> tuple[int, int]:
    """(rank, world size) over which `model`'s batches are split: (0, 1) unless it is sharded."""
    return (dist.get_rank(), dist.get_world_size()) if is_sharded(model) else (0, 1)


def _sum_over_ranks(model, *values: float) -> list[float]:
    """Each value summed over the ranks of a sharded model; the values themselves otherwise."""
    return _all_sum(*values) if is_sharded(model) else list(values)


def _my_rows(model, n: int, what: str) -> slice:
    """This rank's consecutive rows of a global batch of n rows (all of them when not sharded)."""
    rank, world = _world(model)
    if n % world:
        raise ILUError(f"the {what} has {n} rows, which {world} processes cannot split evenly: "
                       f"make it a multiple of {world}, or run on a number of GPUs that divides it")
    k = n // world
    return slice(rank * k, rank * k + k)


def _my_pieces(model, n_micro: int, rows: int, what: str) -> list[tuple[int, slice]]:
    """This rank's share of one step of n_micro micro-batches of `rows` rows, as (micro-batch, rows):
    a slice of every micro-batch when the world size divides `rows`, else whole micro-batches."""
    rank, world = _world(model)
    if rows % world and n_micro % world:
        raise ILUError(f"{world} processes can split neither the {what}'s {rows} rows nor its {n_micro} "
                       f"micro-batches evenly: make one of them a multiple of {world}")
    if rows % world == 0:
        return [(m, _my_rows(model, rows, what)) for m in range(n_micro)]
    return [(m, slice(None)) for m in range(rank, n_micro, world)]


def _rows(batch: Mapping[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in batch.items()}


SHARE_OF = {"npo": ("rows", "tokens"), "graddiff": ("tokens", "tokens"), "rmu": ("mask", "mask")}


def _share(b: Mapping[str, torch.Tensor], rows: slice, idx: list, kind: str) -> float:
    """This rank's part of a micro-batch in what a term averages over: its examples (L_NPO),
    answer tokens (NLL) or attention tokens (RMU's MSE)."""
    if kind == "rows":
        return len(idx[rows]) / len(idx)
    if kind == "tokens":
        return ilu._answer_tokens(b["labels"][rows]) / max(ilu._answer_tokens(b["labels"]), 1)
    return float(b["attention_mask"][rows].sum() / b["attention_mask"].sum().clamp(min=1))


def _my_micro_batches(model, forget, retain, draws, pieces, kinds: tuple[str, str], device):
    """Yield this rank's part of one step: (forget rows, retain rows, forget indices, forget
    share, retain share) for each (micro-batch, rows) of `pieces` (`_my_pieces`)."""
    for m, rows in pieces:
        f_idx, r_idx = draws[m]
        fb, rb = ilu.collate([forget[i] for i in f_idx], device), ilu.collate([retain[i] for i in r_idx], device)
        yield (_rows(fb, rows), _rows(rb, rows), f_idx[rows],
               _share(fb, rows, f_idx, kinds[0]), _share(rb, rows, r_idx, kinds[1]))


def _plan_pieces(model, grad_accum: int, batch_size: int, envs, env_batch_size: int, env_grad_batch: int | None):
    """This rank's (micro-batch, rows) pieces of a step; a batch the ranks cannot split is refused now."""
    for name in envs:
        _my_rows(model, env_batch_size, f"'{name}' environment batch")
        _my_rows(model, env_grad_batch or 0, f"'{name}' split-estimator batch")
    return _my_pieces(model, grad_accum, batch_size, "unlearning micro-batch")


@torch.no_grad()
def _hidden_at_frozen(model, layer: int, batch: Mapping[str, torch.Tensor], frozen: Mapping[str, torch.Tensor]):
    """ilu.hidden_at with RMU's frozen weights on a sharded model. FSDP2 re-registers its own
    parameters at every forward (torch.func.functional_call cannot swap them), so the frozen shards
    are copied into the model's own for the call, and its current weights back after it. (The graphs
    of forwards already run do not see the copy: FSDP2 gathers the weights again in backward.)"""
    current = {n: _mine(model.get_parameter(n)).clone() for n in frozen}
    try:
        for n, w in frozen.items():
            _mine(model.get_parameter(n)).copy_(w)
        return ilu.hidden_at(model, layer, batch)
    finally:
        for n, w in current.items():
            _mine(model.get_parameter(n)).copy_(w)


def _method(model, method: str, forget, device, beta, gamma, rmu_layer, rmu_coeff, rmu_alpha, seed, log):
    """ilu._method (terms, trained parameters, retain weight) with the parameters collected after
    `_reshard`; RMU on a sharded model keeps this rank's shards of its trained weights as the frozen copies."""
    _reshard(model)
    if method != "rmu" or not is_sharded(model):
        terms, params, weight = ilu._method(model, method, forget, device, beta, gamma, rmu_layer, rmu_coeff,
                                            rmu_alpha, seed, log)
        if is_sharded(model):     # NPO's reference pass left the root unit gathered: collect the shards
            _reshard(model)
            params = [p for p in model.parameters() if p.requires_grad]
        return terms, params, weight
    trained = ilu._rmu_weights(model, rmu_layer)
    ids = {id(w) for w in trained}
    frozen = {n: _mine(p).detach().clone() for n, p in model.named_parameters() if id(p) in ids}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    control = ilu.rmu_control_vector(model.config.hidden_size, rmu_coeff, seed).to(device)
    log(f"rmu: layer {rmu_layer}, training {', '.join(frozen)}")

    def frozen_hidden(b):
        return _hidden_at_frozen(model, rmu_layer, b, frozen)

    def terms(fwd, fb, rb, idx):
        return ilu._rmu_terms(model, fb, rb, rmu_layer, control, frozen, rmu_alpha, frozen_hidden)

    return terms, trained, 1.0


# -----------------------------------------------------------------------------
# One GPU in less memory: the optimizer inside backward, quantized moments, one packed forward


class ShardAdamWSR(ilu.AdamWSR):
    """ilu.AdamWSR on this rank's shard of each parameter and gradient (moments sharded alike),
    with rounding noise that differs by rank. On a model that is not sharded: AdamWSR itself."""

    def __init__(self, params, lr: float = 1e-5, weight_decay: float = 0.0, seed: int = 0):
        super().__init__(params, lr=lr, weight_decay=weight_decay,
                         seed=seed + 1_000_003 * (dist.get_rank() if _distributed() else 0))

    def _tensors(self, param):
        return _mine(param), _mine(param.grad)


LOW_MEMORY = ("8bit", "4bit", "full")


class Updater:
    """Turns one step's losses into one update of `params`, in one of two ways.

    Default (low_memory None): each loss backpropagates as it comes (gradients accumulate over
    micro-batches and environments); then the global gradient norm is clipped to max_grad_norm
    and `ShardAdamWSR` steps (ilu's loop, on shards).

    low_memory "8bit", "4bit" or "full": the step's losses are kept and backpropagate together,
    once, and each parameter's own optimizer steps inside that backward the moment its gradient
    is complete (`register_post_accumulate_grad_hook`; PyTorch's "optimizer step in backward",
    torchtune's optimizer_in_bwd), which then frees it: with one forward a step (`_one_forward`)
    the model's gradients never all exist at once (7B, bf16: 13.5 GiB saved). The global norm
    would need them all, so each parameter's gradient is clipped to max_grad_norm on its own
    norm instead (per-parameter clipping; off with None). Moments: "8bit" / "4bit" are torchao's
    AdamW8bit / AdamW4bit (block-wise quantized, 1 or 0.5 byte per value; bf16 weights written
    with stochastic rounding, as AdamWSR does; a tensor under 4,096 values or not a whole number
    of blocks keeps full moments); "full" is AdamWSR per parameter (to check the single backward
    against the default). One process only: FSDP2 assigns sharded gradients itself, after the hooks.
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float, weight_decay: float = 0.0, seed: int = 0,
                 max_grad_norm: float | None = 1.0, low_memory: str | None = None):
        self.params, self.max_grad_norm, self.low_memory, self.pending = list(params), max_grad_norm, low_memory, []
        if not low_memory:
            self.opt = ShardAdamWSR(self.params, lr=lr, weight_decay=weight_decay, seed=seed)
            return
        if low_memory not in LOW_MEMORY:
            raise ILUError(f"unknown low-memory mode '{low_memory}': choose one of {', '.join(LOW_MEMORY)}")
        if _distributed():
            raise ILUError("the low-memory mode runs in one process: under torchrun, FSDP2 already shards the "
                           "gradients and optimizer state; drop --low-memory")
        make = _moments_optimizer(low_memory, lr, weight_decay)
        self.opts = {p: make(p, seed + i) for i, p in enumerate(self.params)}   # AdamWSR: own rounding noise
        self.hooks = [p.register_post_accumulate_grad_hook(self._step_one) for p in self.params]

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate now (default), or keep the loss for the step's one backward."""
        if self.low_memory:
            self.pending.append(loss)
        else:
            loss.backward()

    def step(self, lr: float) -> None:
        """Update the parameters at learning rate lr; the gradients are cleared after it."""
        if not self.low_memory:
            ilu._update(self.params, self.opt, lr, self.max_grad_norm)
            return
        self.lr, pending, self.pending = lr, self.pending, []
        sum(pending).backward()                        # each parameter's optimizer steps in here

    def _step_one(self, p: torch.Tensor) -> None:
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        opt = self.opts[p]
        _set_lr(opt, self.lr)
        opt.step()
        p.grad = None

    def close(self) -> None:
        """Remove the in-backward hooks (the parameters train normally again)."""
        for h in getattr(self, "hooks", []):
            h.remove()
        self.pending = []


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)                      # torchao keeps lr as a tensor
        else:
            group["lr"] = lr


def _moments_optimizer(low_memory: str, lr: float, weight_decay: float):
    """make(parameter, seed): a one-parameter optimizer for the low-memory mode (see Updater)."""
    if low_memory == "full":
        return lambda p, seed: ilu.AdamWSR([p], lr=lr, weight_decay=weight_decay, seed=seed)
    try:
        from torchao.optim import AdamW4bit, AdamW8bit      # optional: only the low-memory mode needs it
    except ImportError:
        raise ILUError(f"the low-memory mode '{low_memory}' needs torchao for its quantized moments: "
                       "pip install torchao") from None
    kind = AdamW8bit if low_memory == "8bit" else AdamW4bit
    return lambda p, seed: kind([p], lr=lr, weight_decay=weight_decay, bf16_stochastic_round=p.dtype == torch.bfloat16)


def _lengths(b: Mapping[str, torch.Tensor]) -> list[int]:
    return b["attention_mask"].sum(1).tolist()         # right-padded rows: each one's tokens


def _one_forward(model, batches: Sequence[Mapping[str, torch.Tensor]]) -> Callable:
    """forward(b) for each of `batches`, all of their logits from ONE forward of the model.

    The low-memory mode needs it: a weight's gradient is complete, and its optimizer can step
    and free it, once backward has passed the weight's layer, which holds only when the step
    has one forward. (With several, one backward runs the last forward's graph to the bottom
    before the previous one's, so every weight holds a partial gradient meanwhile: a model-sized
    buffer.) The batches' sequences are packed without padding into rows as long as the longest
    one (first fit, longest first), each with position ids from 0; given position ids, no
    attention mask and no KV cache, transformers keeps attention inside each packed sequence
    (a cache, on by default, turns that off: the packed sequences would see each other). Each
    batch's logits are then gathered back into its right-padded layout (B, T, V); padding
    positions copy some row's logits, and their labels are -100.
    """
    lengths = [_lengths(b) for b in batches]
    seqs = sorted(((n, k, i) for k, ns in enumerate(lengths) for i, n in enumerate(ns)), key=lambda s: -s[0])
    width, used, place = seqs[0][0], [], {}
    for n, k, i in seqs:                                           # first fit, longest first
        r = next((r for r, u in enumerate(used) if u + n <= width), None)
        if r is None:                                              # no room left: a new row
            r, used = len(used), used + [0]
        place[k, i], used[r] = (r, used[r]), used[r] + n
    ids = torch.zeros(len(used), width, dtype=torch.long)
    pos = torch.stack([torch.cat([torch.arange(u), torch.arange(width - u)]) for u in used])  # a row's tail: its own
    index = [torch.zeros(b["input_ids"].shape, dtype=torch.long) for b in batches]     # into the packed positions
    for (k, i), (r, o) in place.items():
        n = lengths[k][i]
        ids[r, o:o + n] = batches[k]["input_ids"][i, :n].cpu()
        pos[r, o:o + n] = torch.arange(n)
        index[k][i, :n] = r * width + o + torch.arange(n)
    device = batches[0]["input_ids"].device
    logits = model(input_ids=ids.to(device), position_ids=pos.to(device), use_cache=False).logits.flatten(0, 1)
    out = {id(b): logits[ix.to(device)] for b, ix in zip(batches, index)}
    return lambda b: out[id(b)]


def _pack_step(model, micro, env_batches) -> tuple[list, Callable]:
    """The low-memory step: (its micro-batches, forward) with one forward (`_one_forward`) for the
    batches that take a gradient: the forget and retain rows of each micro-batch, and each
    environment's batch (its split-estimator batch, if any). Not for RMU, which needs hidden
    states and trains 3 matrices (their partial gradients are small)."""
    micro = list(micro)
    return micro, _one_forward(model, [b for m in micro for b in m[:2]] +
                               [eb if gb is None else gb for eb, gb in env_batches])


# -----------------------------------------------------------------------------
# The penalty and the two loops, with the scale parts added


def _irm_backward(model, batch: Mapping[str, torch.Tensor], lam: float, micro: int | None,
                  grad_batch: Mapping[str, torch.Tensor] | None = None, backward=torch.Tensor.backward,
                  forward: Callable | None = None) -> float:
    """ilu._irm_backward (the same arithmetic: whole batch, chunks, or the split estimator) on a
    sharded model, where the chunks' sums s_c are summed over the ranks too, so g is the global
    batch's before squaring; or in the low-memory step, whose one forward (`forward`) holds the rows
    that take a gradient (micro then only chunks the forward-only pass). backward: what is done
    with each loss (`Updater.backward`)."""
    def logits_of(b, rows):
        return model(input_ids=b["input_ids"][rows], attention_mask=b["attention_mask"][rows]).logits

    def chunks(b):                                             # this rank's rows, micro at a time
        mine = _my_rows(model, b["input_ids"].size(0), "environment batch")
        step = micro or (mine.stop - mine.start)
        return [slice(i, min(i + step, mine.stop)) for i in range(mine.start, mine.stop, step)]

    whole = not is_sharded(model) and not (micro and micro < batch["input_ids"].size(0))
    if grad_batch is None and (forward is not None or whole):
        penalty = ilu.irm_penalty((forward or ilu._forward(model))(batch), batch["labels"])
        backward(lam * penalty)                                # one process, the whole batch: ilu's
        return penalty.item()
    if grad_batch is None and len(chunks(batch)) == 1:        # sharded, one forward per rank
        rows = chunks(batch)[0]
        s, _ = ilu._irm_terms(logits_of(batch, rows), batch["labels"][rows])
        n = max(ilu._answer_tokens(batch["labels"]), 1)
        g = _sum_over_ranks(model, s.item())[0] / n            # the global g, then squared
        backward(lam * 2 * g * s / n)
        return g * g
    with torch.no_grad():                                      # g: forward only
        s = sum(ilu._irm_terms(logits_of(batch, c), batch["labels"][c])[0] for c in chunks(batch))
    g = _sum_over_ranks(model, float(s))[0] / max(ilu._answer_tokens(batch["labels"]), 1)
    target = batch if grad_batch is None else grad_batch
    n = max(ilu._answer_tokens(target["labels"]), 1)
    if forward is not None:                                    # low memory: its rows are in the step's forward
        backward(lam * 2 * g * ilu._irm_terms(forward(target), target["labels"])[0] / n)
        return g * g
    for c in chunks(target):
        s, _ = ilu._irm_terms(logits_of(target, c), target["labels"][c])
        backward(lam * 2 * g * s / n)
    return g * g


def unlearn(model, forget: Sequence[Mapping], retain: Sequence[Mapping], method: str = "npo",
            envs: Mapping[str, Sequence[Mapping]] | None = None, lam: float = 1.0, *, steps: int | None = None,
            batch_size: int = 1, grad_accum: int = 4, env_batch_size: int = 48, env_micro_batch: int | None = None,
            env_grad_batch: int | None = None, lr: float = 1e-5, warmup: float = 0.1, weight_decay: float = 0.0,
            max_grad_norm: float | None = 1.0, beta: float = 0.1, gamma: float = 1.0, rmu_layer: int = 7,
            rmu_coeff: float = 6.5, rmu_alpha: float = 1200.0, stop_forget_nll: float | None = None,
            stop: Callable[[int], bool] | None = None, low_memory: str | None = None, seed: int = 0,
            progress: bool = True, log: Callable[[str], None] | None = None) -> list[dict]:
    """ilu.unlearn on a sharded model (each rank its rows, the penalty's g summed over the ranks) or,
    with low_memory ("8bit", "4bit", "full"), with one packed forward and one backward a step and the
    optimizer inside it (`Updater`). Anything else: ilu.unlearn itself. Same arguments, same history."""
    if not low_memory and not is_sharded(model):
        return ilu.unlearn(model, forget, retain, method, envs, lam, steps=steps, batch_size=batch_size,
                           grad_accum=grad_accum, env_batch_size=env_batch_size, env_micro_batch=env_micro_batch,
                           env_grad_batch=env_grad_batch, lr=lr, warmup=warmup, weight_decay=weight_decay,
                           max_grad_norm=max_grad_norm, beta=beta, gamma=gamma, rmu_layer=rmu_layer,
                           rmu_coeff=rmu_coeff, rmu_alpha=rmu_alpha, stop_forget_nll=stop_forget_nll, stop=stop,
                           seed=seed, progress=progress and is_main(), log=log)
    envs = ilu._checked_envs(method, forget, retain, envs, lam, batch_size, grad_accum, env_batch_size,
                             env_grad_batch, stop_forget_nll)
    steps = steps or math.ceil(len(forget) / (batch_size * grad_accum))
    log = log or (tqdm.write if progress and is_main() else (lambda line: None))
    device = _mine(next(model.parameters())).device
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout, if the architecture has any
    f_sampler, r_sampler = ilu._Sampler(len(forget), gen), ilu._Sampler(len(retain), gen)
    e_samplers = {k: ilu._Sampler(len(v), gen) for k, v in envs.items()}
    was_trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    terms, params, weight = _method(model, method, forget, device, beta, gamma, rmu_layer, rmu_coeff, rmu_alpha,
                                    seed, log)
    opt, forward = Updater(params, lr, weight_decay, seed, max_grad_norm, low_memory), ilu._forward(model)
    pieces = _plan_pieces(model, grad_accum, batch_size, envs, env_batch_size, env_grad_batch)
    model.train()
    history, bar = [], tqdm(range(steps), desc=f"unlearn {method}{' + ILU' if envs else ''}",
                            disable=not progress or not is_main())
    try:
        for step in bar:
            t0 = time.perf_counter()
            _reshard(model)
            f_sum = r_sum = nll_sum = nll_tokens = 0.0
            draws = [(f_sampler.take(batch_size), r_sampler.take(batch_size)) for _ in range(grad_accum)]
            micro = _my_micro_batches(model, forget, retain, draws, pieces, SHARE_OF[method], device)   # lazily
            env_batches = ilu._env_batches(envs, e_samplers, env_batch_size, env_grad_batch, device)
            micro, one = _pack_step(model, micro, env_batches) if low_memory and method != "rmu" else (micro, None)
            for fb, rb, f_idx, f_share, r_share in micro:
                f_term, r_term, nll = terms(one or forward, fb, rb, f_idx)   # the method's loss, term by term
                f_term, r_term = f_term * f_share, r_term * r_share     # this rank's part (one process: 1)
                opt.backward((f_term + weight * r_term) / grad_accum)
                f_sum, r_sum = f_sum + f_term.item() / grad_accum, r_sum + r_term.item() / grad_accum
                if nll is not None:
                    nll_sum, nll_tokens = nll_sum + nll[0], nll_tokens + nll[1]
            f_sum, r_sum, nll_sum, nll_tokens = _sum_over_ranks(model, f_sum, r_sum, nll_sum, nll_tokens)
            irm = sum((_irm_backward(model, eb, lam, env_micro_batch, gb, opt.backward, one)
                       for eb, gb in env_batches), 0.0)
            if not all(math.isfinite(x) for x in (f_sum, r_sum, irm)):
                raise ILUError(f"non-finite loss at step {step + 1} (forget {f_sum}, retain {r_sum}, "
                               f"irm {irm}): lower the learning rate or lam")
            cur_lr = ilu.lr_at(step, steps, lr, int(warmup * steps))
            opt.step(cur_lr)
            history.append(ilu._step_record(step + 1, steps, f_sum, r_sum, irm, cur_lr, t0, nll_sum, nll_tokens, log))
            if stop_forget_nll is not None and nll_tokens and nll_sum / nll_tokens >= stop_forget_nll:
                log(f"stop: the forget batch's NLL {nll_sum / nll_tokens:.3f} nats/token reached {stop_forget_nll}")
                break
            if stop is not None:                             # a caller's stop rule, asked in eval mode
                model.eval()
                if stop(step + 1):
                    break
                model.train()
    finally:
        opt.close()
        _reshard(model)
        for n, p in model.named_parameters():
            p.requires_grad_(was_trainable[n])
        model.eval()
    return history


def finetune(model, data: Sequence[Mapping], epochs: float = 1, *, batch_size: int = 8,
             grad_accum: int = 1, lr: float = 2e-5, warmup: int = 0, weight_decay: float = 0.0,
             max_grad_norm: float | None = 1.0, max_steps: int | None = None,
             hook: Callable[[int, float], None] | None = None, hook_steps: Iterable[int] = (),
             hook_each_epoch: bool = True, decay: bool = False, low_memory: str | None = None, seed: int = 0,
             progress: bool = True, desc: str = "finetune") -> list[float]:
    """ilu.finetune on a sharded model (each rank its rows of every batch) or with low_memory (as in
    `unlearn`: one packed forward and one backward a step, the optimizer inside it). Anything else:
    ilu.finetune itself. Same arguments, same losses."""
    if not low_memory and not is_sharded(model):
        return ilu.finetune(model, data, epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=warmup,
                            weight_decay=weight_decay, max_grad_norm=max_grad_norm, max_steps=max_steps, hook=hook,
                            hook_steps=hook_steps, hook_each_epoch=hook_each_epoch, decay=decay, seed=seed,
                            progress=progress and is_main(), desc=desc)
    if isinstance(data, Sequence) and len(data) == 0:
        raise ILUError("the fine-tuning set is empty")
    ilu._check_examples(data, "finetune: data")
    device = _mine(next(model.parameters())).device
    mine = _my_rows(model, batch_size, "fine-tuning batch")      # sharded: this rank's rows of each batch
    per_epoch = max(1, math.ceil(len(data) / (batch_size * grad_accum)))
    total = max_steps or max(1, round(epochs * per_epoch))
    hook_steps = set(hook_steps)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sampler = ilu._Sampler(len(data), gen)
    _reshard(model)
    for p in model.parameters():
        p.requires_grad_(True)
    opt, forward = Updater(model.parameters(), lr, weight_decay, seed, max_grad_norm, low_memory), ilu._forward(model)
    model.train()
    losses = []
    bar = tqdm(range(total), desc=desc, disable=not progress or not is_main())
    try:
        for step in bar:
            _reshard(model)
            step_loss = 0.0
            batches = [ilu.collate([data[i] for i in sampler.take(batch_size)], device) for _ in range(grad_accum)]
            mine_of = [_rows(b, mine) for b in batches]                             # sharded: this rank's rows
            fwd = _one_forward(model, mine_of) if low_memory and grad_accum > 1 else forward   # low memory
            for b, part in zip(batches, mine_of):
                loss = ilu._nll(fwd, part) * _share(b, mine, [], "tokens")          # sharded: this rank's part
                opt.backward(loss / grad_accum)
                step_loss += loss.item() / grad_accum
            step_loss = _sum_over_ranks(model, step_loss)[0]
            if not math.isfinite(step_loss):
                raise ILUError(f"non-finite fine-tuning loss at step {step + 1}: lower the learning rate")
            opt.step(ilu.lr_at(step, total, lr, warmup, decay=decay))
            losses.append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            done = step + 1
            if hook and (done in hook_steps or (hook_each_epoch and (done % per_epoch == 0 or done == total))):
                model.eval()
                hook(done, done / per_epoch)
                model.train()
    finally:
        opt.close()
        model.eval()
    return losses
