"""Peak memory and time of one NPO+ILU step and one RMU step (random weights, no download).

    python benchmarks/step_memory.py                  # Mistral-7B shape, bf16, one GPU
    python benchmarks/step_memory.py --shape tiny     # the same code path on a CPU, seconds

The 7B shape needs a GPU with about 80 GB; the numbers it prints go in README "Memory plan".
Both steps use ilu.unlearn exactly as the runners do: bf16 weights, gradient checkpointing,
AdamWSR, NPO with cached reference log-probs, RMU training three down-projections.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ilu  # noqa: E402

SHAPES = {  # Mistral-7B-v0.1 / Zephyr-7B-beta: 7,241,732,096 parameters
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
}


def random_examples(n, length, vocab, seed, answer_from=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * answer_from + ids[answer_from:]})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq-len", type=int, default=1024, help="NPO forget/retain length (paper: 1024)")
    ap.add_argument("--env-batch", type=int, default=48, help="GSM8K examples per step (paper: 48)")
    ap.add_argument("--env-len", type=int, default=256, help="tokens per GSM8K example (question + answer)")
    ap.add_argument("--env-micro-batch", type=int, default=None, help="chunk the env batch (memory)")
    ap.add_argument("--rmu-len", type=int, default=512, help="RMU forget/retain length (WMDP: 512)")
    args = ap.parse_args()
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(**SHAPES[args.shape])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(args.device):
        model = MistralForCausalLM(cfg).to(torch.bfloat16)
    ilu.enable_checkpointing(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.shape}: {n_params:,} parameters, bf16, on {args.device} ({time.perf_counter() - t0:.0f} s to build)")
    cuda = args.device.startswith("cuda")
    V = cfg.vocab_size

    def measure(name, **kw):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        hist = ilu.unlearn(model, progress=False, log=lambda s: None, steps=2, **kw)
        if cuda:
            torch.cuda.synchronize()
        peak = f"{torch.cuda.max_memory_allocated() / 2 ** 30:6.1f} GiB" if cuda else "n/a (CPU)"
        # step 1 includes the optimizer's state allocation; step 2 is the steady state
        print(f"{name:<34} peak {peak} | step 1 {hist[0]['ms'] / 1000:6.2f} s | "
              f"step 2 {hist[1]['ms'] / 1000:6.2f} s")

    forget = random_examples(8, args.seq_len, V, 1)
    retain = random_examples(8, args.seq_len, V, 2)
    env = random_examples(args.env_batch, args.env_len, V, 3, answer_from=args.env_len // 2)
    measure(f"NPO + ILU(GSM8K), 1x4 + {args.env_batch}", forget=forget, retain=retain, method="npo", envs={"gsm8k": env},
            lam=1.0, batch_size=1, grad_accum=4, env_batch_size=args.env_batch,
            env_micro_batch=args.env_micro_batch, lr=1e-5)
    rf, rr = random_examples(8, args.rmu_len, V, 4), random_examples(8, args.rmu_len, V, 5)
    layer = min(7, cfg.num_hidden_layers - 2)
    measure(f"RMU (layer {layer}), batch 4", forget=rf, retain=rr, method="rmu", batch_size=4, grad_accum=1,
            lr=5e-5, rmu_layer=layer, max_grad_norm=None)


if __name__ == "__main__":
    main()
