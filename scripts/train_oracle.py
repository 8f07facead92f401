#!/usr/bin/env python3
"""Reference losses, gradients and optimizer steps for `lw-train`, computed
with PyTorch, Hugging Face `transformers` and `peft`.

For a tiny Llama model and one packed batch (two short sequences and padding
in one row, a full-length sequence in the other, position ids reset per
sequence, a block-diagonal causal mask, per-token loss weights), it writes:

  model/                 config.json + model.safetensors (the initial weights)
  batch.json             inputs, targets, weights, positions, segments
  full.safetensors       loss and the gradient of every parameter
  adamw.safetensors      every parameter after two AdamW steps with clipping
  lora/                  PEFT adapter (B made non-zero so A gets a gradient)
  lora.safetensors       loss and the gradient of every adapter tensor

The Rust tests in crates/lw-train/tests/oracle.rs load the same files and must
agree (loss within 1e-5 relative, gradients within 1e-4 relative). The outputs
are committed; run it again only when the fixture changes, in a venv with
`scripts/requirements-ref.txt` and `peft`:

    python scripts/train_oracle.py crates/lw-train/tests/fixtures/oracle
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

ROWS, LEN = 2, 16
# (row, sequence length, which target positions are supervised)
SEQUENCES = [
    (0, 7, [0, 0, 1, 1, 1, 1, 1]),
    (0, 6, [0, 1, 1, 1, 0, 1]),
    (1, 16, [0] * 5 + [1] * 11),
]
OPT = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, clip=0.5)


def build_batch(vocab, gen):
    inputs = [[0] * LEN for _ in range(ROWS)]
    targets = [[0] * LEN for _ in range(ROWS)]
    sup = [[0] * LEN for _ in range(ROWS)]
    positions = [[0] * LEN for _ in range(ROWS)]
    segments = [[2**32 - 1] * LEN for _ in range(ROWS)]
    fill = [0] * ROWS
    seq_spans = []
    for seg_in_row, (row, n, mask) in enumerate(SEQUENCES):
        toks = torch.randint(3, vocab, (n + 1,), generator=gen).tolist()
        at = fill[row]
        seg = sum(1 for r, _, _ in SEQUENCES[:seg_in_row] if r == row)
        for j in range(n):
            inputs[row][at + j] = toks[j]
            targets[row][at + j] = toks[j + 1]
            sup[row][at + j] = mask[j]
            positions[row][at + j] = j
            segments[row][at + j] = seg
        seq_spans.append((row, at, n))
        fill[row] += n
    # LongAlign weighting: each sequence's mean over its supervised tokens,
    # then the mean over sequences.
    weights = [[0.0] * LEN for _ in range(ROWS)]
    counted = [(row, at, n) for row, at, n in seq_spans if any(sup[row][at : at + n])]
    for row, at, n in counted:
        c = sum(sup[row][at : at + n])
        for j in range(at, at + n):
            if sup[row][j]:
                weights[row][j] = 1.0 / (c * len(counted))
    return dict(
        rows=ROWS,
        len=LEN,
        inputs=sum(inputs, []),
        targets=sum(targets, []),
        weights=sum(weights, []),
        positions=sum(positions, []),
        segments=sum(segments, []),
        spans=seq_spans,
    )


def mask_4d(batch):
    segs = torch.tensor(batch["segments"]).view(ROWS, LEN)
    causal = torch.tril(torch.ones(LEN, LEN, dtype=torch.bool))
    allowed = (segs[:, :, None] == segs[:, None, :]) & causal
    m = torch.zeros(ROWS, 1, LEN, LEN)
    m.masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
    return m


def loss_of(model, batch):
    ids = torch.tensor(batch["inputs"]).view(ROWS, LEN)
    pos = torch.tensor(batch["positions"]).view(ROWS, LEN)
    out = model(input_ids=ids, position_ids=pos, attention_mask=mask_4d(batch))
    logits = out.logits.reshape(ROWS * LEN, -1).float()
    nll = torch.nn.functional.cross_entropy(
        logits, torch.tensor(batch["targets"]), reduction="none"
    )
    return (nll * torch.tensor(batch["weights"])).sum(), out.logits


def main(out):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).float()
    # Norm weights away from one so their gradients matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(os.path.join(out, "model"), safe_serialization=True)
    gen = torch.Generator().manual_seed(1)
    batch = build_batch(config.vocab_size, gen)

    # The packed row must give each sequence the logits it has alone.
    _, packed_logits = loss_of(model, batch)
    for row, at, n in batch["spans"]:
        ids = torch.tensor(batch["inputs"][row * LEN + at : row * LEN + at + n])[None]
        alone = model(input_ids=ids).logits[0]
        diff = (alone - packed_logits[row, at : at + n]).abs().max().item()
        assert diff < 1e-5, f"packed attention differs from a single sequence by {diff}"
    spans = batch.pop("spans")

    model.zero_grad()
    loss, _ = loss_of(model, batch)
    loss.backward()
    tensors = {"loss": loss.detach().reshape(1)}
    for name, p in model.named_parameters():
        tensors[f"grad.{name}"] = p.grad.detach().clone().contiguous()
    save_file(tensors, os.path.join(out, "full.safetensors"))

    # Two AdamW steps with clipping; matrices decay, norms do not.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": OPT["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=OPT["lr"],
        betas=OPT["betas"],
        eps=OPT["eps"],
    )
    for _ in range(2):
        opt.zero_grad()
        loss, _ = loss_of(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPT["clip"])
        opt.step()
    save_file(
        {n: p.detach().clone().contiguous() for n, p in model.named_parameters()},
        os.path.join(out, "adamw.safetensors"),
    )

    # LoRA on the initial weights.
    from peft import LoraConfig, get_peft_model

    base = LlamaForCausalLM.from_pretrained(
        os.path.join(out, "model"), attn_implementation="eager"
    ).float()
    lcfg = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, lcfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(os.path.join(out, "lora"))
    loss, _ = loss_of(peft_model, batch)
    loss.backward()
    tensors = {"loss": loss.detach().reshape(1)}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            tensors["grad." + name.replace(".default", "")] = p.grad.detach().clone()
    save_file(tensors, os.path.join(out, "lora.safetensors"))

    with open(os.path.join(out, "batch.json"), "w") as f:
        json.dump(dict(batch, optim=OPT, spans=spans), f)
    print(f"wrote {out}: loss {tensors['loss'].item():.6f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "crates/lw-train/tests/fixtures/oracle")
