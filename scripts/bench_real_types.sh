#!/usr/bin/env bash
# Prefill and decode of the real SmolLM2-135M-Instruct in each tensor type,
# `longwriter bench` against llama.cpp's `llama-bench` on the same file,
# alternating (ours, then llama.cpp's, per type and round), same threads.
#
#   scripts/bench_real_types.sh [TYPE ...]      (default: the common types)
#   scripts/bench_real_types.sh FILE.gguf ...     (any files, e.g. bench models)
#
# Environment: THREADS (2), PROMPT (512), GEN (128), ROUNDS (2; the median of
# each side's rounds is reported), RUNS (3: runs per measurement, each side),
# LLAMA_BIN (llama.cpp's tools; default scripts/llama_cpp_tools.sh's build),
# LONGWRITER (target/release/longwriter).
# The files come from scripts/make_real_types.sh, llama.cpp's tools from
# scripts/llama_cpp_tools.sh (built without native flags: see there).
# Prints a Markdown table with the CPU model; each ratio is ours / llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-2}"
PROMPT="${PROMPT:-512}"
GEN="${GEN:-128}"
ROUNDS="${ROUNDS:-2}"
RUNS="${RUNS:-3}"
LONGWRITER="${LONGWRITER:-target/release/longwriter}"
[ -x "$LONGWRITER" ] || cargo build --release -q -p longwriter
BIN="${LLAMA_BIN:-$(scripts/llama_cpp_tools.sh | tail -1)}"
if [ $# -eq 0 ]; then
  set -- Q4_0 Q4_1 Q5_0 Q8_0 Q4_K_M Q5_K_M Q6_K IQ4_XS
fi

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
flags="$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|avx_vnni|avx512f|avx512_vnni|avx512_bf16|amx_int8)$' | tr '\n' ' ')"
echo "CPU: $cpu; flags: $flags; $THREADS threads; prefill $PROMPT tokens, decode $GEN tokens from an empty context; median of $ROUNDS alternating rounds"
echo
echo "| type | prefill ours | prefill llama.cpp | ratio | decode ours | decode llama.cpp | ratio |"
echo "|---|---|---|---|---|---|---|"
for t in "$@"; do
  if [[ "$t" == *.gguf ]]; then
    file="$t"
    t="$(basename "$t" .gguf)"
  else
    TYPES_DIR="${TYPES_DIR:-$(scripts/make_real_types.sh | tail -1)}"
    file="$TYPES_DIR/smollm2-$t.gguf"
  fi
  [ -f "$file" ] || { echo "no file $file" >&2; exit 1; }
  ours_pp=(); ours_tg=(); ref_pp=(); ref_tg=()
  for _ in $(seq "$ROUNDS"); do
    # Two runs, as llama-bench measures: prefill of PROMPT tokens, and
    # decode of GEN tokens from an empty context.
    pp="$("$LONGWRITER" bench --model "$file" --threads "$THREADS" --prompt-tokens "$PROMPT" \
      --gen-tokens 2 --runs "$RUNS" --json 2>/dev/null)"
    tg="$("$LONGWRITER" bench --model "$file" --threads "$THREADS" --prompt-tokens 1 \
      --gen-tokens "$GEN" --runs "$RUNS" --json 2>/dev/null)"
    ours_pp+=("$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["prefill_tok_s"])' "$pp")")
    ours_tg+=("$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["decode_tok_s"])' "$tg")")
    ref="$("$BIN/llama-bench" -m "$file" -t "$THREADS" -p "$PROMPT" -n "$GEN" -r "$RUNS" -o json 2>/dev/null)"
    ref_pp+=("$(python3 -c 'import json,sys; print([r["avg_ts"] for r in json.loads(sys.argv[1]) if r["n_prompt"] > 0][0])' "$ref")")
    ref_tg+=("$(python3 -c 'import json,sys; print([r["avg_ts"] for r in json.loads(sys.argv[1]) if r["n_gen"] > 0][0])' "$ref")")
  done
  opp="$(printf '%s\n' "${ours_pp[@]}" | median)"; otg="$(printf '%s\n' "${ours_tg[@]}" | median)"
  rpp="$(printf '%s\n' "${ref_pp[@]}" | median)"; rtg="$(printf '%s\n' "${ref_tg[@]}" | median)"
  awk -v t="$t" -v a="$opp" -v b="$rpp" -v c="$otg" -v d="$rtg" \
    'BEGIN {printf "| %s | %.0f | %.0f | %.2f× | %.1f | %.1f | %.2f× |\n", t, a, b, a / b, c, d, c / d}'
done
