#!/usr/bin/env bash
# The settings of the reduced run reported in README.md beside this file.
# From the repository root:  docs/experiments/smollm2-135m/settings.sh RUN_DIR
# (The baseline step evaluated all 16 English Ruler items up to 10,000 words;
# the after step, run with EVAL_LIMIT=8, the first 8 of them.)
set -euo pipefail
cd "$(dirname "$0")/../../.."
export BENCHES=data/eval/ruler-lw.jsonl
export EVAL_LANGS=en EVAL_MAX_LENGTH=10000 EVAL_MAX_TOKENS=4096 EVAL_CONCURRENCY=8
export LANGS=en INSTRUCTIONS=24 SHORT=12 MAX_LENGTH=4000 MIX_RATIO=0.3
export SEQ_LEN=2048 LORA_RANK=16 STEPS=8 LR=1e-3 CONCURRENCY=8 THREADS=2
exec scripts/longwriter_smol.sh "${1:?usage: settings.sh RUN_DIR}"
