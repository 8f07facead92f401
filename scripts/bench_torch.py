#!/usr/bin/env python3
"""Prefill and decode speed of `longwriter bench` against PyTorch
`transformers` on the same model, same thread count, same machine, same run.

    python scripts/bench_torch.py --make-model /tmp/smollm2-shape --dtype f32
    python scripts/bench_torch.py --model /tmp/smollm2-shape --threads 2

`--make-model DIR` first writes a random-weight model shaped like
SmolLM2-135M (hidden 576, 30 layers, 9 heads, 3 kv heads, intermediate 1536,
vocab 49152, tied embeddings) in the given dtype. Needs torch and
transformers (scripts/requirements-ref.txt) and a release build of longwriter.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def make_model(out, dtype):
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=DTYPES[dtype])
    model.save_pretrained(out, safe_serialization=True)
    # Any tokenizer will do for speed: ids are random. A smaller tokenizer than
    # the embedding is allowed (the sampler never picks ids beyond it).
    src = os.path.join(ROOT, "tests", "fixtures", "models", "llama3-untied")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, name), os.path.join(out, name))
    print(f"wrote {out} ({dtype})", file=sys.stderr)


def torch_bench(model_dir, threads, prompt_tokens, gen_tokens, runs, dtype):
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=DTYPES[dtype])
    model.eval()
    g = torch.Generator().manual_seed(42)
    ids = torch.randint(1, 640, (1, prompt_tokens), generator=g)
    prefill, decode = [], []
    with torch.inference_mode():
        for i in range(runs + 1):
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            t1 = time.perf_counter()
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            for _ in range(gen_tokens - 1):
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
            t3 = time.perf_counter()
            if i > 0:
                prefill.append(prompt_tokens / (t1 - t0))
                decode.append((gen_tokens - 1) / (t3 - t2))
            print(f"torch run {i}: prefill {prefill[-1] if i else prompt_tokens / (t1 - t0):.1f} tok/s, "
                  f"decode {decode[-1] if i else (gen_tokens - 1) / (t3 - t2):.1f} tok/s", file=sys.stderr)
    return statistics.median(prefill), statistics.median(decode)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory to measure")
    ap.add_argument("--make-model", help="write a SmolLM2-135M-shaped random model here, then measure it")
    ap.add_argument("--dtype", default="f32", choices=sorted(DTYPES), help="checkpoint dtype (with --make-model) and torch compute dtype")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--longwriter", default=os.path.join(ROOT, "target", "release", "longwriter"))
    args = ap.parse_args()
    model_dir = args.model or args.make_model
    if not model_dir:
        ap.error("--model or --make-model is required")
    if args.make_model:
        make_model(args.make_model, args.dtype)

    cmd = [args.longwriter, "bench", "--model", model_dir, "--threads", str(args.threads),
           "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
           "--runs", str(args.runs), "--json"]
    ours = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    tp, td = torch_bench(model_dir, args.threads, args.prompt_tokens, args.gen_tokens, args.runs, args.dtype)
    result = {
        "model": model_dir,
        "dtype": args.dtype,
        "threads": args.threads,
        "longwriter": {k: ours[k] for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_mb", "weight_dtype")},
        "torch": {"prefill_tok_s": tp, "decode_tok_s": td, "version": torch.__version__},
        "prefill_ratio": ours["prefill_tok_s"] / tp,
        "decode_ratio": ours["decode_tok_s"] / td,
    }
    print(json.dumps(result, indent=2))
    print(f"decode: longwriter {ours['decode_tok_s']:.1f} tok/s vs torch {td:.1f} tok/s = {result['decode_ratio']:.2f}x; "
          f"prefill: {ours['prefill_tok_s']:.1f} vs {tp:.1f} = {result['prefill_ratio']:.2f}x")


if __name__ == "__main__":
    main()
