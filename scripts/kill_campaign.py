#!/usr/bin/env python3
"""A kill campaign (a benchmark, not a test): SIGKILL at random points,
KILLS times each, for `write`, `serve` jobs, `data build` and `train
pretrain`, each restarted (or resumed) after every kill until it finishes;
then its result is compared with an uninterrupted run's, and every section,
item or step that was lost or written twice is counted.

- write: `--json` events; a section generated twice has two
  `section_done` events with `"resumed": false`; the final document must
  equal the uninterrupted one.
- serve: one job with a given plan; the server is killed and started again
  (it resumes the job); the store's `sections.writes` counts each section's
  writes; the document must equal the uninterrupted job's.
- data build: rerun after every kill; the items (status, reason, document)
  must equal the uninterrupted build's, and no item may have been
  attempted more than once per round.
- train: `--save-every 10`; after every kill `--resume`; the loss log must
  hold each step once, with the uninterrupted run's losses.

    python3 scripts/kill_campaign.py [--kills 20] [--only write,serve,data,train]
        [--binary target/release/longwriter]

Standard library only; loopback only.
"""

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
WORK = f"/tmp/lw-kills-{os.getpid()}"


def plan_text(n, words):
    return "".join(
        f"Paragraph {i} - Main Point: Part {i} of the river's story - Word Count: {words} words\n"
        for i in range(1, n + 1)
    )


def model_16k():
    dst = os.path.join(WORK, "model")
    if not os.path.exists(dst):
        shutil.copytree(os.path.join(ROOT, "tests/fixtures/models/qwen2"), dst)
        cfg = os.path.join(dst, "config.json")
        v = json.load(open(cfg))
        v["max_position_embeddings"] = 16384
        json.dump(v, open(cfg, "w"))
    return dst


def kill_after(proc, seconds):
    """SIGKILL `proc` after `seconds` unless it ended first; True if killed."""
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        if isinstance(proc, subprocess.Popen):
            proc.wait()
        return True


def campaign(kills, reset, start, finished, check, typical, rng):
    """Runs the work from a fresh start again and again: each run is
    started (or resumed) after every kill, killed at a random point in
    (0.05 s, typical), until it finishes; then `check()` counts what it lost
    or wrote twice. Runs follow one another until `kills` kills have landed.
    Returns the totals and a summary of the runs."""
    t0, landed, starts, runs = time.time(), 0, 0, 0
    lost = twice = 0
    notes = []
    while landed < kills:
        reset()
        runs += 1
        while True:
            proc = start()
            starts += 1
            if landed < kills and kill_after(proc, rng.uniform(0.05, typical)):
                landed += 1
                continue
            proc.wait()
            if finished():
                break
        l, t, note = check()
        lost += l
        twice += t
        if note:
            notes.append(note)
    took = time.time() - t0
    return lost, twice, f"{landed} kills over {runs} runs ({starts} starts, {took:.0f} s)" + (
        "; " + "; ".join(notes) if notes else "")


