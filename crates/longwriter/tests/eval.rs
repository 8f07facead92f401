//! `longwriter eval` end to end: the shipped benchmark sets, a run against a
//! real local server killed and resumed, length scores, a judge that never
//! answers in JSON, and a report comparing two runs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{root, scratch, start, tiny_model};
use serde_json::Value;

fn lw() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_longwriter"));
    c.current_dir(root());
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn the_shipped_benchmark_sets_are_bilingual_and_their_prompts_state_their_lengths() {
    let bench = jsonl(&root().join("data/eval/longbench-lw.jsonl"));
    assert!(bench.len() >= 40);
    let zh = bench.iter().filter(|v| v["lang"] == "zh").count();
    assert_eq!(zh * 2, bench.len(), "half Chinese, half English");
    let mut buckets = std::collections::BTreeSet::new();
    let mut types = std::collections::BTreeSet::new();
    for v in &bench {
        let length = v["length"].as_u64().unwrap();
        assert!((100..=20_000).contains(&length));
        buckets.insert(lw_eval::bucket_of(length));
        types.insert(v["type"].as_str().unwrap().to_string());
        let prompt = v["prompt"].as_str().unwrap();
        assert_eq!(
            lw_write::requested_length(prompt).map(u64::from),
            Some(length),
            "the prompt states its length: {prompt}"
        );
    }
    assert_eq!(buckets.len(), 4, "all four buckets: {buckets:?}");
    assert!(types.len() >= 6, "several genres: {types:?}");
    let ruler = jsonl(&root().join("data/eval/ruler-lw.jsonl"));
    assert_eq!(ruler.len(), 48);
    for v in &ruler {
        assert_eq!(
            lw_write::requested_length(v["prompt"].as_str().unwrap()).map(u64::from),
            v["length"].as_u64()
        );
    }
}

fn run_cmd(base: &str, out: &Path, mode: &str) -> Command {
    let mut c = lw();
    c.args(["eval", "run", "--quiet", "--api-key", "ek", "--api-base"])
        .arg(format!("{base}/v1"))
        .args(["--bench", "data/eval/longbench-lw.jsonl", "--limit", "8"])
        .args(["--concurrency", "4", "--max-tokens", "300", "--mode", mode])
        .arg("--out")
        .arg(out);
    c
}

#[test]
fn eval_run_resumes_after_a_kill_and_the_report_compares_two_runs() {
    let work = scratch("eval");
    let s = start(
        "ek",
        &tiny_model(),
        &work.join("data"),
        &["--max-new-tokens", "4096"],
    );
    let direct = work.join("direct");
    // Kill the run once some predictions are saved, then rerun it.
    let mut child = run_cmd(&s.base, &direct, "direct")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pred = direct.join("pred.jsonl");
    let started = Instant::now();
    loop {
        let lines = std::fs::read_to_string(&pred)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines >= 2 || child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = jsonl(&pred).len();
    assert!(before < 8, "killed before the end ({before} of 8 saved)");
    let out: Output = run_cmd(&s.base, &direct, "direct").output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&format!("{before} resumed")), "{stderr}");
    let preds = jsonl(&pred);
    let mut ids: Vec<&str> = preds.iter().map(|p| p["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 8, "every item once");
    assert_eq!(preds.len(), 8, "no item generated twice");
    assert!(preds
        .iter()
        .all(|p| p["error"].is_null() && p["response"].as_str().is_some_and(|r| !r.is_empty())));
    // A third run has nothing left to do.
    let out = run_cmd(&s.base, &direct, "direct").output().unwrap();
    assert!(
        text(&out.stderr).contains("8 resumed, 0 generated"),
        "{}",
        text(&out.stderr)
    );

    // Length scores as JSON, with the benchmark's counter.
    let out = lw()
        .args(["eval", "length", "--json"])
        .arg(&pred)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    for key in ["overall", "by_bucket", "by_type", "items"] {
        assert!(!v[key].is_null(), "{key} in {v}");
    }
    assert_eq!(v["items"].as_array().unwrap().len(), 8);
    assert!(v["items"][0]["repetition"]["seq_rep_4"].is_number());
    let overall = v["overall"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&overall));

    // AgentWrite with a model that cannot plan (and no plan grammar sent
    // to hold it): every item fails, and says why.
    let agent = work.join("agentwrite");
    let out = run_cmd(&s.base, &agent, "agentwrite")
        .arg("--no-constrain")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let failed = jsonl(&agent.join("pred.jsonl"));
    assert_eq!(failed.len(), 8);
    assert!(
        failed
            .iter()
            .all(|p| p["error"].as_str().is_some_and(|e| e.contains("plan"))),
        "{:?}",
        failed[0]
    );

    // A judge that never answers in JSON: the items are reported, not dropped.
    let out = lw()
        .args([
            "eval",
            "quality",
            "--tries",
            "2",
            "--api-key",
            "ek",
            "--api-base",
        ])
        .arg(format!("{}/v1", s.base))
        .args(["--max-tokens", "40", "--json"])
        .arg(&pred)
        .output()
        .unwrap();
    assert!(!out.status.success(), "nothing could be judged");
    let v: Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    assert_eq!(v["judged"], 0);
    assert_eq!(v["unparsed"].as_array().unwrap().len(), 8);
    assert_eq!(jsonl(&direct.join("judge.jsonl")).len(), 8);

    // One report over both runs.
    let report = work.join("report");
    let out = lw()
        .args(["eval", "report"])
        .arg(&direct)
        .arg(&agent)
        .arg("--out")
        .arg(&report)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(
        md.contains("| direct |") && md.contains("| agentwrite |"),
        "{md}"
    );
    for chart in ["length", "length-score", "repetition"] {
        let png: PathBuf = report.join(format!("{chart}.png"));
        let bytes = std::fs::read(&png).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 5_000,
            "{}",
            png.display()
        );
        let svg = std::fs::read_to_string(report.join(format!("{chart}.svg"))).unwrap();
        assert!(svg.contains("<svg") && svg.contains("direct") && svg.contains("agentwrite"));
        assert!(md.contains(&format!("({chart}.png)")));
    }
}

