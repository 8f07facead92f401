#!/usr/bin/env bash
# Builds a small bilingual training corpus from public-domain and permissively
# licensed text that the package registries reachable here carry:
#
#   English   Jane Austen's six novels (Debian r-cran-janeaustenr, public domain)
#             Moby-Dick (Debian r-cran-tokenizers, public domain)
#             the World English Bible (Debian sword-text-web, public domain)
#   Chinese   classical poetry and prose (npm chinese-poetry, MIT), converted
#             from Traditional to Simplified with OpenCC (npm opencc-js, MIT)
#   Dialogue  chit-chat conversations (PyPI chitchat-dataset, MIT)
#
# Output: OUT/corpus/*.jsonl, one document per line as {"text", "source"},
# ready for `longwriter tokenizer train` and `longwriter data tokenize`, and
# OUT/SOURCES.md with where each file came from.
#
#   scripts/fetch_corpus.sh OUT [--max-zh-mb 20]
#
# Needs network access to Debian's archive, the npm registry and PyPI, and
# root (or sudo) for apt-get. Rerunning reuses what is already downloaded.
set -euo pipefail

OUT="${1:?usage: scripts/fetch_corpus.sh OUT [--max-zh-mb N]}"
shift
MAX_ZH_MB=20
while [ $# -gt 0 ]; do
  case "$1" in
    --max-zh-mb) MAX_ZH_MB="$2"; shift 2 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT/corpus" "$OUT/cache"
OUT="$(cd "$OUT" && pwd)"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need_apt=()
for p in r-cran-janeaustenr r-cran-tokenizers sword-text-web diatheke; do
  dpkg -s "$p" >/dev/null 2>&1 || need_apt+=("$p")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]} (Debian)" >&2
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need_apt[@]}"
fi

echo "English: Austen and Moby-Dick" >&2
Rscript --vanilla - "$OUT/cache" <<'R'
args <- commandArgs(trailingOnly = TRUE)
library(janeaustenr)
b <- austen_books()
for (t in unique(b$book)) {
  f <- file.path(args[1], paste0("austen-", gsub("[^a-z]+", "-", tolower(t)), ".txt"))
  writeLines(b$text[b$book == t], f)
}
library(tokenizers)
data(mobydick, package = "tokenizers")
writeLines(mobydick, file.path(args[1], "melville-moby-dick.txt"))
R

echo "English: the World English Bible" >&2
diatheke -b engWEB2015eb -f plain -o f -k "Genesis 1:1-Revelation of John 22:21" > "$OUT/cache/bible-web.raw"

echo "Chinese: classical poetry and prose" >&2
if [ ! -d "$OUT/cache/npm/node_modules/chinese-poetry" ] || [ ! -d "$OUT/cache/npm/node_modules/opencc-js" ]; then
  mkdir -p "$OUT/cache/npm"
  (cd "$OUT/cache/npm" && npm install --no-audit --no-fund --silent chinese-poetry@2.0.1 opencc-js@1.4.2)
fi
NODE_PATH="$OUT/cache/npm/node_modules" node - "$OUT/cache/npm/node_modules/chinese-poetry/dist" \
  "$OUT/corpus/zh-poetry.jsonl" "$MAX_ZH_MB" <<'JS'
const fs = require("fs");
const path = require("path");
const OpenCC = require("opencc-js");
const [root, outFile, maxMb] = process.argv.slice(2);
const toSimplified = OpenCC.Converter({ from: "tw", to: "cn" });
const limit = Number(maxMb) * 1024 * 1024;
// Works with the most text first; each poem or chapter is one document.
const order = ["shijing", "chuci", "lunyu", "mengxue", "sishuwujing", "youmengying",
  "caocaoshiji", "nalanxingde", "wudaishici", "yuanqu", "songci", "quantangshi", "shuimotangshi"];
const files = [];
for (const dir of order) {
  const d = path.join(root, dir);
  if (!fs.existsSync(d) || !fs.statSync(d).isDirectory()) continue;
  for (const f of fs.readdirSync(d).sort()) {
    if (f.endsWith(".json") && !f.startsWith("authors")) files.push([dir, path.join(d, f)]);
  }
}
const lines = (v) => Array.isArray(v) ? v.flatMap(lines) : typeof v === "string" ? [v] : [];
const out = fs.openSync(outFile, "w");
let bytes = 0, docs = 0;
outer: for (const [dir, f] of files) {
  let data;
  try { data = JSON.parse(fs.readFileSync(f, "utf8")); } catch { continue; }
  const items = Array.isArray(data) ? data : [data];
  for (const it of items) {
    if (!it || typeof it !== "object") continue;
    const body = lines(it.paragraphs || it.content || it.para || it.text || []);
    if (!body.length) continue;
    const head = [it.title || it.rhythmic || it.chapter, it.author].filter(Boolean).join(" · ");
    const text = toSimplified((head ? head + "\n" : "") + body.join("\n"));
    const line = JSON.stringify({ text, source: "chinese-poetry/" + dir }) + "\n";
    fs.writeSync(out, line);
    bytes += Buffer.byteLength(line);
    docs += 1;
    if (bytes >= limit) break outer;
  }
}
fs.closeSync(out);
console.error(`  ${docs} documents, ${(bytes / 1048576).toFixed(1)} MB`);
JS

