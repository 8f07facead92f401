#!/usr/bin/env python3
"""A soak of `longwriter serve` (a benchmark, not a test): many concurrent
streaming clients on loopback for a while, some of them disconnecting at
random mid-stream, then a report.

Every request is one of a fixed set of seeded prompts whose text was first
taken from the server alone (one client at a time); a response that differs
from its solo text, a failed request, RSS growth of 5% or more, or a
`/health` that does not return to 0 running and 0 waiting are the failures
it counts.

    python3 scripts/soak_serve.py [--clients 64] [--seconds 600]
        [--model models/tiny-random-qwen2] [--binary target/release/longwriter]

Standard library only.
"""

import argparse
import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def request(port, body, drop_after=None, timeout=300):
    """POST a streamed chat completion; the concatenated deltas, or None
    when this client hung up on purpose after `drop_after` deltas."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}: {resp.read()[:200]!r}")
    text, n = [], 0
    while True:
        line = resp.readline()
        if not line:
            raise RuntimeError("stream ended without [DONE]")
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        delta = json.loads(data)["choices"][0]["delta"].get("content")
        if delta:
            text.append(delta)
        n += 1
        if drop_after is not None and n >= drop_after:
            conn.close()
            return None
    conn.close()
    return "".join(text)


def health(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/health")
    v = json.loads(conn.getresponse().read())
    conn.close()
    return v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--model", default=os.path.join(ROOT, "models/tiny-random-qwen2"))
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/longwriter"))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--drop-share", type=float, default=0.1)
    args = ap.parse_args()

    data_dir = f"/tmp/lw-soak-{os.getpid()}"
    server = subprocess.Popen(
        [args.binary, "serve", "--port", "0", "--model", args.model, "--data-dir", data_dir,
         "--max-batch", "16", "--max-queue", str(args.clients * 2)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    port = None
    for line in server.stderr:
        if line.startswith("listening on "):
            port = int(line.split()[2].rsplit(":", 1)[1])
            break
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
    try:
        bodies = [
            {"messages": [{"role": "user", "content": f"Tell story number {i} about a river."}],
             "max_tokens": args.max_tokens, "temperature": 0.8, "seed": 1000 + i, "stream": True}
            for i in range(args.prompts)
        ]
        solo = [request(port, b) for b in bodies]
        rss_idle = rss_kib(server.pid)
        # RSS "at start" is taken once the full load has run for a warm-up
        # (a tenth of the run, at most 60 s): the batch's caches and buffers
        # grow to the load's size first.
        warmup = min(60.0, args.seconds / 10)
        rss_start = None
        stop = time.time() + args.seconds
        lock = threading.Lock()
        counts = {"requests": 0, "dropped": 0, "failures": 0, "differ": 0}
        errors = []

        def client(seed):
            rng = random.Random(seed)
            while time.time() < stop:
                i = rng.randrange(len(bodies))
                drop = rng.randrange(1, 8) if rng.random() < args.drop_share else None
                try:
                    got = request(port, bodies[i], drop)
                    with lock:
                        counts["requests"] += 1
                        if got is None:
                            counts["dropped"] += 1
                        elif got != solo[i]:
                            counts["differ"] += 1
                except Exception as e:  # noqa: BLE001 - counted and reported
                    with lock:
                        counts["requests"] += 1
                        counts["failures"] += 1
                        if len(errors) < 5:
                            errors.append(repr(e))

        threads = [threading.Thread(target=client, args=(s,)) for s in range(args.clients)]
        started = time.time()
        for t in threads:
            t.start()
        time.sleep(warmup)
        rss_start = rss_kib(server.pid)
        for t in threads:
            t.join()
        took = time.time() - started
        # Dropped streams free their sequences at the next step.
        settle = time.time() + 30
        h = health(port)
        while (h["running"] or h["waiting"]) and time.time() < settle:
            time.sleep(0.2)
            h = health(port)
        rss_end = rss_kib(server.pid)
        growth = (rss_end - rss_start) / max(rss_start, 1)
        print(f"soak: {args.clients} clients, {took:.0f} s, {counts['requests']} requests "
              f"({counts['dropped']} dropped on purpose), {counts['failures']} failures, "
              f"{counts['differ']} differing from their solo runs")
        print(f"rss: {rss_idle / 1024:.1f} MiB idle, {rss_start / 1024:.1f} MiB after a {warmup:.0f} s warm-up, {rss_end / 1024:.1f} MiB at end "
              f"({100 * growth:+.1f}%); /health at the end: running {h['running']}, "
              f"waiting {h['waiting']}, finished {h['finished']}")
        for e in errors:
            print("error:", e)
        ok = (counts["failures"] == 0 and counts["differ"] == 0 and growth < 0.05
              and h["running"] == 0 and h["waiting"] == 0)
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    sys.exit(main())
