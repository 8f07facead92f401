#!/usr/bin/env bash
# Long fuzzing runs (a benchmark, not a test): every fuzz target for
# SECONDS (default 600) from the committed seeds plus a corpus kept under
# ~/.cache/longwriter/fuzz-corpus, one process each, then a summary line
# per target: executions, executions per second, corpus size, crashes.
# CI runs each target for 60 s (.ci/run); this is the ≥ 10-minute run.
#
#   scripts/fuzz_long.sh [SECONDS] [TARGET...]
#
# EXTRA: more libFuzzer flags (e.g. EXTRA=-detect_leaks=0 to go on past a
# leak, which libFuzzer otherwise stops at as it stops at a crash).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-600}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gguf_header gguf_tokenizer chat_template)
out="$HOME/.cache/longwriter/fuzz-long"
mkdir -p "$out"
for t in "${targets[@]}"; do
  corpus="$HOME/.cache/longwriter/fuzz-corpus/$t"
  mkdir -p "$corpus"
  log="$out/$t.log"
  artifacts="$out/$t-artifacts/"
  mkdir -p "$artifacts"
  status=0
  (cd fuzz && cargo +nightly fuzz run --target-dir "$HOME/.cache/longwriter/fuzz-target" "$t" "$corpus" "seeds/$t" -- \
     -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
     -artifact_prefix="$artifacts" ${EXTRA:-}) >"$log" 2>&1 || status=$?
  execs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' | tail -1)
  rate=$(grep -E '^stat::average_exec_per_sec' "$log" | awk '{print $2}' | tail -1)
  crashes=$(find "$artifacts" -type f -name 'crash-*' | wc -l)
  leaks=$(find "$artifacts" -type f -name 'leak-*' | wc -l)
  other=$(find "$artifacts" -type f ! -name 'crash-*' ! -name 'leak-*' | wc -l)
  took=$(grep -E '^Done [0-9]+ runs in [0-9]+ second' "$log" | awk '{print $5}' | tail -1)
  echo "$t: ${took:-?} s of ${secs}, ${execs:-?} executions (${rate:-?}/s), corpus $(ls "$corpus" | wc -l) files, crashes $crashes, leaks $leaks, other (timeouts, memory) $other, exit $status (log: $log)"
done
