#!/usr/bin/env python3
"""Long-writing instructions for the fine-tuning recipe (scripts/longwriter_smol.sh),
in English and Chinese: genres x topics x lengths (1,000-10,000 words, or
characters for Chinese), drawn without repeats under a fixed seed; and short
questions whose answers keep the fine-tuned model answering short prompts
briefly.

    python scripts/make_long_instructions.py --out RUN/instructions.jsonl \
        --short-out RUN/short.jsonl --count 300 --short 100 --seed 1 \
        --check data/eval/longbench-lw.jsonl data/eval/ruler-lw.jsonl

Long lines: {"prompt", "type", "length", "lang"} (the benchmark format, which
`data build --instructions` also reads). Short lines: the same fields with a
small length. With --check, every instruction is compared with the
evaluation prompts: identical prompts, and the largest share of an
instruction's word 5-grams (character 5-grams for Chinese) that occur in any
one evaluation prompt; the figures go to stdout as JSON and the run stops
with an error if an evaluation prompt is copied.
"""

import argparse
import itertools
import json
import random
import re
import sys

LENGTHS = [1000, 1500, 2000, 3000, 4000, 5000, 6000, 8000, 10000]

EN_GENRES = [
    ("story", "Write a {n}-word short story about {t}."),
    ("essay", "Write a {n}-word essay that argues a position on {t}."),
    ("report", "Write a {n}-word report on {t}, with findings and recommendations."),
    ("guide", "Write a {n}-word practical guide to {t} for beginners."),
    ("history", "Write a {n}-word history of {t}."),
    ("explainer", "Explain {t} in about {n} words for curious readers without a technical background."),
    ("letter", "Write a {n}-word open letter about {t} to the people it affects."),
    ("speech", "Write a {n}-word speech on {t} for a town-hall audience."),
    ("review", "Write a {n}-word review of an imagined book about {t}."),
    ("textbook", "Write a {n}-word textbook chapter introducing {t}."),
]

EN_TOPICS = [
    "a beekeeper who inherits a failing orchard",
    "the building of the first transatlantic telegraph cable",
    "how glaciers shape mountain valleys",
    "running a volunteer fire brigade in a small town",
    "the economics of public libraries",
    "a chess prodigy who refuses to play in tournaments",
    "urban rooftop farming",
    "the spread of the printing press in Europe",
    "learning a second language as an adult",
    "the life cycle of a coral reef",
    "a night-shift nurse in a winter storm",
    "designing a small museum for a fishing village",
    "the history of the bicycle",
    "water rights on a shared river",
    "the craft of restoring old violins",
    "commuting by train across a large country",
    "the discovery of penicillin",
    "a cartographer mapping an island that keeps changing",
    "composting at home",
    "the ethics of zoos",
    "a family bakery through three generations",
    "how vaccines are tested",
    "the rise of container shipping",
    "keeping a garden through a drought",
    "the first year of teaching in a rural school",
    "lighthouses and the people who kept them",
    "the science of sleep",
    "a migration of cranes seen by one village",
    "open-source software communities",
    "the salt trade in the ancient world",
]

ZH_GENRES = [
    ("story", "请写一篇{n}字的短篇小说，讲述{t}。"),
    ("essay", "请写一篇{n}字的议论文，围绕{t}提出并论证你的观点。"),
    ("report", "请写一份{n}字的调查报告，主题是{t}，包括发现和建议。"),
    ("guide", "请写一篇{n}字的入门指南，介绍{t}。"),
    ("history", "请写一篇{n}字的文章，讲述{t}的历史。"),
    ("explainer", "请用{n}字左右向普通读者解释{t}。"),
    ("letter", "请写一封{n}字的公开信，谈谈{t}。"),
    ("speech", "请写一篇{n}字的演讲稿，主题是{t}。"),
    ("review", "请写一篇{n}字的书评，评价一本关于{t}的书（书名可虚构）。"),
    ("textbook", "请写一篇{n}字的教材式文章，系统介绍{t}。"),
]

ZH_TOPICS = [
    "一位养蜂人接手一片荒废的果园",
    "青藏铁路的修建",
    "冰川如何塑造山谷",
    "小镇志愿消防队的日常",
    "公共图书馆的价值",
    "一个拒绝参加比赛的围棋少年",
    "城市屋顶农场",
    "造纸术的传播",
    "成年人学习外语",
    "珊瑚礁的一生",
    "暴风雪之夜值班的护士",
    "为渔村设计一座小博物馆",
    "自行车在中国的普及",
    "一条河流两岸村庄的用水之争",
    "修复老提琴的手艺",
    "乘火车穿越中国",
    "青霉素的发现",
    "一位测绘不断变化的海岛的制图师",
    "家庭堆肥",
    "动物园的伦理问题",
    "一家三代人经营的面包店",
    "疫苗是如何测试的",
    "集装箱运输的兴起",
    "干旱中照料菜园",
    "乡村学校教师的第一年",
    "睡眠的科学",
    "一个村庄看到的鹤群迁徙",
    "开源软件社区",
    "古代的盐业贸易",
    "二十四节气与农耕生活",
]

