#!/usr/bin/env bash
# LongWriter's experiment on a small model, step by step into one run
# directory: (a) baseline evaluation in direct mode, (b) long-writing
# instructions, (c) AgentWrite data built on the same model and mixed with
# the model's own short answers, (d) LoRA fine-tuning on long packed rows
# with the LongAlign loss, (e) the same evaluation with the adapter and a
# before/after report.
#
#   scripts/longwriter_smol.sh RUN_DIR
#
# Every step leaves RUN_DIR/.done-STEP when it finishes; rerun the same
# command after a stop and finished steps are skipped (the steps themselves
# resume: `eval run`, `data build` and `train sft --resume` continue where
# they stopped).
#
# Settings (environment), with the full run's defaults:
#   MODEL          the model (default: SmolLM2-135M-Instruct Q4_1 from
#                  scripts/fetch_real_model.sh's cache)
#   LONGWRITER     the binary (default: target/release/longwriter)
#   PYTHON         python3 for the helper scripts (default: python3)
#   BENCHES        evaluation files (default: data/eval/longbench-lw.jsonl
#                  data/eval/ruler-lw.jsonl)
#   EVAL_LIMIT     only the first N items of each (default: all)
#   EVAL_LANGS     only items in these languages, comma-separated (default: all)
#   EVAL_MAX_LENGTH  only items asking for at most this many words (default: all)
#   EVAL_CONCURRENCY  items in flight while evaluating (default: 4)
#   EVAL_MAX_TOKENS  cap on each direct-mode answer (default: 16384)
#   INSTRUCTIONS   long-writing instructions (default: 300)
#   LANGS          their languages, in turn (default: en,zh; en for a model
#                  that knows only English)
#   SHORT          short prompts answered by the model for the mix (default: 100)
#   MAX_LENGTH     scale the instructions' lengths down to at most this
#                  (toy runs; default: unscaled, 1,000-10,000)
#   MIX_RATIO      short examples per long one in the training file (default: 0.3)
#   SEQ_LEN        tokens per packed training row (default: 16384)
#   LORA_RANK      (default: 16)
#   CHECKPOINTING  1: train with activation checkpointing (each layer's
#                  activations recomputed in the backward pass: long rows
#                  fit in memory); 0: keep them all (default: 1)
#   STEPS          optimizer steps (default: two epochs)
#   LR             peak learning rate (default: the trainer's for LoRA, 2e-4)
#   THREADS        worker threads (default: all cores)
#   CONCURRENCY    items in flight while building data (default: 4)
set -euo pipefail

run=${1:?usage: scripts/longwriter_smol.sh RUN_DIR}
here=$(cd "$(dirname "$0")/.." && pwd)
lw=${LONGWRITER:-$here/target/release/longwriter}
python=${PYTHON:-python3}
model=${MODEL:-$HOME/.cache/longwriter/real-model/SmolLM2-135M-Instruct.Q4_1.gguf}
benches=${BENCHES:-"$here/data/eval/longbench-lw.jsonl $here/data/eval/ruler-lw.jsonl"}
eval_max=${EVAL_MAX_TOKENS:-16384}
seq_len=${SEQ_LEN:-16384}
rank=${LORA_RANK:-16}
checkpointing=()
[ "${CHECKPOINTING:-1}" = 1 ] && checkpointing=(--gradient-checkpointing)
mix_ratio=${MIX_RATIO:-0.3}
threads=()
[ -n "${THREADS:-}" ] && threads=(--threads "$THREADS")
limit=()
[ -n "${EVAL_LIMIT:-}" ] && limit=(--limit "$EVAL_LIMIT")
scale=()
[ -n "${MAX_LENGTH:-}" ] && scale=(--max-length "$MAX_LENGTH")

[ -e "$model" ] || { echo "error: model $model not found (run scripts/fetch_real_model.sh, or set MODEL)" >&2; exit 1; }
[ -x "$lw" ] || { echo "error: $lw not found (cargo build --release, or set LONGWRITER)" >&2; exit 1; }
mkdir -p "$run"
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

# step NAME COMMAND…: runs once; a rerun skips it when it finished.
step() {
    local name=$1
    shift
    if [ -e "$run/.done-$name" ]; then
        log "$name: finished before, skipped"
        return
    fi
    log "$name: start"
    local t0=$SECONDS
    "$@"
    echo "$((SECONDS - t0))" > "$run/.done-$name"
    log "$name: done in $((SECONDS - t0)) s"
}