def run_write(args, rng):
    model = model_16k()
    d = os.path.join(WORK, "write")
    os.makedirs(d, exist_ok=True)
    plan = os.path.join(d, "plan.txt")
    open(plan, "w").write(plan_text(8, 200))

    def cmd(out, resume):
        base = [args.binary, "write", "--model", model, "--threads", "1", "--json"]
        if resume:
            return base + ["--resume", out]
        return base + ["--plan", plan, "--out", out, "--seed", "7", "--temperature", "1.0",
                       "Write a 1600-word story about a river."]

    ref = os.path.join(d, "reference")
    t0 = time.time()
    subprocess.run(cmd(ref, False), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    typical = time.time() - t0
    out = os.path.join(d, "killed")
    events_path = os.path.join(d, "events.jsonl")

    def reset():
        shutil.rmtree(out, ignore_errors=True)
        open(events_path, "w").close()

    def start():
        resume = os.path.exists(os.path.join(out, "state.json"))
        with open(events_path, "a") as events:
            return subprocess.Popen(cmd(out, resume), stdout=events, stderr=subprocess.DEVNULL)

    def finished():
        try:
            return json.load(open(os.path.join(out, "state.json")))["finished"]
        except (OSError, ValueError, KeyError):
            return False

    def check():
        done = {}
        for line in open(events_path, errors="replace"):
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if e.get("event") == "section_done" and not e.get("resumed"):
                i = e["section"]["index"]
                done[i] = done.get(i, 0) + 1
        twice = sum(1 for n in done.values() if n > 1)
        section = lambda root, i: os.path.join(root, f"sections/{i:03}.md")
        lost = sum(
            1 for i in range(1, 9)
            if not os.path.exists(section(out, i)) or open(section(out, i)).read() != open(section(ref, i)).read()
        )
        same = open(os.path.join(ref, "document.md")).read() == open(os.path.join(out, "document.md")).read()
        return lost, twice, None if same else "a document DIFFERS from the uninterrupted one"

    lost, twice, summary = campaign(args.kills, reset, start, finished, check, typical, rng)
    return f"write: {summary}; sections lost {lost}, written twice {twice}"


def serve_start(args, model, data_dir):
    proc = subprocess.Popen(
        [args.binary, "serve", "--port", "0", "--threads", "1", "--model", model, "--data-dir", data_dir],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    for line in proc.stderr:
        if line.startswith("listening on "):
            return proc, line.split()[2]
    raise RuntimeError("the server did not start")


def http(method, url, body=None):
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read().decode()


def run_serve(args, rng):
    model = model_16k()
    d = os.path.join(WORK, "serve")
    body = {"instruction": "Write a story about a river.", "length": 1600, "plan": plan_text(8, 200),
            "seed": 5, "temperature": 0.8}

    def job_doc(data_dir, job):
        db = sqlite3.connect(os.path.join(data_dir, "jobs.sqlite"))
        st = db.execute("SELECT status FROM jobs WHERE id = ?", (job,)).fetchone()
        rows = db.execute("SELECT idx, text, writes FROM sections WHERE job = ? ORDER BY idx", (job,)).fetchall()
        db.close()
        return (st[0] if st else None), rows

    ref_dir = os.path.join(d, "reference")
    proc, base = serve_start(args, model, ref_dir)
    t0 = time.time()
    job = json.loads(http("POST", f"{base}/v1/longwrite", body))["id"]
    while json.loads(http("GET", f"{base}/v1/longwrite/{job}"))["status"] in ("queued", "running"):
        time.sleep(0.1)
    typical = time.time() - t0
    proc.terminate()
    proc.wait()
    _, want = job_doc(ref_dir, job)

    data_dir = os.path.join(d, "killed")
    state = {"job": None, "proc": None}

    def reset():
        shutil.rmtree(data_dir, ignore_errors=True)
        state["job"] = None

    def start():
        p, b = serve_start(args, model, data_dir)
        if state["job"] is None:
            state["job"] = json.loads(http("POST", f"{b}/v1/longwrite", body))["id"]
        state["proc"] = p
        return Watch(p, lambda: finished())

    def finished():
        if state["job"] is None:
            return False
        st, _ = job_doc(data_dir, state["job"])
        return st in ("finished", "failed", "cancelled")

    def check():
        st, got = job_doc(data_dir, state["job"])
        twice = sum(1 for r in got if r[2] > 1)
        lost = sum(1 for w, g in zip(want, got) if w[1] != g[1]) + max(0, len(want) - len(got))
        return lost, twice, None if st == "finished" else f"a job ended {st}"

    lost, twice, summary = campaign(args.kills, reset, start, finished, check, typical, rng)
    return f"serve: {summary}; sections lost {lost}, written twice {twice}"


class Watch:
    """A server seen as a process that ends when its job is done: `wait`
    polls the job and then stops the server (serve never exits by itself)."""

    def __init__(self, proc, done):
        self.proc, self.done = proc, done

    def wait(self, timeout=None):
        end = None if timeout is None else time.time() + timeout
        while not self.done():
            if end is not None and time.time() >= end:
                raise subprocess.TimeoutExpired("serve", timeout)
            time.sleep(0.05)
        self.proc.terminate()
        return self.proc.wait()

    def send_signal(self, sig):
        self.proc.send_signal(sig)
        self.proc.wait()


def run_data(args, rng):
    model = os.path.join(ROOT, "models/longwriter-tiny")
    d = os.path.join(WORK, "data")
    os.makedirs(d, exist_ok=True)
    ins = os.path.join(d, "ins.jsonl")
    topics = ["a fox", "the sea", "a clock", "winter", "a lighthouse", "bread", "a violin", "the moon"]
    with open(ins, "w") as f:
        for i, t in enumerate(topics):
            f.write(json.dumps({"prompt": f"Write a {300 + 100 * (i % 2)}-word story about {t}.", "source": "kills"}) + "\n")

    def cmd(out):
        return [args.binary, "data", "build", "--quiet", "--concurrency", "4", "--threads", "1",
                "--temperature", "0", "--length-band", "0.15,3", "--model", model, "--out", out,
                "--instructions", ins]

    def items(out):
        db = sqlite3.connect(os.path.join(out, "data.sqlite"))
        rows = db.execute("SELECT id, status, reason, document, attempts, round FROM items ORDER BY id").fetchall()
        db.close()
        return rows

    ref = os.path.join(d, "reference")
    t0 = time.time()
    subprocess.run(cmd(ref), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    typical = time.time() - t0
    out = os.path.join(d, "killed")

    def reset():
        shutil.rmtree(out, ignore_errors=True)

    def start():
        return subprocess.Popen(cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finished():
        try:
            rows = items(out)
            return len(rows) == len(topics) and all(r[1] in ("accepted", "rejected") for r in rows)
        except sqlite3.Error:
            return False

    def check():
        want, got = items(ref), items(out)
        # A saved item written again would show as a changed row (its
        # document is the greedy toy's, the same each time it is written).
        lost = sum(1 for w, g in zip(want, got) if w[:4] != g[:4]) + abs(len(want) - len(got))
        return lost, 0, None

    lost, _, summary = campaign(args.kills, reset, start, finished, check, typical, rng)
    return f"data build: {summary}; items lost or changed {lost} (of {len(topics)} per run)"


def run_train(args, rng):
    d = os.path.join(WORK, "train")
    os.makedirs(d, exist_ok=True)
    corpus = os.path.join(d, "corpus.jsonl")
    subj = ["The river", "A small boat", "The old miller", "Her sister", "The north wind"]
    verbs = ["carried", "followed", "remembered", "crossed", "warmed"]
    objs = ["the valley.", "the stone bridge.", "a quiet song.", "the morning light.", "the long road home."]
    with open(corpus, "w") as f:
        for doc in range(125):
            f.write(json.dumps({"text": " ".join(f"{subj[i % 5]} {verbs[(i // 5) % 5]} {objs[(i // 25) % 5]}" for i in range(doc * 12, doc * 12 + 12))}) + "\n")
    b = args.binary
    subprocess.run([b, "tokenizer", "train", corpus, "--out", os.path.join(d, "tok"), "--vocab-size", "300"], check=True, capture_output=True)
    subprocess.run([b, "data", "tokenize", corpus, "--tokenizer", os.path.join(d, "tok"), "--out", os.path.join(d, "shards")], check=True, capture_output=True)
    cfg = os.path.join(d, "config.json")
    json.dump({"model_type": "llama", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 512, "tie_word_embeddings": True, "eos_token_id": 0}, open(cfg, "w"))

    def cmd(out, resume):
        c = [b, "train", "pretrain", "--data", os.path.join(d, "shards"), "--config", cfg, "--out", out,
             "--seq-len", "32", "--batch", "4", "--steps", "600", "--lr", "1e-2", "--warmup", "10",
             "--save-every", "10", "--threads", "1", "--quiet"]
        return c + (["--resume"] if resume else [])

    def log(out):
        rows = []
        try:
            for line in open(os.path.join(out, "loss.jsonl")):
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
        except OSError:
            pass
        return rows

    ref = os.path.join(d, "reference")
    t0 = time.time()
    subprocess.run(cmd(ref, False), check=True, capture_output=True)
    typical = time.time() - t0
    out = os.path.join(d, "killed")
    want = log(ref)

    def reset():
        shutil.rmtree(out, ignore_errors=True)

    def start():
        resume = any(n.startswith("checkpoint-") for n in os.listdir(out)) if os.path.isdir(out) else False
        return subprocess.Popen(cmd(out, resume), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finished():
        return os.path.exists(os.path.join(out, "final", "model.safetensors"))

    def check():
        got = log(out)
        steps = [r["step"] for r in got]
        twice = len(steps) - len(set(steps))
        lost = len(set(r["step"] for r in want) - set(steps))
        differ = sum(1 for w, g in zip(want, got) if w.get("loss") != g.get("loss"))
        return lost, twice, f"{differ} losses differ" if differ else None

    lost, twice, summary = campaign(args.kills, reset, start, finished, check, typical, rng)
    return f"train: {summary}; steps lost {lost}, logged twice {twice}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--only", default="write,serve,data,train")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/longwriter"))
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    rng = random.Random(args.seed)
    runs = {"write": run_write, "serve": run_serve, "data": run_data, "train": run_train}
    for name in args.only.split(","):
        print(runs[name](args, rng), flush=True)
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
