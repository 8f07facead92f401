#!/usr/bin/env bash
# Writes the real SmolLM2-135M-Instruct in every tensor type a hub file is
# likely to hold, with llama.cpp's own llama-quantize (scripts/llama_cpp_tools.sh):
# first F16 from the shipped Q4_1 file, then each type from that F16. The
# i-quants of 1–3 bits need an importance matrix, which llama-imatrix
# computes on the README and the shipped evaluation prompts.
#
#   scripts/make_real_types.sh      # prints the directory on its last line
#
# Files land in $LONGWRITER_REAL_MODEL_DIR/types (default
# ~/.cache/longwriter/real-model/types); existing files are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$(scripts/fetch_real_model.sh)
BIN=${LONGWRITER_LLAMA_BIN:-$(scripts/llama_cpp_tools.sh | tail -1)}
OUT="$(dirname "$MODEL")/types"
mkdir -p "$OUT"
quantize() { # src dst type [imatrix [more llama-quantize options]]
    [ -f "$2" ] && return 0
    local extra=()
    [ -n "${4:-}" ] && extra=(--imatrix "$4" "${@:5}")
    "$BIN/llama-quantize" --allow-requantize "${extra[@]}" "$1" "$2.tmp" "$3" 2 >/dev/null 2>"$2.log" \
        || { cat "$2.log" >&2; exit 1; }
    mv "$2.tmp" "$2"
}
F16="$OUT/smollm2-F16.gguf"
quantize "$MODEL" "$F16" F16
for t in BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K_M Q4_K_M Q5_K_M Q6_K IQ4_NL IQ4_XS; do
    quantize "$F16" "$OUT/smollm2-$t.gguf" "$t"
done
IMATRIX="$OUT/imatrix.gguf"
if [ ! -f "$IMATRIX" ]; then
    # The calibration text: the README and the shipped evaluation prompts
    # (English and Chinese).
    TEXT="$OUT/imatrix-text.txt"
    cat README.md data/eval/longbench-lw.jsonl data/eval/ruler-lw.jsonl > "$TEXT"
    "$BIN/llama-imatrix" -m "$F16" -f "$TEXT" -o "$IMATRIX.tmp.gguf" -c 256 --chunks 40 -t 2 \
        >/dev/null 2>"$IMATRIX.log" || { tail -20 "$IMATRIX.log" >&2; exit 1; }
    mv "$IMATRIX.tmp.gguf" "$IMATRIX"
fi
for t in IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S IQ1_S IQ1_M; do
    quantize "$F16" "$OUT/smollm2-$t.gguf" "$t" "$IMATRIX"
done
# The IQ2_S recipe puts IQ2_XS in the only layers whose rows are whole
# 256-blocks (ffn_down, 1536 wide; the rest of SmolLM2 is 576 wide and falls
# back to IQ4_NL), so no tensor would be IQ2_S: ask for it by name.
quantize "$F16" "$OUT/smollm2-IQ2_S-ffn.gguf" IQ2_S "$IMATRIX" --tensor-type ffn_down=iq2_s
echo "$OUT"
