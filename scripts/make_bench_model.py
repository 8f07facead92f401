#!/usr/bin/env python3
"""Writes a random-weight Llama-family checkpoint of a real model's shape,
for speed benchmarks (never committed): config.json, model.safetensors (f16)
and a synthetic byte-level BPE tokenizer of the right vocabulary size.

    python3 scripts/make_bench_model.py llama-3.2-1b OUT_DIR
    python3 scripts/make_bench_model.py smollm2-135m OUT_DIR
    python3 scripts/make_bench_model.py qwen3-0.6b OUT_DIR
    python3 scripts/make_bench_model.py gemma-3-1b OUT_DIR
    python3 scripts/make_bench_model.py qwen3-moe OUT_DIR

Only numpy is needed. Then `longwriter convert OUT_DIR -o m.gguf --type q4_k_m`.
"""

import json
import struct
import sys
from pathlib import Path

import numpy as np

SHAPES = {
    # Llama-3.2-1B: 16 layers, GQA 32/8, tied embeddings, Llama 3.1 rope.
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    # SmolLM2-135M: 30 layers, GQA 9/3, tied embeddings.
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    # Qwen3-0.6B: 28 layers, GQA 16/8, head size 128 (not hidden/heads),
    # per-head q/k norms, tied embeddings.
    "qwen3-0.6b": dict(
        model_type="qwen3",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        max_position_embeddings=40960,
    ),
    # Qwen3-30B-A3B's proportions scaled to fit 24 GiB: 16 layers (of 48),
    # 64 experts of 768 (of 128), 8 active, GQA 32/4 with heads of 128,
    # q/k norms, an untied output matrix.
    "qwen3-moe": dict(
        model_type="qwen3_moe",
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=64,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=151936,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        max_position_embeddings=40960,
    ),
    # Gemma-3-1B: 26 layers, 4 query heads over one kv head of 256, five
    # sliding layers (window 512, base 10k) per full one (base 1M), Gemma's
    # four norms per layer, q/k norms, GeGLU, a 262k vocabulary.
    "gemma-3-1b": dict(
        model_type="gemma3_text",
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        vocab_size=262144,
        query_pre_attn_scalar=256,
        sliding_window=512,
        hidden_activation="gelu_pytorch_tanh",
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        layer_types=["full_attention" if (l + 1) % 6 == 0 else "sliding_attention" for l in range(26)],
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    ),
}

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def byte_alphabet():
    """The byte-level BPE alphabet: printable bytes map to themselves, the
    rest to code points from 256 up, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def tokenizer(vocab_size, rng):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tokens = byte_alphabet()
    seen = set(tokens)
    merges = []
    target = vocab_size - len(specials)
    while len(tokens) < target:
        # Merge two existing tokens; short ones are favoured so the
        # vocabulary looks like a real one (most tokens 2-8 bytes).
        a = tokens[int(rng.integers(0, min(len(tokens), 4096)))]
        b = tokens[int(rng.integers(0, min(len(tokens), 4096)))]
        t = a + b
        if t in seen:
            continue
        seen.add(t)
        tokens.append(t)
        merges.append(f"{a} {b}")
    vocab = {t: i for i, t in enumerate(tokens)}
    added = [
        dict(id=len(tokens) + i, content=s, single_word=False, lstrip=False,
             rstrip=False, normalized=False, special=True)
        for i, s in enumerate(specials)
    ]
    byte_level = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=True)
    return dict(
        version="1.0", truncation=None, padding=None, added_tokens=added,
        normalizer=None, pre_tokenizer=byte_level, post_processor=None,
        decoder=byte_level,
        model=dict(type="BPE", dropout=None, unk_token=None,
                   continuing_subword_prefix=None, end_of_word_suffix=None,
                   fuse_unk=False, byte_fallback=False, vocab=vocab, merges=merges),
    ), specials


def tensors(cfg):
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    kind = cfg["model_type"]
    yield "model.embed_tokens.weight", (cfg["vocab_size"], h)
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}"
        yield f"{p}.input_layernorm.weight", (h,)
        yield f"{p}.self_attn.q_proj.weight", (q, h)
        yield f"{p}.self_attn.k_proj.weight", (kv, h)
        yield f"{p}.self_attn.v_proj.weight", (kv, h)
        yield f"{p}.self_attn.o_proj.weight", (h, q)
        if kind in ("qwen3", "qwen3_moe", "gemma3_text"):
            yield f"{p}.self_attn.q_norm.weight", (hd,)
            yield f"{p}.self_attn.k_norm.weight", (hd,)
        yield f"{p}.post_attention_layernorm.weight", (h,)
        if kind == "gemma3_text":
            yield f"{p}.pre_feedforward_layernorm.weight", (h,)
            yield f"{p}.post_feedforward_layernorm.weight", (h,)
        if kind == "qwen3_moe":
            mi = cfg["moe_intermediate_size"]
            yield f"{p}.mlp.gate.weight", (cfg["num_experts"], h)
            for e in range(cfg["num_experts"]):
                yield f"{p}.mlp.experts.{e}.gate_proj.weight", (mi, h)
                yield f"{p}.mlp.experts.{e}.up_proj.weight", (mi, h)
                yield f"{p}.mlp.experts.{e}.down_proj.weight", (h, mi)
            continue
        yield f"{p}.mlp.gate_proj.weight", (i, h)
        yield f"{p}.mlp.up_proj.weight", (i, h)
        yield f"{p}.mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    if not cfg["tie_word_embeddings"]:
        yield "lm_head.weight", (cfg["vocab_size"], h)


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in SHAPES:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(SHAPES)}}} OUT_DIR")
    shape, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    cfg = dict(dict(model_type="llama", rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None,
                    torch_dtype="float16"), **SHAPES[shape])
    cfg["architectures"] = [ARCHITECTURES[cfg["model_type"]]]
    tok, specials = tokenizer(cfg["vocab_size"], rng)
    n = cfg["vocab_size"] - len(specials)
    cfg["bos_token_id"], cfg["eos_token_id"] = n, n + 1
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(
        dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=specials[0], eos_token=specials[1],
             model_max_length=cfg["max_position_embeddings"])))
    header, offset = {}, 0
    for name, dims in tensors(cfg):
        size = int(np.prod(dims)) * 2
        header[name] = dict(dtype="F16", shape=list(dims), data_offsets=[offset, offset + size])
        offset += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name, dims in tensors(cfg):
            if len(dims) == 1:
                # Gemma's norms scale by 1 + w: the same unit scale.
                one = 0.0 if cfg["model_type"] == "gemma3_text" else 1.0
                w = np.full(dims, one, dtype=np.float16)
            else:
                w = (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float16)
            f.write(w.tobytes())
    print(f"wrote {out} ({shape}, {offset / 1e9:.2f} GB of f16 weights)")


if __name__ == "__main__":
    main()