echo "Dialogue: chit-chat conversations" >&2
if ! ls "$OUT"/cache/chitchat_dataset-*.whl >/dev/null 2>&1; then
  python3 -m pip download -q --no-deps chitchat-dataset==0.9.0 -d "$OUT/cache"
fi

python3 - "$OUT" <<'PY'
"""Turns the downloaded sources into JSONL documents."""
import glob, json, os, re, sys, zipfile

out = sys.argv[1]
cache = os.path.join(out, "cache")

def write(name, docs, source):
    n = 0
    with open(os.path.join(out, "corpus", name), "w", encoding="utf-8") as f:
        for d in docs:
            d = d.strip()
            if d:
                f.write(json.dumps({"text": d, "source": source}, ensure_ascii=False) + "\n")
                n += 1
    print(f"  {name}: {n} documents", file=sys.stderr)

def chapters(text):
    """Splits a novel at its chapter headings; each chapter is a document."""
    return re.split(r"\n(?=(?:CHAPTER|Chapter)\s+[0-9IVXLC]+\b)", text)

novels = []
for path in sorted(glob.glob(os.path.join(cache, "austen-*.txt")) + [os.path.join(cache, "melville-moby-dick.txt")]):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    # Hard-wrapped lines back into paragraphs.
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    novels.extend(chapters("\n\n".join(p for p in paras if p)))
write("en-novels.jsonl", novels, "janeaustenr+tokenizers (Debian)")

# The Bible: one document per chapter, verse numbers and footnotes removed.
chapters_web, current, key = [], [], None
with open(os.path.join(cache, "bible-web.raw"), encoding="utf-8") as f:
    for line in f:
        m = re.match(r"^(.+?) (\d+):(\d+): (.*)$", line.rstrip("\n"))
        if not m:
            continue
        book, chap, _, verse = m.groups()
        verse = re.sub(r"\s*\[\d+:\d+[^\]]*\]", "", verse).strip()
        if (book, chap) != key:
            if current:
                chapters_web.append(f"{key[0]} {key[1]}\n" + " ".join(current))
            key, current = (book, chap), []
        if verse:
            current.append(verse)
if current:
    chapters_web.append(f"{key[0]} {key[1]}\n" + " ".join(current))
write("en-bible-web.jsonl", chapters_web, "World English Bible (Debian sword-text-web)")

# Dialogues: each conversation, one turn per line.
wheel = sorted(glob.glob(os.path.join(cache, "chitchat_dataset-*.whl")))[-1]
data = json.loads(zipfile.ZipFile(wheel).read("chitchat_dataset/dataset.json"))
convs = []
for conv in data.values():
    turns = [" ".join(m["text"] for m in turn) for turn in conv.get("messages", [])]
    convs.append("\n".join(t for t in turns if t.strip()))
write("en-chitchat.jsonl", convs, "chitchat-dataset (PyPI)")
PY

cat > "$OUT/SOURCES.md" <<'MD'
# Sources of this corpus

| file | source | licence |
| --- | --- | --- |
| corpus/en-novels.jsonl | Jane Austen's six novels (Debian `r-cran-janeaustenr`), Moby-Dick (Debian `r-cran-tokenizers`); one chapter per document | public domain |
| corpus/en-bible-web.jsonl | World English Bible (Debian `sword-text-web`, read with `diatheke`); one chapter per document | public domain |
| corpus/zh-poetry.jsonl | `chinese-poetry` 2.0.1 (npm), Traditional converted to Simplified with `opencc-js` 1.4.2; one poem or chapter per document | MIT |
| corpus/en-chitchat.jsonl | `chitchat-dataset` 0.9.0 (PyPI); one conversation per document | MIT |
MD
echo "corpus written to $OUT/corpus ($(du -sh "$OUT/corpus" | cut -f1)); sources in $OUT/SOURCES.md" >&2