#[test]
fn direct_answers_on_the_local_engine_take_what_the_context_leaves() {
    // The default --max-tokens (32,768) is far above a 256-token context:
    // each answer gets what the context leaves after its prompt, no error.
    let work = scratch("eval-direct-context");
    let out = lw()
        .args([
            "eval",
            "run",
            "--model",
            "tiny",
            "--ctx-size",
            "256",
            "--threads",
            "1",
        ])
        .args([
            "--bench",
            "data/eval/longbench-lw.jsonl",
            "--limit",
            "2",
            "--quiet",
        ])
        .arg("--out")
        .arg(&work)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let preds = jsonl(&work.join("pred.jsonl"));
    assert_eq!(preds.len(), 2);
    for p in &preds {
        assert!(p.get("error").is_none(), "{p}");
        let used = p["prompt_tokens"].as_u64().unwrap() + p["completion_tokens"].as_u64().unwrap();
        assert!(
            used <= 256 && p["completion_tokens"].as_u64().unwrap() > 0,
            "{p}"
        );
    }
}

#[test]
fn eval_mc_scores_choices_as_transformers_does() {
    // Reference: scripts/make_mc_fixture.py (transformers, f64) on the
    // shipped tiny model, the harness's tokenization.
    let fixtures = root().join("tests/fixtures/mc");
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("tiny.expected.json")).unwrap(),
    )
    .unwrap();
    let dir = scratch("eval-mc");
    let out = lw()
        .args(["eval", "mc", "--quiet", "--json", "--model"])
        .arg(root().join("models/longwriter-tiny"))
        .arg(fixtures.join("tiny.jsonl"))
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(summary["task"], "tiny");
    assert_eq!(summary["items"], 8);
    let got = jsonl(&dir.join("tiny.jsonl"));
    let want = expected["items"].as_array().unwrap();
    assert_eq!(got.len(), want.len());
    let mut hits = 0;
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g["id"], w["id"]);
        let choices = w["choices"].as_array().unwrap();
        for (k, c) in choices.iter().enumerate() {
            assert_eq!(g["tokens"][k], c["tokens"], "{} choice {k}", w["id"]);
            let (ours, theirs) = (
                g["logprobs"][k].as_f64().unwrap(),
                c["logprob"].as_f64().unwrap(),
            );
            assert!(
                (ours - theirs).abs() < 1e-4,
                "{} choice {k}: {ours} vs {theirs}",
                w["id"]
            );
        }
        // acc's pick is the reference's best sum.
        let best = (0..choices.len())
            .max_by(|&a, &b| {
                let s = |i: usize| choices[i]["logprob"].as_f64().unwrap();
                s(a).total_cmp(&s(b))
            })
            .unwrap();
        assert_eq!(g["pred"], best, "{}", w["id"]);
        hits += usize::from(g["pred"] == g["answer"]);
    }
    assert_eq!(summary["acc"], hits as f64 / 8.0);
    // A bad task file is named with its line, and nothing is printed.
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"p\", \"choices\": [\"a\", \"b\"], \"answer\": 5}\n",
    )
    .unwrap();
    let out = lw()
        .args(["eval", "mc", "--quiet", "--model"])
        .arg(root().join("models/longwriter-tiny"))
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("bad.jsonl:1") && err.contains("not a choice index"),
        "{err}"
    );
    // "me" merges into the prompt's last token ("ti" + "me"): no token of
    // the joint text is the choice's own, so the question's choices are
    // tokenized by themselves, as they are after an empty prompt.
    let merged = dir.join("merged.jsonl");
    std::fs::write(
        &merged,
        "{\"id\": \"m\", \"prompt\": \"Once upon a ti\", \"choices\": [\"me\", \"x\"], \"answer\": 0}\n\
         {\"id\": \"e\", \"prompt\": \"\", \"choices\": [\"me\", \"x\"], \"answer\": 0}\n",
    )
    .unwrap();
    let out = lw()
        .args(["eval", "mc", "--quiet", "--model"])
        .arg(root().join("models/longwriter-tiny"))
        .arg(&merged)
        .arg("--out")
        .arg(dir.join("merged"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got = jsonl(&dir.join("merged/merged.jsonl"));
    assert_eq!(got[0]["tokens"], got[1]["tokens"]);
    assert!(!got[0]["tokens"][0].as_array().unwrap().is_empty());
}