EN_SHORT = [
    "In one sentence, what is {t}?",
    "Give a two-sentence summary of {t}.",
    "Name one surprising fact about {t}, briefly.",
]
ZH_SHORT = [
    "用一句话说明{t}是什么。",
    "用两句话概括{t}。",
    "简要说出一个关于{t}的有趣事实。",
]


def grams(text, lang, n=5):
    if lang == "zh":
        chars = [c for c in text if not c.isspace()]
        units = chars
    else:
        units = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(units[i : i + n]) for i in range(len(units) - n + 1)}


def lang_of(text):
    return "zh" if re.search(r"[\u4e00-\u9fff]", text) else "en"


def long_instructions(count, seed, langs=("en", "zh")):
    rng = random.Random(seed)
    pool = []
    for lang, genres, topics in (("en", EN_GENRES, EN_TOPICS), ("zh", ZH_GENRES, ZH_TOPICS)):
        for (kind, form), topic, n in itertools.product(genres, topics, LENGTHS):
            pool.append({"prompt": form.format(n=n, t=topic), "type": kind, "length": n, "lang": lang})
    # The languages in turn (half English, half Chinese by default), each
    # spread over genres and lengths.
    by_lang = {l: [p for p in pool if p["lang"] == l] for l in ("en", "zh")}
    for l in ("en", "zh"):
        rng.shuffle(by_lang[l])
    per_lang = min(len(by_lang[l]) for l in langs)
    if count > per_lang * len(langs):
        sys.exit(f"--count {count}: only {per_lang * len(langs)} distinct instructions can be made")
    return [by_lang[langs[i % len(langs)]][i // len(langs)] for i in range(count)]


def short_instructions(count, seed, langs=("en", "zh")):
    rng = random.Random(seed + 1)
    pool = []
    for lang, forms, topics in (("en", EN_SHORT, EN_TOPICS), ("zh", ZH_SHORT, ZH_TOPICS)):
        if lang not in langs:
            continue
        for form, topic in itertools.product(forms, topics):
            pool.append({"prompt": form.format(t=topic), "type": "short", "length": 50, "lang": lang})
    rng.shuffle(pool)
    if count > len(pool):
        sys.exit(f"--short {count}: only {len(pool)} distinct short prompts can be made")
    return pool[:count]


def check(items, paths):
    evals = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    evals.append(json.loads(line)["prompt"])
    eval_set = set(evals)
    eval_grams = [(grams(e, lang_of(e)), lang_of(e)) for e in evals]
    identical = 0
    worst = 0.0
    worst_pair = None
    for it in items:
        if it["prompt"] in eval_set:
            identical += 1
        g = grams(it["prompt"], it["lang"])
        if not g:
            continue
        for eg, el in eval_grams:
            if el != it["lang"]:
                continue
            share = len(g & eg) / len(g)
            if share > worst:
                worst, worst_pair = share, it["prompt"]
    return {
        "instructions": len(items),
        "evaluation_prompts": len(evals),
        "identical": identical,
        "max_5gram_overlap": round(worst, 3),
        "most_overlapping": worst_pair,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--short-out")
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--short", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--min-length", type=int, default=0, help="drop instructions asking for less")
    ap.add_argument("--max-length", type=int, default=10**9, help="scale lengths down to at most this")
    ap.add_argument("--check", nargs="*", default=[])
    ap.add_argument(
        "--langs",
        default="en,zh",
        help="comma-separated languages, in turn (en, zh; default both: a model that "
        "knows one language builds poor data in the other)",
    )
    a = ap.parse_args()
    langs = tuple(l.strip() for l in a.langs.split(",") if l.strip())
    if not langs or any(l not in ("en", "zh") for l in langs):
        sys.exit(f"--langs {a.langs!r}: expected en, zh or en,zh")
    items = long_instructions(a.count, a.seed, langs)
    if a.max_length < max(LENGTHS):
        # Toy runs: the same instructions asking for less.
        for it in items:
            n = max(20, it["length"] * a.max_length // max(LENGTHS))
            it["prompt"] = it["prompt"].replace(str(it["length"]), str(n), 1)
            it["length"] = n
    with open(a.out, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    if a.short_out:
        with open(a.short_out, "w", encoding="utf-8") as f:
            for it in short_instructions(a.short, a.seed, langs):
                f.write(json.dumps(it, ensure_ascii=False) + "\n")
    if a.check:
        report = check(items, a.check)
        print(json.dumps(report, ensure_ascii=False))
        if report["identical"]:
            sys.exit(f"{report['identical']} instructions copy an evaluation prompt")


if __name__ == "__main__":
    main()
