//! `longwriter study`: the Karel data of the probing study.

use std::process::Command;

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