# The benchmark as evaluated: EVAL_LANGS and EVAL_MAX_LENGTH applied, kept
# in the run directory so that both evaluations read the same items.
bench_file() {
    local b=$1 name
    name=$(basename "$b" .jsonl)
    local kept=$run/bench/$name.jsonl
    if [ ! -e "$kept" ]; then
        mkdir -p "$run/bench"
        "$python" - "$b" "$kept.tmp" "${EVAL_LANGS:-}" "${EVAL_MAX_LENGTH:-}" <<'PY'
import json, sys
src, dst, langs, most = sys.argv[1:5]
langs = {l for l in langs.split(",") if l}
with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
    for line in f:
        if not line.strip():
            continue
        item = json.loads(line)
        if langs and item.get("lang", "en") not in langs:
            continue
        if most and int(item["length"]) > int(most):
            continue
        out.write(line if line.endswith("\n") else line + "\n")
PY
        mv "$kept.tmp" "$kept"
    fi
    echo "$kept"
}

# evaluate LABEL [--lora DIR]: direct mode on every benchmark.
evaluate() {
    local label=$1
    shift
    for b in $benches; do
        local name
        name=$(basename "$b" .jsonl)
        local out=$run/eval/$name/$label
        "$lw" eval run -m "$model" "$@" --bench "$(bench_file "$b")" --out "$out" --mode direct \
            --max-tokens "$eval_max" --seed 42 --quiet --concurrency "${EVAL_CONCURRENCY:-4}" \
            "${limit[@]}" "${threads[@]}"
        "$lw" eval length --json "$out/pred.jsonl" > "$out/length.json"
    done
}

instructions() {
    "$python" "$here/scripts/make_long_instructions.py" --out "$run/instructions.jsonl" \
        --short-out "$run/short.jsonl" --count "${INSTRUCTIONS:-300}" --short "${SHORT:-100}" \
        --seed 1 --langs "${LANGS:-en,zh}" "${scale[@]}" --check $benches > "$run/overlap.json"
    cat "$run/overlap.json" >&2
}

build_data() {
    "$lw" data build -m "$model" --instructions "$run/instructions.jsonl" --out "$run/build" \
        --concurrency "${CONCURRENCY:-4}" --seed 42 --quiet "${threads[@]}"
    "$lw" data stats "$run/build" > "$run/build-stats.txt"
    # The model's own short answers, so that it keeps answering short
    # questions briefly.
    "$lw" eval run -m "$model" --bench "$run/short.jsonl" --out "$run/short-answers" --mode direct \
        --max-tokens 256 --seed 42 --quiet "${threads[@]}"
    "$python" - "$run/short-answers/pred.jsonl" "$run/short-chat.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], encoding="utf-8") as f, open(sys.argv[2], "w", encoding="utf-8") as out:
    for line in f:
        r = json.loads(line)
        if r.get("response", "").strip():
            msgs = [{"role": "user", "content": r["prompt"]},
                    {"role": "assistant", "content": r["response"].strip()}]
            out.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
PY
    "$lw" data export "$run/build" --output "$run/train.jsonl" --mix "$run/short-chat.jsonl" \
        --mix-ratio "$mix_ratio" --seed 1
}

finetune() {
    local steps=()
    [ -n "${STEPS:-}" ] && steps=(--steps "$STEPS") || steps=(--epochs 2)
    local resume=()
    [ -n "${LR:-}" ] && steps+=(--lr "$LR")
    ls -d "$run/sft/checkpoint-"* >/dev/null 2>&1 && resume=(--resume)
    "$lw" train sft --model "$model" --data "$run/train.jsonl" --lora-rank "$rank" \
        --seq-len "$seq_len" --loss longalign --batch 1 --out "$run/sft" --quiet \
        "${checkpointing[@]}" "${steps[@]}" "${resume[@]}" "${threads[@]}"
}

report() {
    for b in $benches; do
        local name
        name=$(basename "$b" .jsonl)
        "$lw" eval report --out "$run/report/$name" "$run/eval/$name/baseline" \
            "$run/eval/$name/finetuned"
    done
}

step baseline evaluate baseline
step instructions instructions
step data build_data
step finetune finetune
step after evaluate finetuned --lora "$run/sft/final"
step report report
log "report: $run/report/*/report.md"
