//! `longwriter study`: the Karel data and the probing study; the
//! checkpoint fine-tuning study.

use std::process::Command;

mod common;

use lw_study::karel::{parse_program, run, Example};
use serde_json::Value;

fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn karel_data_writes_programs_that_satisfy_their_specifications() {
    let out = std::env::temp_dir().join(format!("lw-study-karel-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .args([
            "study",
            "karel-data",
            "--train",
            "300",
            "--test",
            "40",
            "--loops",
            "--out",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let train = lines(&out.join("train.jsonl"));
    let test = lines(&out.join("test.jsonl"));
    assert_eq!((train.len(), test.len()), (300, 40));
    let train_prompts: std::collections::HashSet<String> = train
        .iter()
        .map(|e| {
            let t = e["text"].as_str().unwrap();
            t[..t.rfind("program:").unwrap()].to_string()
        })
        .collect();
    for e in &test {
        let text = e["text"].as_str().unwrap();
        let prompt = e["prompt"].as_str().unwrap();
        assert!(text.starts_with(prompt) && prompt.ends_with("program:"));
        assert!(!train_prompts.contains(prompt.trim_end_matches("program:")));
        let program = parse_program(e["program"].as_str().unwrap()).unwrap();
        let pairs = Example::parse(text).unwrap().spec;
        assert_eq!(pairs.len(), 3);
        for (input, output) in &pairs {
            let (got, trace) = run(input, &program).unwrap();
            assert_eq!(&got, output);
            assert_eq!(trace.len() as u64, e["steps"].as_u64().unwrap());
        }
    }
    // Settings that make no grid are refused by name.
    let bad = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .args(["study", "karel-data", "--size", "1", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--size 1"));
    std::fs::remove_dir_all(&out).unwrap();
}

fn lw(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn the_probing_study_runs_end_to_end_at_toy_size_and_resumes() {
    // Karel data → tokenizer → shards → pretraining with checkpoints →
    // probes and generation per checkpoint → report; a rerun repeats no
    // checkpoint.
    let w = std::env::temp_dir().join(format!("lw-study-probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&w);
    let p = |s: &str| w.join(s).display().to_string();
    lw(&[
        "study",
        "karel-data",
        "--train",
        "400",
        "--test",
        "40",
        "--size",
        "5",
        "--out",
        &p("data"),
    ]);
    let text: String = lines(&w.join("data/train.jsonl"))
        .iter()
        .map(|e| format!("{}\n\n", e["text"].as_str().unwrap()))
        .collect();
    std::fs::write(w.join("train.txt"), text).unwrap();
    lw(&[
        "tokenizer",
        "train",
        "--vocab-size",
        "300",
        "--out",
        &p("tok"),
        &p("train.txt"),
    ]);
    lw(&[
        "data",
        "tokenize",
        "--tokenizer",
        &p("tok"),
        "--out",
        &p("shards"),
        &p("data/train.jsonl"),
    ]);
    lw(&[
        "train",
        "pretrain",
        "--data",
        &p("shards"),
        "--preset",
        "1m",
        "--seq-len",
        "128",
        "--batch",
        "4",
        "--steps",
        "20",
        "--save-every",
        "10",
        "--keep-every",
        "10",
        "--eval-every",
        "0",
        "--quiet",
        "--threads",
        "1",
        "--out",
        &p("run"),
    ]);
    let args = [
        "study",
        "probe",
        "--run",
        &p("run"),
        "--data",
        &p("data/test.jsonl"),
        "--out",
        &p("report"),
        "--examples",
        "24",
        "--generate",
        "6",
        "--threads",
        "1",
    ];
    lw(&args);
    let results = lines(&w.join("report/results.jsonl"));
    let steps: Vec<u64> = results
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [10, 20]);
    for r in &results {
        let g = r["generation_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&g));
        assert_eq!(r["generated"], 6);
        let probes = r["probes"].as_array().unwrap();
        // The embeddings and each of the 1m preset's layers.
        assert!(probes.len() >= 2, "{r}");
        for p in probes {
            for k in ["facing", "facing_alt", "position", "position_alt"] {
                let acc = p[k].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&acc), "{k} {acc}");
            }
        }
    }
    let report = std::fs::read_to_string(w.join("report/report.md")).unwrap();
    assert!(report.contains("| checkpoint-0000020 | 20 |"), "{report}");
    for chart in ["probe-facing.svg", "probe-facing.png", "probe-position.svg"] {
        assert!(w.join("report").join(chart).exists(), "{chart}");
    }
    // A rerun keeps both checkpoints' results without loading them again.
    let again = lw(&args);
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(err.matches("done before, kept").count(), 2, "{err}");
    assert_eq!(lines(&w.join("report/results.jsonl")).len(), 2);
    std::fs::remove_dir_all(&w).unwrap();
}

/// A bilingual toy corpus: varied English and Chinese sentences from small
/// word lists, a few documents of each.
fn toy_corpus() -> String {
    let nouns = [
        "river", "stone", "garden", "winter", "candle", "letter", "market", "window", "silver",
        "harbor", "lantern", "meadow", "orchard", "bridge", "valley", "thunder", "sailor",
        "teacher", "village", "mountain",
    ];
    let verbs = [
        "watched",
        "carried",
        "found",
        "painted",
        "followed",
        "remembered",
        "crossed",
    ];
    let hanzi: Vec<char> = "山水风月花鸟云雨江湖春秋日夜星海林石草木门窗书画茶酒舟桥灯雪"
        .chars()
        .collect();
    let mut docs = String::new();
    let mut k = 0usize;
    let mut next = || {
        k = k
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        k >> 33
    };
    for d in 0..6 {
        let mut en = String::new();
        let mut zh = String::new();
        for _ in 0..60 {
            let n = |r: usize| nouns[r % nouns.len()];
            en.push_str(&format!(
                "The {} {} the {} near the old {} before the {} came. ",
                n(next()),
                verbs[next() % verbs.len()],
                n(next()),
                n(next()),
                n(next())
            ));
            let s: String = (0..12).map(|_| hanzi[next() % hanzi.len()]).collect();
            let (a, b) = s.split_at(18);
            zh.push_str(&format!("{a}，{b}。"));
        }
        docs.push_str(&serde_json::json!({"text": en, "source": format!("en-{d}")}).to_string());
        docs.push('\n');
        docs.push_str(&serde_json::json!({"text": zh, "source": format!("zh-{d}")}).to_string());
        docs.push('\n');
    }
    docs
}

/// Sum over the questions of a per-question file (`eval mc --out`) of the
/// right choice's log-probability.
fn right_logprob(path: &std::path::Path) -> f64 {
    lines(path)
        .iter()
        .map(|r| {
            r["logprobs"][r["answer"].as_u64().unwrap() as usize]
                .as_f64()
                .unwrap()
        })
        .sum()
}

#[test]
fn the_checkpoint_study_runs_end_to_end_at_toy_size_and_resumes() {
    // Corpus → tasks → tokenizer → shards → pretraining with checkpoints →
    // per checkpoint: evaluate, fine-tune, evaluate → report; reruns
    // repeat no evaluation and no fine-tuning.
    let w = std::env::temp_dir().join(format!("lw-study-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&w);
    std::fs::create_dir_all(&w).unwrap();
    let p = |s: &str| w.join(s).display().to_string();
    let corpus = toy_corpus();
    std::fs::write(w.join("corpus.jsonl"), &corpus).unwrap();
    let text: String = corpus
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n\n");
    std::fs::write(w.join("corpus.txt"), text).unwrap();
    lw(&[
        "study",
        "mc-tasks",
        &p("corpus.jsonl"),
        "--out",
        &p("tasks"),
        "--train",
        "40",
        "--test",
        "16",
    ]);
    for t in ["langid", "cloze", "order", "paraphrase", "instruct"] {
        assert_eq!(lines(&w.join(format!("tasks/train/{t}.jsonl"))).len(), 40);
        assert_eq!(lines(&w.join(format!("tasks/test/{t}.jsonl"))).len(), 16);
    }
    lw(&[
        "tokenizer",
        "train",
        "--vocab-size",
        "400",
        "--out",
        &p("tok"),
        &p("corpus.txt"),
    ]);
    lw(&[
        "data",
        "tokenize",
        "--tokenizer",
        &p("tok"),
        "--out",
        &p("shards"),
        &p("corpus.jsonl"),
    ]);
    lw(&[
        "train",
        "pretrain",
        "--data",
        &p("shards"),
        "--preset",
        "1m",
        "--seq-len",
        "128",
        "--batch",
        "4",
        "--steps",
        "20",
        "--save-every",
        "10",
        "--keep-every",
        "10",
        "--eval-every",
        "0",
        "--quiet",
        "--threads",
        "1",
        "--out",
        &p("run"),
    ]);
    let args = [
        "study",
        "checkpoints",
        "--pretrain-run",
        &p("run"),
        "--tasks",
        &p("tasks"),
        "--sft-task",
        "instruct",
        "--out",
        &p("report"),
        "--sft-steps",
        "6",
        "--sft-batch",
        "2",
        "--sft-seq-len",
        "128",
        "--sft-lr",
        "3e-3",
        "--eval-limit",
        "8",
        "--threads",
        "1",
    ];
    let first = lw(&args);
    let err = String::from_utf8_lossy(&first.stderr);
    assert_eq!(err.matches("fine-tuning on instruct").count(), 2, "{err}");
    let results = lines(&w.join("report/results.jsonl"));
    assert_eq!(results.len(), 2 * 2 * 5);
    for r in &results {
        assert_eq!(r["items"], 8, "{r}");
        let acc = r["acc"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{r}");
        assert!([10, 20].contains(&r["step"].as_u64().unwrap()), "{r}");
    }
    // The fine-tuned model learned its task's answers: the right choices of
    // the training questions are likelier after fine-tuning than before.
    let train_task = p("tasks/train/instruct.jsonl");
    for (model, out) in [
        (p("run/checkpoint-0000020"), p("mc-before")),
        (p("report/sft/checkpoint-0000020/final"), p("mc-after")),
    ] {
        lw(&[
            "eval",
            "mc",
            "--model",
            &model,
            "--out",
            &out,
            "--quiet",
            "--threads",
            "1",
            &train_task,
        ]);
    }
    let before = right_logprob(&w.join("mc-before/instruct.jsonl"));
    let after = right_logprob(&w.join("mc-after/instruct.jsonl"));
    assert!(after > before + 1.0, "before {before}, after {after}");
    let report = std::fs::read_to_string(w.join("report/report.md")).unwrap();
    assert!(
        report.contains("| checkpoint-0000020 | 20 | **instruct** (fine-tuned) |"),
        "{report}"
    );
    for chart in [
        "checkpoints-before.svg",
        "checkpoints-after.png",
        "checkpoints-gain.svg",
    ] {
        assert!(w.join("report").join(chart).exists(), "{chart}");
    }
    // A rerun loads nothing; with one checkpoint's later results gone, it
    // evaluates them again on the fine-tuned model it kept.
    let again = lw(&args);
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(err.matches("done before, kept").count(), 4, "{err}");
    let kept: Vec<String> = results
        .iter()
        .filter(|r| !(r["step"] == 20 && r["phase"] == "after"))
        .map(|r| r.to_string() + "\n")
        .collect();
    std::fs::write(w.join("report/results.jsonl"), kept.concat()).unwrap();
    let third = lw(&args);
    let err = String::from_utf8_lossy(&third.stderr);
    assert!(!err.contains("fine-tuning on"), "{err}");
    let redone = lines(&w.join("report/results.jsonl"));
    assert_eq!(redone.len(), 20);
    for r in results
        .iter()
        .filter(|r| r["step"] == 20 && r["phase"] == "after")
    {
        assert!(redone.contains(r), "{r} not evaluated again the same");
    }
    // A task with no training split is named.
    let out = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .args([
            "study",
            "checkpoints",
            "--pretrain-run",
            &p("run"),
            "--tasks",
            &p("tasks"),
        ])
        .args(["--sft-task", "nosuch", "--out", &p("bad")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("nosuch.jsonl"), "{msg}");
    std::fs::remove_dir_all(&w).unwrap();
}

#[test]
fn the_collaboration_study_runs_four_ways_and_accounts_each_role() {
    // The giant: the shipped toy behind a real server on loopback; the
    // mini: the random fixture, local. Two short prompts, four ways.
    let w = common::scratch("study-collab");
    let giant = common::start(
        "k",
        &common::root().join("models/longwriter-tiny"),
        &w.join("server"),
        &[],
    );
    let bench = w.join("bench.jsonl");
    std::fs::write(
        &bench,
        "{\"id\": \"a\", \"prompt\": \"Write a 200-word story about a river.\", \"type\": \"story\", \"length\": 200}\n\
         {\"id\": \"b\", \"prompt\": \"Write a 300-word letter to a friend.\", \"type\": \"letter\", \"length\": 300}\n",
    )
    .unwrap();
    let mini = common::tiny_model().display().to_string();
    let api = giant.url("/v1");
    let out = w.join("report").display().to_string();
    let bench_s = bench.display().to_string();
    let args = [
        "study",
        "collaboration",
        "--giant-api-base",
        &api,
        "--giant-api-key",
        "k",
        "--giant-params",
        "5.25M",
        "--mini",
        &mini,
        "--bench",
        &bench_s,
        "--out",
        &out,
        "--threads",
        "1",
    ];
    lw(&args);
    let results = lines(&w.join("report/results.jsonl"));
    assert_eq!(results.len(), 8);
    let bytes = |r: &Value, role: &str| {
        r[role]["bytes_sent"].as_u64().unwrap() + r[role]["bytes_received"].as_u64().unwrap()
    };
    for r in &results {
        assert!(r.get("error").is_none(), "{r}");
        let s = r["length_score"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&s), "{r}");
        let (plan_remote, write_remote) = match r["config"].as_str().unwrap() {
            "all-giant" => (true, true),
            "all-mini" => (false, false),
            "giant-plans" => (true, false),
            "mini-plans" => (false, true),
            other => panic!("{other}"),
        };
        // Traffic where the giant works, none where the mini does.
        assert_eq!(bytes(r, "plan") > 0, plan_remote, "{r}");
        assert_eq!(bytes(r, "write") > 0, write_remote, "{r}");
        let giant_params = |role: &str| r[role]["parameters"].as_u64() == Some(5_250_000);
        assert_eq!(giant_params("plan"), plan_remote, "{r}");
        assert_eq!(giant_params("write"), write_remote, "{r}");
        assert!(
            r["write"]["usage"]["completion_tokens"].as_u64().unwrap() > 0,
            "{r}"
        );
        let doc = w
            .join("report/runs")
            .join(r["config"].as_str().unwrap())
            .join(r["id"].as_str().unwrap())
            .join("document.md");
        assert!(doc.exists(), "{}", doc.display());
    }
    let report = std::fs::read_to_string(w.join("report/report.md")).unwrap();
    for config in ["all-giant", "all-mini", "giant-plans", "mini-plans"] {
        assert!(report.contains(&format!("| {config} |")), "{report}");
    }
    assert!(report.contains("per client per round"), "{report}");
    assert!(report.contains("no traffic (all local)"), "{report}");
    // A rerun runs nothing again.
    let again = lw(&args);
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(err.matches("done before, kept").count(), 8, "{err}");
    // A run recorded as failed is tried again (its run directory resumed).
    let failed: Vec<String> = results
        .iter()
        .map(|r| {
            if r["config"] == "all-mini" && r["id"] == "a" {
                serde_json::json!({"config": "all-mini", "id": "a", "error": "killed"}).to_string()
            } else {
                r.to_string()
            }
        })
        .map(|l| l + "\n")
        .collect();
    std::fs::write(w.join("report/results.jsonl"), failed.concat()).unwrap();
    let retried = lw(&args);
    let err = String::from_utf8_lossy(&retried.stderr);
    assert_eq!(err.matches("done before, kept").count(), 7, "{err}");
    let now = lines(&w.join("report/results.jsonl"));
    assert_eq!(now.len(), 8);
    assert!(now.iter().all(|r| r.get("error").is_none()), "{now:?}");
    let redone = now
        .iter()
        .find(|r| r["config"] == "all-mini" && r["id"] == "a")
        .unwrap();
    let before = results
        .iter()
        .find(|r| r["config"] == "all-mini" && r["id"] == "a")
        .unwrap();
    assert_eq!(redone["delivered_words"], before["delivered_words"]);
    // An unknown configuration is named.
    let bad = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .args([
            "study",
            "collaboration",
            "--giant",
            &mini,
            "--mini",
            &mini,
            "--bench",
            &bench_s,
        ])
        .args(["--out", &out, "--configs", "all-giant,half"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("\"half\""));
    drop(giant);
    std::fs::remove_dir_all(&w).unwrap();
}
