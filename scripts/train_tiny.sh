#!/usr/bin/env bash
# The recipe of models/longwriter-tiny: corpus → tokenizer → shards →
# pretraining → synthetic AgentWrite data → fine-tuning → the shipped
# directory. About 75 minutes on 2 CPU cores.
#
#   scripts/train_tiny.sh WORK_DIR [OUT_DIR]
#
# Needs network access to Debian's archive, npm and PyPI for the corpus
# (scripts/fetch_corpus.sh); everything else runs offline.
set -euo pipefail
work=${1:?usage: scripts/train_tiny.sh WORK_DIR [OUT_DIR]}
out=${2:-models/longwriter-tiny}
here=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release -p longwriter --manifest-path "$here/Cargo.toml"
lw="$here/target/release/longwriter"
mkdir -p "$work"

scripts/fetch_corpus.sh "$work/corpus-dl"
corpus=("$work"/corpus-dl/corpus/*.jsonl)
"$lw" tokenizer train "${corpus[@]}" --vocab-size 8192 --out "$work/tokenizer"
"$lw" data tokenize "${corpus[@]}" --tokenizer "$work/tokenizer" --out "$work/shards"

# 5.25M parameters (4 layers, hidden 256, 4 query / 2 key-value heads, tied
# embeddings), 1600 steps of 8 × 256 tokens (3.3M tokens).
"$lw" train pretrain --data "$work/shards" --preset 5m --seq-len 256 --batch 8 --steps 1600 \
    --lr 2e-3 --min-lr 2e-4 --warmup 100 --eval-every 200 --save-every 200 --quiet \
    --out "$work/pretrain"

# Synthetic AgentWrite conversations: 450 English and 350 Chinese documents
# of 3–4 paragraphs of 20–120 words (characters).
"$lw" data synth "$work/corpus-dl/corpus/en-novels.jsonl" --out "$work/sft-en.jsonl" \
    --words 20-120 --paragraphs 3-4 --seed 1 --max-documents 450
"$lw" data synth "$work/corpus-dl/corpus/zh-poetry.jsonl" --out "$work/sft-zh.jsonl" \
    --words 20-120 --paragraphs 3-4 --seed 1 --max-documents 350
cat "$work/sft-en.jsonl" "$work/sft-zh.jsonl" > "$work/sft.jsonl"

"$lw" train sft --model "$work/pretrain/final" --data "$work/sft.jsonl" --seq-len 1024 --batch 2 \
    --steps 450 --lr 5e-4 --min-lr 5e-5 --warmup 20 --weight-decay 0 --eval-every 90 \
    --save-every 150 --quiet --out "$work/sft"

# The shipped directory: weights, tokenizer, a context long enough for the
# prompts of a 2,000-word run (rotary positions extrapolate; nothing breaks),
# and sampling defaults.
mkdir -p "$out"
cp "$work/sft/final/"{model.safetensors,tokenizer.json,tokenizer_config.json} "$out/"
python3 - "$work/sft/final/config.json" "$out/config.json" <<'PY'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg["max_position_embeddings"] = 16384
json.dump(cfg, open(sys.argv[2], "w"), indent=2)
PY
printf '{"eos_token_id": [2, 0], "temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.05}\n' \
    > "$out/generation_config.json"
cp "$work/pretrain/loss.png" "$out/pretrain-loss.png"
cp "$work/sft/loss.png" "$out/sft-loss.png"
cp "$work/corpus-dl/SOURCES.md" "$out/SOURCES.md"
