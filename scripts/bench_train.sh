#!/usr/bin/env bash
# Training throughput of `longwriter train pretrain` against PyTorch on the
# same model config, batch shape and thread count, measured in one run.
#
#   scripts/bench_train.sh SHARDS_DIR [PRESET] [THREADS] [BATCH] [SEQ_LEN]
#
# SHARDS_DIR comes from `longwriter data tokenize`; PyTorch comes from the
# reference venv (PYTHON, default /work/venv-ref/bin/python; see
# scripts/requirements-ref.txt). Steady-state figures: the first 2 steps of
# each are warm-up and not counted.
set -euo pipefail
data=$1
preset=${2:-5m}
threads=${3:-2}
batch=${4:-8}
seq=${5:-256}
python=${PYTHON:-/work/venv-ref/bin/python}
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${LONGWRITER:-$here/target/release/longwriter}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
steps=10
"$bin" train pretrain --data "$data" --preset "$preset" --seq-len "$seq" --batch "$batch" \
    --steps "$steps" --eval-every 0 --eval-batches 1 --threads "$threads" --quiet --out "$out/lw" >/dev/null 2>&1
ours=$("$python" - "$out/lw/loss.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
a, b = rows[1], rows[-1]
print((b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"]))
PY
)
theirs=$("$python" "$here/scripts/bench_train_torch.py" --config "$out/lw/final/config.json" \
    --batch "$batch" --seq-len "$seq" --threads "$threads" --steps "$steps" | tail -1 |
    "$python" -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_s"])')
"$python" - "$ours" "$theirs" "$preset" "$threads" "$batch" "$seq" <<'PY'
import json, sys
ours, theirs = float(sys.argv[1]), float(sys.argv[2])
print(json.dumps({"preset": sys.argv[3], "threads": int(sys.argv[4]), "batch": int(sys.argv[5]),
                  "seq_len": int(sys.argv[6]), "longwriter_tokens_per_s": round(ours, 1),
                  "torch_tokens_per_s": round(theirs, 1), "ratio": round(ours / theirs, 3)}))
PY
