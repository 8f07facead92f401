//! `longwriter study`: the Karel data of the probing study.

use std::process::Command;

use lw_study::karel::{parse_program, run, World};
use serde_json::Value;

fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The input/output worlds of an example's text, in order.
fn spec(text: &str) -> Vec<(World, World)> {
    let body = &text[..text.rfind("program:").unwrap()];
    let mut worlds = Vec::new();
    let mut current = String::new();
    for line in body.lines() {
        if line.starts_with("input ") || line.starts_with("output ") {
            if !current.is_empty() {
                worlds.push(World::parse(&current).unwrap());
                current.clear();
            }
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    worlds.push(World::parse(&current).unwrap());
    worlds
        .chunks(2)
        .map(|p| (p[0].clone(), p[1].clone()))
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
        let pairs = spec(text);
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
