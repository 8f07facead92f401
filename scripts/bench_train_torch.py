#!/usr/bin/env python3
"""Training throughput of PyTorch for a model config, the reference that
`longwriter train` is compared with: same config, same batch shape, same
thread count, AdamW, gradient clipping, random tokens.

    python scripts/bench_train_torch.py --config DIR/config.json --batch 8 --seq-len 256 --threads 2

Prints one JSON line: {"tokens_per_s": ..., ...}.
"""

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with open(a.config) as f:
        cfg = LlamaConfig(**json.load(f))
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq_len + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def step():
        opt.zero_grad()
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(a.warmup):
        step()
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    dt = time.perf_counter() - t
    tokens = a.steps * a.batch * a.seq_len
    print(json.dumps({"engine": "torch", "tokens_per_s": tokens / dt, "threads": a.threads,
                      "batch": a.batch, "seq_len": a.seq_len, "steps": a.steps}))


if __name__ == "__main__":
    main()
