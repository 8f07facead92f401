#!/usr/bin/env python3
"""LoRA adapters made by `peft` on two fixture models, and the logits the
adapted models give in `transformers`: the oracle for `--lora`.

    pip install -r scripts/requirements-ref.txt peft==0.21.2
    python scripts/make_lora_fixtures.py tests/fixtures

Writes lora/<name>/ (adapter_config.json, adapter_model.safetensors) and
lora/<name>.json (base model, prompt ids, logits of every position).
- qwen2-peft: every attention and MLP projection, r 4, alpha 8.
- llama3-rslora: q and v only, r 8, alpha 4, rank-stabilised scaling
  (alpha / sqrt(r)); its q rows are reordered in llama.cpp's GGUF layout,
  which the GGUF test covers.
"""

import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

ADAPTERS = {
    "qwen2-peft": dict(base="qwen2", r=4, lora_alpha=8, use_rslora=False,
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                       "gate_proj", "up_proj", "down_proj"]),
    "llama3-rslora": dict(base="llama3-untied", r=8, lora_alpha=4, use_rslora=True,
                          target_modules=["q_proj", "v_proj"]),
}


def main():
    root = Path(sys.argv[1])
    torch.manual_seed(0)
    for name, spec in ADAPTERS.items():
        spec = dict(spec)
        base = spec.pop("base")
        model = AutoModelForCausalLM.from_pretrained(root / "models" / base, torch_dtype=torch.float32)
        # Random A and B (peft starts B at zero, which would change nothing).
        cfg = LoraConfig(init_lora_weights=False, lora_dropout=0.0, bias="none", **spec)
        model = get_peft_model(model, cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.5)
        model.eval()
        out = root / "lora" / name
        model.save_pretrained(out, safe_serialization=True)
        fixture = json.loads((root / f"{base}.json").read_text())
        ids = fixture["prompt_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        (root / "lora" / f"{name}.json").write_text(json.dumps({
            "base": base,
            "prompt_ids": ids,
            "logits": [[round(float(v), 6) for v in row] for row in logits],
        }))
        print(f"wrote {out} ({sum(1 for n, _ in model.named_parameters() if 'lora_A' in n)} adapted matrices)")


if __name__ == "__main__":
    main()
