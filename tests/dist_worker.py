"""Run under `torchrun --nproc-per-node 2` by tests/test_distributed.py (gloo, CPU, fp32).

Every rank builds the same tiny model twice: one copy sharded with FSDP2 (scale.shard), one
left whole, which trains exactly as a single process does. Each check runs the same step on
both with the same global batch and writes, from rank 0, what it measured to the JSON file
named on the command line: the largest absolute differences of losses, penalties and
updated parameters, and equality of predictions and generations."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
import ilu  # noqa: E402
import ilu_scale as scale  # noqa: E402
import runlib  # noqa: E402
from conftest import model_for, tiny_llama, token_pairs, token_texts  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402


def full_params(model) -> dict:
    if not scale.is_sharded(model):
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (a.keys() ^ b.keys())
    return max(float((a[n].float() - b[n].float()).abs().max()) for n in a)


def pair(seed=0, layers=4):
    whole, sharded = tiny_llama(layers, seed), tiny_llama(layers, seed)
    return whole, scale.shard(sharded, "cpu")


def unlearn_check(method, **kw):
    f, r = token_texts(8, 3, 50, 8, 0), token_texts(8, 50, 97, 8, 1)
    envs = {"a": token_pairs(16, 2), "b": token_pairs(16, 3)}
    args = dict(envs=envs, lam=1.0, steps=2, env_batch_size=4, lr=1e-3, progress=False, log=lambda s: None, seed=0)
    args.update(kw)
    whole, sharded = pair()
    before = full_params(whole)
    h1 = scale.unlearn(whole, f, r, method, **args)
    h2 = scale.unlearn(sharded, f, r, method, **args)
    p1, p2 = full_params(whole), full_params(sharded)
    return dict(
        loss_diff=max(abs(a[k] - b[k]) for a, b in zip(h1, h2) for k in ("forget", "retain", "irm")),
        irm_rel=max(abs(a["irm"] - b["irm"]) / max(abs(a["irm"]), 1e-30) for a, b in zip(h1, h2)),
        irm=[a["irm"] for a in h1], param_diff=max_diff(p1, p2), moved=max_diff(p1, before))


def penalty_check():
    """The global penalty against a mean of per-rank penalties: the loop must give the former."""
    whole, sharded = pair()
    env = token_pairs(8, 5)
    b = ilu.collate(env)
    with torch.no_grad():
        logits = whole(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    global_pen = float(ilu.irm_penalty(logits, b["labels"]))
    half = [float(ilu.irm_penalty(logits[i:i + 4], b["labels"][i:i + 4])) for i in (0, 4)]
    got = scale._irm_backward(sharded, b, 1.0, None)
    return dict(global_penalty=global_pen, mean_of_rank_penalties=sum(half) / 2, sharded=got)


def finetune_check():
    whole, sharded = pair()
    data = token_pairs(24, 4)
    probe = ilu.collate(data[:3])
    seen = {id(whole): [], id(sharded): []}

    def hook_of(model):                                # an evaluation between steps, as the runners do
        def hook(step, epoch):
            with torch.no_grad():
                seen[id(model)].append(float(model(input_ids=probe["input_ids"]).logits.float().sum()))
        return hook

    l1, l2 = (scale.finetune(m, data, max_steps=3, batch_size=4, grad_accum=2, lr=1e-3, progress=False,
                           hook=hook_of(m), hook_steps=[1, 2]) for m in (whole, sharded))
    return dict(loss_diff=max(abs(a - b) for a, b in zip(l1, l2)), hook_outputs=[seen[id(whole)], seen[id(sharded)]],
                param_diff=max_diff(full_params(whole), full_params(sharded)))


def eval_check(tmp: Path):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    texts = [" ".join(words[(i * 7 + j) % 12] for j in range(12)) for i in range(40)]
    tok = runlib.train_tokenizer(texts, vocab_size=300)
    whole, sharded = model_for(tok, layers=2, seed=1, init=0.5), model_for(tok, layers=2, seed=1, init=0.5)
    scale.shard(sharded, "cpu")
    qs = [dict(question=" ".join(words[i % 12:i % 12 + 4]), choices=words[i % 8:i % 8 + 4], answer=i % 4,
               subject="biology") for i in range(12)]
    a1, p1 = ilu.mc_accuracy(whole, tok, qs, return_predictions=True, batch_size=5, progress=False)
    a2, p2 = ilu.mc_accuracy(sharded, tok, qs, return_predictions=True, batch_size=5, progress=False)
    g1 = ilu.generate(whole, tok, texts[:5], max_new_tokens=6, batch_size=2, progress=False)
    g2 = ilu.generate(sharded, tok, texts[:5], max_new_tokens=6, batch_size=2, progress=False)
    m1 = ilu.min_k_scores(whole, tok, texts[:6], progress=False)
    m2 = ilu.min_k_scores(sharded, tok, texts[:6], progress=False)
    # save the whole model, load it sharded (rank 0 reads, the others start on the meta device)
    folder = tmp / "saved"
    if scale.is_main():
        whole.save_pretrained(folder)
        tok.save_pretrained(folder)
    dist.barrier()
    loaded, _ = scale.load_model(str(folder), "float32", "cpu", sharded=True)
    x = torch.tensor([tok("alpha beta gamma delta")["input_ids"]])
    with torch.no_grad():
        z1, z3 = whole(input_ids=x).logits, loaded(input_ids=x).logits
    # save_model of the sharded copy after a fine-tuning step: the file equals the whole model's
    data = ilu.encode_pairs(tok, [dict(prompt=t[:20], answer=t[20:40]) for t in texts[:8]], max_length=64)
    for m in (whole, sharded):
        scale.finetune(m, data, max_steps=1, batch_size=4, lr=1e-3, progress=False)
    scale.save_model(sharded, tok, tmp / "saved_sharded")
    from transformers import AutoModelForCausalLM
    reread = {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(tmp / "saved_sharded").named_parameters()}
    # task vectors from rank shards, summed across ranks, against the whole model's
    theta_w, theta_s = scale.state_of(whole), scale.state_of(sharded)
    start = {n: p.detach().clone() for n, p in model_for(tok, layers=2, seed=1, init=0.5).named_parameters()}
    start_local = {n: scale.local_part(sharded, n, t) for n, t in start.items()}
    c1 = ilu.cosine(ilu.task_vector(theta_w, start), ilu.task_vector(theta_w, {n: t * 0 for n, t in start.items()}))
    c2 = scale.cosine(ilu.task_vector(theta_s, start_local),
                    ilu.task_vector(theta_s, {n: t * 0 for n, t in start_local.items()}), across_ranks=True)
    return dict(acc=[a1, a2], preds_equal=p1 == p2, generations_equal=g1 == g2,
                min_k_diff=max(abs(a - b) for a, b in zip(m1, m2)),
                loaded_logit_diff=float((z1 - z3).abs().max()),
                saved_diff=max_diff({n: p.detach() for n, p in whole.named_parameters()}, reread),
                cos=[c1, c2], norm=[ilu.norm(ilu.task_vector(theta_w, start)),
                                    scale.norm(ilu.task_vector(theta_s, start_local), across_ranks=True)])


def main():
    out, tmp = Path(sys.argv[1]), Path(sys.argv[2])
    scale.init_distributed()
    torch.manual_seed(0)
    res = dict(world=dist.get_world_size(),
               npo_ilu_micro_split=unlearn_check("npo", batch_size=1, grad_accum=2),
               npo_ilu_row_split=unlearn_check("npo", batch_size=2, grad_accum=2),
               npo_ilu_env_micro=unlearn_check("npo", batch_size=2, grad_accum=1, env_micro_batch=1),
               npo_ilu_split_estimator=unlearn_check("npo", batch_size=2, grad_accum=1, env_grad_batch=2),
               graddiff_ilu=unlearn_check("graddiff", batch_size=2, grad_accum=1),
               rmu_ilu=unlearn_check("rmu", batch_size=4, grad_accum=1, rmu_layer=2, lr=1e-2, max_grad_norm=None),
               penalty=penalty_check(), finetune=finetune_check(), eval=eval_check(tmp))
    if scale.is_main():
        out.write_text(json.dumps(res, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
