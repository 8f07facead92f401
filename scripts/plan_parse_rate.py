#!/usr/bin/env python3
"""Plan parse rate of a model on the shipped evaluation prompts, with and
without the plan grammar: one `longwriter plan --plan-tries 1` per prompt,
fixed seed; a plan counts when it parses and fits the asked length.

    scripts/plan_parse_rate.py BINARY MODEL [PROMPTS.jsonl] [MODES]

MODES: comma-separated, `constrained,unconstrained` by default.

Prints one line per prompt and mode, then the rates.
"""
import json
import subprocess
import sys
import time

binary, model = sys.argv[1], sys.argv[2]
prompts = sys.argv[3] if len(sys.argv) > 3 else "data/eval/longbench-lw.jsonl"
modes = sys.argv[4].split(",") if len(sys.argv) > 4 else ["constrained", "unconstrained"]
rows = [json.loads(line) for line in open(prompts, encoding="utf-8") if line.strip()]
rates = {}
for mode in modes:
    ok = 0
    started = time.time()
    for row in rows:
        args = [binary, "plan", "--model", model, "--threads", "2", "--plan-tries", "1", "--seed", "42"]
        if mode == "unconstrained":
            args.append("--no-constrain")
        out = subprocess.run(args + [row["prompt"]], capture_output=True, text=True)
        passed = out.returncode == 0
        ok += passed
        last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""
        print(f"{mode:13} {row['id']:6} {row['length']:6} {'ok ' if passed else 'BAD'} {last[:110]}", flush=True)
    rates[mode] = (ok, len(rows), time.time() - started)
for mode, (ok, n, secs) in rates.items():
    print(f"{mode}: {ok}/{n} plans usable ({100.0 * ok / n:.0f}%), {secs:.0f} s")
