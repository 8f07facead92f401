#!/usr/bin/env bash
# Decode speed per kernel set and at depth: `longwriter bench` under each
# LONGWRITER_KERNELS set that this CPU runs, alternating with llama.cpp's
# `llama-bench` on the same file, 2 threads, decode of GEN tokens after
# DEPTH tokens of context (llama-bench's -d).
#
#   scripts/bench_decode.sh FILE.gguf [FILE.gguf ...]
#
# Environment: THREADS (2), GEN (128), DEPTHS ("0"; e.g. "0 4096"), ROUNDS
# (2; the median of each side's rounds is reported), KV (f32: our cache
# format; llama.cpp keeps its default f16), SETS (the kernel sets to compare,
# default all this CPU runs), LLAMA_BIN (a directory with llama-bench;
# default: scripts/llama_cpp_tools.sh's build, without native flags — a
# native build, cmake -DGGML_NATIVE=ON, decodes on the Intel VMs whose
# hypervisor refuses AMX, where only its batched prefill dies),
# LONGWRITER (target/release/longwriter).
# Prints a Markdown table with the CPU model and flags.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-2}"
GEN="${GEN:-128}"
DEPTHS="${DEPTHS:-0}"
ROUNDS="${ROUNDS:-2}"
KV="${KV:-f32}"
LONGWRITER="${LONGWRITER:-target/release/longwriter}"
[ -x "$LONGWRITER" ] || cargo build --release -q -p longwriter
BIN="${LLAMA_BIN:-$(scripts/llama_cpp_tools.sh | tail -1)}"
flags="$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|avx_vnni|avx512f|avx512bw|avx512_vnni|avx512_bf16|amx_int8)$' | tr '\n' ' ')"
if [ -z "${SETS:-}" ]; then
  SETS="avx2"
  [[ " $flags " == *" avx_vnni "* ]] && SETS+=" avx-vnni"
  [[ " $flags " == *" avx512_vnni "* ]] && SETS+=" avx512-vnni"
  [[ " $flags " == *" avx512_vnni "* && " $flags " == *" avx512bw "* ]] && SETS+=" avx512-zmm"
fi
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
json_field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); flags: $flags"
echo "$THREADS threads; decode of $GEN tokens; our KV cache $KV, llama.cpp's f16; llama-bench from $BIN; median of $ROUNDS alternating rounds; tok/s"
echo
header="| file | depth |"; rule="|---|---|"
for s in $SETS; do header+=" $s |"; rule+="---|"; done
echo "$header llama.cpp | default set | default / llama.cpp |"
echo "$rule---|---|---|"
for file in "$@"; do
  for depth in $DEPTHS; do
    declare -A ours=(); ref=()
    for _ in $(seq "$ROUNDS"); do
      for s in $SETS; do
        out="$(LONGWRITER_KERNELS=$s "$LONGWRITER" bench --model "$file" --threads "$THREADS" \
          --prompt-tokens "$((depth > 0 ? depth : 1))" --gen-tokens "$GEN" --runs 1 \
          --kv-cache "$KV" --json 2>/dev/null)"
        ours[$s]+="$(json_field "$out" decode_tok_s) "
      done
      out="$("$BIN/llama-bench" -m "$file" -t "$THREADS" -p 0 -n "$GEN" -d "$depth" -r 1 -o json 2>/dev/null)"
      ref+=("$(python3 -c 'import json,sys; print([r["avg_ts"] for r in json.loads(sys.argv[1]) if r["n_gen"] > 0][0])' "$out")")
    done
    default="$("$LONGWRITER" bench --model "$file" --threads "$THREADS" --prompt-tokens 1 --gen-tokens 2 --runs 1 --json 2>/dev/null)"
    default="$(json_field "$default" kernels 2>/dev/null || echo '?')"
    row="| $(basename "$file") | $depth |"; chosen=""
    for s in $SETS; do
      m="$(printf '%s\n' ${ours[$s]} | median)"
      row+=" $(printf '%.1f' "$m") |"
      [ "$s" = "$default" ] && chosen="$m"
    done
    r="$(printf '%s\n' "${ref[@]}" | median)"
    if [ -n "$chosen" ]; then
      ratio="$(awk -v a="$chosen" -v b="$r" 'BEGIN {printf "%.2f×", a / b}')"
    else
      ratio="(not among SETS)"
    fi
    echo "$row $(printf '%.1f' "$r") | $default | $ratio |"
    unset ours
  done
done
