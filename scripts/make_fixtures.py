#!/usr/bin/env python3
"""Build tiny random-weight Llama-family models and the reference outputs of
Hugging Face `transformers` for them.

The Rust tests load the same model directories and must reproduce these
outputs (f32 logits within 1e-4, identical greedy tokens, identical chat
prompts and token ids). Run it once in a venv with the pinned versions in
`scripts/requirements-ref.txt`; the outputs are committed, so CI needs no
Python for them:

    python scripts/make_fixtures.py tests/fixtures
"""

import json
import os
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    Glm4Config,
    GlmConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
    MixtralConfig,
    Phi3Config,
    Gemma3TextConfig,
    Gemma2Config,
)

# A small bilingual corpus so the tokenizer has real merges for English,
# Chinese and emoji text.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. A long document is planned as paragraphs.",
    "Each paragraph has a main point and a word budget; the writer follows the plan step by step.",
    "Long-context models can read a hundred thousand tokens but write only two thousand words.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his cat.",
    "Write a 10000-word guide to the history of the printing press, with examples and sources.",
    "长文本生成需要先规划段落，再逐段写作，每一段都能看到前面已经写好的全部内容。",
    "请写一篇一万字的文章，介绍中国古代造纸术的发展历史以及它对世界文明的影响。",
    "今天天气很好，我们去公园散步，看到了许多美丽的花和在湖边游泳的鸭子。",
    "Emoji are text too: 😀 🎉 🚀 ❤️ — and so are accents: café, naïve, façade, jalapeño.",
    "Numbers and code: 3.14159, 2024-08-14, x = f(y) + 42; if (a < b) { return c; }",
]

PROMPT = "Once upon a time, 在一个小村庄里 there lived a writer 😀 who planned"

CONVERSATIONS = [
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [
        {"role": "system", "content": "  You are a careful writer.  "},
        {"role": "user", "content": "请写一段关于秋天的文字。"},
    ],
    [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": " Hi, how can I help? "},
        {"role": "user", "content": "Plan a 5000-word essay on rivers."},
    ],
]

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- if system_message %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

INST_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- set ns = namespace(sys=message['content'].strip()) %}"
    "{%- elif (message['role'] == 'user') != ((loop.index0 - (1 if messages[0]['role'] == 'system' else 0)) % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- elif message['role'] == 'user' %}"
    "{{- '[INST] ' + message['content'].strip() + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'].strip() + eos_token }}"
    "{%- else %}{{- raise_exception('Unknown role: ' + message['role'].upper()) }}"
    "{%- endif %}"
    "{%- endfor %}"
)

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# GLM-4's turn markers: `[gMASK]<sop>`, then `<|role|>` + newline + content per
# message; the generation prompt is a bare `<|assistant|>`.
GLM4_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
)

# Qwen3's turn markers are ChatML's; with `enable_thinking` false the
# generation prompt carries an empty thinking block, so the model answers
# at once.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# One tokenizer layout per template family: special tokens, bos/eos, and
# whether a BOS is prepended when encoding raw text.
FAMILIES = {
    "llama3": dict(
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        add_bos=True,
        template=LLAMA3_TEMPLATE,
    ),
    "inst": dict(
        specials=["<unk>", "<s>", "</s>"],
        bos="<s>",
        eos="</s>",
        add_bos=True,
        template=INST_TEMPLATE,
    ),
    "glm4": dict(
        specials=[
            "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
            "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
        ],
        bos=None,
        eos="<|endoftext|>",
        add_bos=False,
        template=GLM4_TEMPLATE,
    ),
    "qwen3": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        bos=None,
        eos="<|im_end|>",
        add_bos=False,
        template=QWEN3_TEMPLATE,
    ),
    "chatml": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None,
        eos="<|im_end|>",
        add_bos=False,
        template=CHATML_TEMPLATE,
    ),
}


