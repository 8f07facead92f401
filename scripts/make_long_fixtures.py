#!/usr/bin/env python3
"""Reference outputs of `transformers` at 32,768 positions, for the engine's
long-context test: two fixture models with the rope settings of the released
LongWriter bases (Llama 3.1: theta 500000 with `llama3` scaling over an
original 8192 positions; GLM-4: theta 10000 × rope_ratio 500, half of each
head rotated), context 32,768.

A prompt of 32,739 tokens, prefilled in chunks through the KV cache (the
full score matrix at this length would not fit in memory), then greedy
decoding until the context is full: 29 tokens, the last one never fed.
The weights are the committed fixtures'; only config.json differs, and the
test rewrites it the same way.

    python scripts/make_long_fixtures.py tests/fixtures
"""

import json
import os
import shutil
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

CONTEXT = 32768
PROMPT = 32739
CHUNK = 1024

OVERRIDES = {
    "llama31-tied-rope-scaling": {
        "max_position_embeddings": CONTEXT,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
    "glm4": {
        "max_position_embeddings": CONTEXT,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "partial_rotary_factor": 0.5},
    },
}


def prompt_ids(vocab):
    # The same sequence the Rust test computes.
    return [(i * 7919 + 13) % vocab for i in range(PROMPT)]


def main(root):
    out = {}
    for name, override in OVERRIDES.items():
        src = os.path.join(root, "models", name)
        with tempfile.TemporaryDirectory() as tmp:
            for f in os.listdir(src):
                shutil.copy(os.path.join(src, f), tmp)
            with open(os.path.join(tmp, "config.json")) as f:
                cfg = json.load(f)
            cfg.update(override)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(cfg, f)
            model = AutoModelForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32)
            model.eval()
        ids = prompt_ids(cfg["vocab_size"])
        past = None
        with torch.no_grad():
            for start in range(0, len(ids), CHUNK):
                chunk = torch.tensor([ids[start : start + CHUNK]])
                res = model(chunk, past_key_values=past, use_cache=True)
                past = res.past_key_values
            first = res.logits[0, -1]
            tokens, last = [], None
            nxt = int(first.argmax())
            while len(ids) + len(tokens) < CONTEXT:
                tokens.append(nxt)
                res = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past = res.past_key_values
                last = res.logits[0, -1]
                nxt = int(last.argmax())
            tokens.append(nxt)
        out[name] = dict(
            config=override,
            prompt_len=PROMPT,
            first_logits=[round(float(v), 6) for v in first],
            last_logits=[round(float(v), 6) for v in last],
            greedy_tokens=tokens,
        )
        print(f"{name}: {len(tokens)} greedy tokens to fill {CONTEXT} positions", flush=True)
    with open(os.path.join(root, "long-context.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
