"""Reference scores for `longwriter eval mc`: each choice's token ids and
the sum of their log-probabilities under transformers, tokenized as
lm-evaluation-harness does (the prompt's trailing spaces move into the
choice; a choice's tokens are prompt + choice past the prompt's own; an
empty prompt is the tokenizer's end-of-text token).

    python scripts/make_mc_fixture.py MODEL_DIR TASK.jsonl OUT.json
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(model_dir, task, out):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    model.eval()
    # The harness's end-of-text token: the tokenizer's EOS.
    eot = tok.eos_token_id
    rows = []
    for line in open(task, encoding="utf-8"):
        if not line.strip():
            continue
        item = json.loads(line)
        prompt = item["prompt"]
        context = prompt.rstrip(" ")
        moved = prompt[len(context):]
        choices = []
        for choice in item["choices"]:
            continuation = moved + choice
            ctx = tok(context)["input_ids"] if context else []
            whole = tok(context + continuation)["input_ids"]
            cont = whole[len(ctx):]
            if not ctx:
                ctx = [eot]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logits = model(ids).logits[0]
            logp = torch.log_softmax(logits, dim=-1)
            total = sum(
                logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)
            )
            choices.append({"context": ctx, "tokens": cont, "logprob": total})
        rows.append({"id": item["id"], "choices": choices})
    with open(out, "w", encoding="utf-8") as f:
        f.write('{"model": %s, "items": [\n' % json.dumps(model_dir))
        f.write(",\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
        f.write("\n]}\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