def train_tokenizer(family):
    spec = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640,
        special_tokens=spec["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    if spec["add_bos"]:
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def save_tokenizer(tok, family, out):
    spec = FAMILIES[family]
    tok.save(os.path.join(out, "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": spec["bos"],
        "eos_token": spec["eos"],
        "chat_template": spec["template"],
        "model_max_length": 256,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    return PreTrainedTokenizerFast.from_pretrained(out)


MODELS = {
    # name: (family, config class, config kwargs)
    "llama3-untied": (
        "llama3",
        LlamaConfig,
        dict(rope_theta=500000.0, tie_word_embeddings=False),
    ),
    "llama31-tied-rope-scaling": (
        "llama3",
        LlamaConfig,
        dict(
            rope_theta=500000.0,
            tie_word_embeddings=True,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "llama2-head-dim": (
        "inst",
        LlamaConfig,
        dict(rope_theta=10000.0, tie_word_embeddings=False, head_dim=24),
    ),
    "mistral": (
        "inst",
        MistralConfig,
        dict(rope_theta=1000000.0, tie_word_embeddings=False, sliding_window=4096),
    ),
    "qwen2": (
        "chatml",
        Qwen2Config,
        dict(rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False),
    ),
    # Qwen3: per-head q/k norms, an explicit head size unlike hidden/heads,
    # no biases, an odd number of query heads over one kv head.
    "qwen3": (
        "qwen3",
        Qwen3Config,
        dict(
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            head_dim=24,
            num_attention_heads=3,
            num_key_value_heads=1,
            use_sliding_window=False,
        ),
    ),
    # GLM-4-0414: GLM-4's layout plus norms after attention and after the
    # MLP.
    "glm4-0414": (
        "glm4",
        Glm4Config,
        dict(
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
            head_dim=16,
            attention_bias=True,
            tie_word_embeddings=False,
            pad_token_id=0,
        ),
    ),
    # Phi-3: q, k, v fused in qkv_proj, gate and up in gate_up_proj, three
    # quarters of each head rotated (as Phi-4-mini).
    "phi3": (
        "chatml",
        Phi3Config,
        dict(
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.75),
            tie_word_embeddings=False,
            sliding_window=None,
            pad_token_id=0,
        ),
    ),
    # Phi-3 with LongRoPE (Phi-3-mini-128k, Phi-3.5, Phi-4-mini): per
    # frequency factors, the long ones since the prompt is longer than the
    # pretrained context of 16, and cos/sin scaled by √(1 + ln 16 / ln 16).
    "phi3-longrope": (
        "chatml",
        Phi3Config,
        dict(
            rope_parameters=dict(
                rope_type="longrope",
                rope_theta=10000.0,
                partial_rotary_factor=0.75,
                short_factor=[1.0, 1.1, 1.3, 1.7, 2.3, 3.0],
                long_factor=[1.0, 1.5, 2.5, 4.0, 8.0, 16.0],
                original_max_position_embeddings=16,
            ),
            original_max_position_embeddings=16,
            tie_word_embeddings=False,
            sliding_window=None,
            pad_token_id=0,
        ),
    ),
    # Gemma 3 (text): embeddings scaled by √hidden, norms scaling by 1 + w
    # before and after attention and MLP, per-head q/k norms, GeGLU, five
    # sliding layers (window 8, shorter than the prompt, their own rotary
    # base) then a full one: the family's own pattern, which llama.cpp
    # assumes (its files do not list the layers), as it assumes scores
    # scaled by 1/√head_dim (query_pre_attn_scalar is Gemma 2's fixture's
    # to cover).
    "gemma3": (
        "chatml",
        Gemma3TextConfig,
        dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            num_hidden_layers=6,
            sliding_window=8,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            tie_word_embeddings=True,
            pad_token_id=0,
        ),
    ),
    # Gemma 2: Gemma's norms, GeGLU and scaled embeddings, no q/k norms,
    # a sliding layer (window 8) then a full one with one rotary base, both
    # soft-caps, set low so that they bend these random weights' scores and
    # logits, and scores scaled by query_pre_attn_scalar^-½ (not
    # head_dim's).
    "gemma2": (
        "chatml",
        Gemma2Config,
        dict(
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=8,
            attn_logit_softcapping=1.5,
            final_logit_softcapping=2.5,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
            tie_word_embeddings=True,
            pad_token_id=0,
        ),
    ),
    # Qwen3-MoE: five experts, two active, renormalised; experts narrower
    # than the dense MLP would be.
    "qwen3-moe": (
        "qwen3",
        Qwen3MoeConfig,
        dict(
            rope_theta=1000000.0,
            tie_word_embeddings=False,
            head_dim=16,
            num_experts=5,
            num_experts_per_tok=2,
            moe_intermediate_size=40,
            norm_topk_prob=True,
            use_sliding_window=False,
        ),
    ),
    # Mixtral: four experts (w1, w3, w2 under block_sparse_moe), two active.
    "mixtral": (
        "inst",
        MixtralConfig,
        dict(
            rope_theta=1000000.0,
            tie_word_embeddings=False,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=None,
        ),
    ),
    # GLM-4: half of each head rotated (interleaved pairs), q/k/v biases,
    # fused gate/up. Written again in the original ChatGLM layout below.
    "glm4": (
        "glm4",
        GlmConfig,
        dict(
            rope_parameters=dict(rope_type="default", rope_theta=500000.0, partial_rotary_factor=0.5),
            head_dim=16,
            attention_bias=True,
            tie_word_embeddings=False,
            pad_token_id=0,
        ),
    ),
}


# Checkpoints on the hub mostly predate transformers 5 and spell rotary settings
# as top-level `rope_theta` + `rope_scaling`; newer ones use `rope_parameters`.
# Half the fixtures are rewritten to the older spelling so both are covered.
LEGACY_CONFIG = {"llama31-tied-rope-scaling", "qwen2"}


def to_legacy_config(path):
    with open(path) as f:
        cfg = json.load(f)
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    if params.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = params
    cfg.pop("layer_types", None)
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def write_chatglm_layout(model, hf_dir, out, eos_ids):
    """The same weights under the original ChatGLM names and config
    (LongWriter-glm4-9b's layout): q/k/v fused into `query_key_value`,
    gate/up as `dense_h_to_4h`, rotary base as 10000 × `rope_ratio`."""
    os.makedirs(out, exist_ok=True)
    cfg = model.config
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    t = {
        "transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
        "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
        "transformer.output_layer.weight": sd["lm_head.weight"],
    }
    for l in range(cfg.num_hidden_layers):
        a, b = f"model.layers.{l}", f"transformer.encoder.layers.{l}"
        for kind in ("weight", "bias"):
            t[f"{b}.self_attention.query_key_value.{kind}"] = torch.cat(
                [sd[f"{a}.self_attn.{m}.{kind}"] for m in ("q_proj", "k_proj", "v_proj")]
            ).contiguous()
        t[f"{b}.self_attention.dense.weight"] = sd[f"{a}.self_attn.o_proj.weight"]
        t[f"{b}.mlp.dense_h_to_4h.weight"] = sd[f"{a}.mlp.gate_up_proj.weight"]
        t[f"{b}.mlp.dense_4h_to_h.weight"] = sd[f"{a}.mlp.down_proj.weight"]
        t[f"{b}.input_layernorm.weight"] = sd[f"{a}.input_layernorm.weight"]
        t[f"{b}.post_attention_layernorm.weight"] = sd[f"{a}.post_attention_layernorm.weight"]
    save_file(t, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    glm = dict(
        model_type="chatglm",
        architectures=["ChatGLMModel"],
        padded_vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        kv_channels=cfg.head_dim,
        multi_query_attention=True,
        multi_query_group_num=cfg.num_key_value_heads,
        layernorm_epsilon=cfg.rms_norm_eps,
        seq_length=cfg.max_position_embeddings,
        rope_ratio=cfg.rope_parameters["rope_theta"] / 10000.0,
        add_qkv_bias=True,
        add_bias_linear=False,
        rmsnorm=True,
        apply_residual_connection_post_layernorm=False,
        post_layer_norm=True,
        original_rope=True,
        eos_token_id=eos_ids,
        pad_token_id=eos_ids[0],
        torch_dtype="float32",
    )
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(glm, f, indent=2)
    # The original ships a tiktoken file; the tiny copy keeps tokenizer.json
    # and has no chat template, so the built-in GLM-4 format applies.
    with open(os.path.join(hf_dir, "tokenizer_config.json")) as f:
        tc = json.load(f)
    tc.pop("chat_template")
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f, indent=2, ensure_ascii=False)
    with open(os.path.join(hf_dir, "tokenizer.json"), "rb") as a, open(os.path.join(out, "tokenizer.json"), "wb") as b:
        b.write(a.read())


def greedy(model, ids, n):
    """Plain greedy decoding with the KV cache, no stopping: the reference
    for the engine's greedy path."""
    out = []
    with torch.no_grad():
        res = model(torch.tensor([ids]), use_cache=True)
        past = res.past_key_values
        nxt = int(res.logits[0, -1].argmax())
        for _ in range(n):
            out.append(nxt)
            res = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
    return out


def main(root, only=None):
    torch.manual_seed(1234)
    models_dir = os.path.join(root, "models")
    os.makedirs(models_dir, exist_ok=True)
    for name, (family, cls, extra) in MODELS.items():
        if only and name not in only:
            continue
        out = os.path.join(models_dir, name)
        os.makedirs(out, exist_ok=True)
        tok = train_tokenizer(family)
        hf_tok = save_tokenizer(tok, family, out)
        vocab = tok.get_vocab_size()
        spec = FAMILIES[family]
        eos_ids = tok.token_to_id(spec["eos"])
        if family == "glm4":
            eos_ids = [tok.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
        shape = dict(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=112,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            rms_norm_eps=1e-5,
            bos_token_id=tok.token_to_id(spec["bos"]) if spec["bos"] else None,
            eos_token_id=eos_ids,
            torch_dtype="float32",
        )
        cfg = cls(**{**shape, **extra})
        # Soft-capped scores exist only in the eager attention.
        eager = dict(attn_implementation="eager") if name == "gemma2" else {}
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32, **eager)
        # Random init is small; widen it so the test sees non-trivial logits.
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.15)
            for n_, p in model.named_parameters():
                if "norm" in n_:
                    p.add_(1.0)
        model.eval()
        model.save_pretrained(out, safe_serialization=True)
        model.generation_config.save_pretrained(out)
        if name in LEGACY_CONFIG:
            to_legacy_config(os.path.join(out, "config.json"))
        if name == "glm4":
            write_chatglm_layout(model, out, os.path.join(models_dir, f"{name}-chatglm"), eos_ids)

        ids = hf_tok(PROMPT)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        tokens = greedy(model, ids, 32)

        # Same weights rounded to bf16 and f16, computed in f32: what the engine
        # does with a half-precision checkpoint and `--dtype f32`.
        half = {}
        for dt_name, dt in (("bf16", torch.bfloat16), ("f16", torch.float16)):
            sub = os.path.join(models_dir, f"{name}-{dt_name}")
            if name == "llama3-untied":
                m2 = AutoModelForCausalLM.from_pretrained(out, torch_dtype=dt)
                m2.save_pretrained(sub, safe_serialization=True)
                for fn in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
                    with open(os.path.join(out, fn), "rb") as a, open(os.path.join(sub, fn), "wb") as b:
                        b.write(a.read())
                m3 = AutoModelForCausalLM.from_pretrained(sub, torch_dtype=torch.float32)
                m3.eval()
                with torch.no_grad():
                    half[dt_name] = m3(torch.tensor([ids])).logits[0, -1].tolist()

        chats = []
        for conv in CONVERSATIONS:
            for agp in (True, False):
                try:
                    text = hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=agp)
                    err = None
                except Exception as e:  # the template raised: record that it must raise
                    text, err = None, str(e)
                chats.append(dict(messages=conv, add_generation_prompt=agp, text=text, error=err))
            if family == "qwen3":
                text = hf_tok.apply_chat_template(
                    conv, tokenize=False, add_generation_prompt=True, enable_thinking=False
                )
                chats.append(dict(messages=conv, add_generation_prompt=True, enable_thinking=False, text=text, error=None))
        texts = [PROMPT, CORPUS[5], CORPUS[8], "  leading spaces and\nnew lines\n\n", "👩‍👩‍👧 emoji family ✨"]
        encodings = [
            dict(text=t, ids=hf_tok(t)["input_ids"], ids_no_special=hf_tok(t, add_special_tokens=False)["input_ids"])
            for t in texts
        ]
        fixture = dict(
            model=name,
            prompt=PROMPT,
            prompt_ids=ids,
            logits=[[round(float(v), 7) for v in row] for row in logits.tolist()],
            greedy_tokens=tokens,
            greedy_text=hf_tok.decode(tokens, skip_special_tokens=True),
            half_precision_last_logits=half,
            chat=chats,
            encodings=encodings,
        )
        with open(os.path.join(root, f"{name}.json"), "w") as f:
            json.dump(fixture, f, ensure_ascii=False)
        print(f"{name}: vocab {vocab}, {len(ids)} prompt tokens, greedy {tokens[:8]}...")


if __name__ == "__main__":
    # make_fixtures.py [ROOT] [--only NAME,NAME]: --only rebuilds some models
    # and leaves the others' files as they are.
    args = sys.argv[1:]
    only = None
    if "--only" in args:
        i = args.index("--only")
        only = set(args[i + 1].split(","))
        del args[i : i + 2]
    main(args[0] if args else "tests/fixtures", only)
