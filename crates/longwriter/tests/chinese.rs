//! A Chinese instruction end to end through `write`, a `serve` job and
//! `data build`, on a local model: the length asked in 字 is read, the plan
//! and budgets follow it, words are counted per CJK character, and the
//! data gates judge the answer's language against the instruction's.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{scratch, start, text};
use serde_json::{json, Value};

/// The qwen2 fixture with a context long enough for a piece of a few
/// hundred 字.
fn model(tag: &str) -> PathBuf {
    common::qwen2_with_context(&format!("zh-{tag}"), 16384)
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn budgets(plan: &Value) -> Vec<u64> {
    plan["paragraphs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["words"].as_u64().unwrap())
        .collect()
}

#[test]
fn write_reads_the_length_in_zi_and_plans_to_it() {
    let m = model("write");
    let run = scratch("zh-write").join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .args(["write", "--threads", "1", "--seed", "7", "--model"])
        .arg(&m)
        .arg("--out")
        .arg(&run)
        .arg("写一篇1000字的关于河流的故事。")
        .env_remove("LONGWRITER_MODEL")
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let request = read_json(&run.join("request.json"));
    assert_eq!(request["language"], "chinese");
    assert_eq!(request["asked_words"], 1000);
    // The plan grammar's budgets add up to the asked length (within the
    // rounding of each to tens).
    let planned: u64 = budgets(&read_json(&run.join("plan.json"))).iter().sum();
    assert!(planned.abs_diff(1000) <= 50, "planned {planned}");
    assert!(stderr.contains("1000 asked)"), "{stderr}");
    let state = read_json(&run.join("state.json"));
    assert_eq!(state["finished"], true);
    let sections = state["sections"].as_array().unwrap();
    let texts: Vec<String> = (1..=sections.len())
        .map(|i| std::fs::read_to_string(run.join(format!("sections/{i:03}.md"))).unwrap())
        .collect();
    let doc = std::fs::read_to_string(run.join("document.md")).unwrap();
    assert_eq!(doc, texts.join("\n\n"));
    // Delivered words are counted as `count` counts them: one per CJK
    // character plus the space-separated words.
    let delivered: u64 = sections
        .iter()
        .map(|s| s["delivered_words"].as_u64().unwrap())
        .sum();
    let counted = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .arg("count")
        .arg(run.join("document.md"))
        .output()
        .unwrap();
    let counted: u64 = text(&counted.stdout).trim().parse().unwrap();
    assert!(
        delivered.abs_diff(counted) <= sections.len() as u64 * 2,
        "sections {delivered}, document {counted}"
    );
}

#[test]
fn a_serve_job_takes_a_chinese_instruction() {
    let dir = scratch("zh-serve");
    let s = start("", &model("serve"), &dir, &[]);
    let (st, job) = s.post(
        "/v1/longwrite",
        &json!({"instruction": "写一篇800字的关于河流的故事。", "seed": 3}),
    );
    assert_eq!(st, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let done = s.wait_for(
        &format!("/v1/longwrite/{id}"),
        Duration::from_secs(120),
        |v| v["status"] != "queued" && v["status"] != "running",
    );
    assert_eq!(done["status"], "finished", "{done}");
    assert_eq!(done["asked_words"], 800, "{done}");
    let sections: Vec<&str> = done["sections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["text"].as_str().unwrap())
        .collect();
    assert!(!sections.is_empty());
    let doc = s.get_text(&format!("/v1/longwrite/{id}/document"));
    assert_eq!(doc, sections.join("\n\n"));
}

#[test]
fn data_build_judges_a_chinese_item_by_its_language() {
    let d = scratch("zh-data");
    let ins = d.join("ins.jsonl");
    std::fs::write(
        &ins,
        json!({"prompt": "写一篇600字的关于河流的故事。", "source": "test"}).to_string() + "\n",
    )
    .unwrap();
    let out = d.join("data");
    let res = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .args(["data", "build", "--quiet", "--concurrency", "1"])
        .args(["--threads", "1", "--length-band", "0.15,3", "--model"])
        .arg(model("data"))
        .arg("--out")
        .arg(&out)
        .arg("--instructions")
        .arg(&ins)
        .env_remove("LONGWRITER_MODEL")
        .env_remove("OPENAI_API_KEY")
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", text(&res.stderr));
    let db = rusqlite::Connection::open(out.join("data.sqlite")).unwrap();
    let (prompt, status, reason, detail, request, plan): (
        String,
        String,
        Option<String>,
        Option<String>,
        String,
        String,
    ) = db
        .query_row(
            "SELECT prompt, status, reason, detail, request, plan FROM items",
            [],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            },
        )
        .unwrap();
    assert_eq!(prompt, "写一篇600字的关于河流的故事。");
    let request: Value = serde_json::from_str(&request).unwrap();
    assert_eq!(
        (
            request["language"].as_str(),
            request["asked_words"].as_u64()
        ),
        (Some("chinese"), Some(600))
    );
    let planned: u64 = budgets(&serde_json::from_str(&plan).unwrap()).iter().sum();
    assert!(planned.abs_diff(600) <= 50, "planned {planned}");
    // The random model's text is mostly Latin noise: the language gate
    // names both languages; were it Chinese, the item would pass it.
    match status.as_str() {
        "rejected" if reason.as_deref() == Some("language") => {
            assert!(detail.as_deref().unwrap_or("").contains("zh"), "{detail:?}")
        }
        "accepted" | "rejected" => {}
        other => panic!("item {other}: {reason:?} {detail:?}"),
    }
}
