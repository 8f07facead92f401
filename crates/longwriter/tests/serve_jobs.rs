//! Long-writing jobs over HTTP: the same AgentWrite runs as the CLI's, kept
//! in SQLite, followed as events, resumed after a SIGKILL of the server.

mod common;

use std::time::Duration;

use common::{plan_text, scratch, start, tiny_model};
use serde_json::{json, Value};

fn job_body(seed: u64, sections: usize) -> Value {
    json!({
        "instruction": "Write a story about a river.",
        "length": 150 * sections,
        "plan": plan_text(sections, 150),
        "seed": seed,
        "temperature": 0.8,
    })
}

fn finished(v: &Value) -> bool {
    matches!(
        v["status"].as_str(),
        Some("finished" | "failed" | "cancelled")
    )
}

#[test]
fn a_job_streams_its_plan_and_sections_and_its_document_matches() {
    let s = start("jk", &tiny_model(), &scratch("jobs-run"), &[]);
    let (st, job) = s.post("/v1/longwrite", &job_body(11, 3));
    assert_eq!(st, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(job["asked_words"], 450);
    let events = s.events(&format!("/v1/longwrite/{id}/events"));
    assert_eq!(events[0]["type"], "snapshot", "{}", events[0]);
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.last(), Some(&"finished"), "{kinds:?}");
    assert!(kinds.contains(&"plan") || events[0]["plan"].is_array());
    // Sequence numbers only grow.
    let seqs: Vec<u64> = events[1..]
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let got = s.wait_for(
        &format!("/v1/longwrite/{id}"),
        Duration::from_secs(60),
        finished,
    );
    assert_eq!(got["status"], "finished", "{got}");
    let sections = got["sections"].as_array().unwrap();
    assert_eq!(sections.len(), 3);
    // What streamed is what was saved, section by section (the snapshot may
    // already hold sections finished before the subscription began).
    let mut streamed = vec![String::new(); 3];
    let mut from_snapshot = [false; 3];
    for s in events[0]["sections"].as_array().unwrap() {
        from_snapshot[s["index"].as_u64().unwrap() as usize] = true;
    }
    for e in &events[1..] {
        if e["type"] == "delta" {
            streamed[e["index"].as_u64().unwrap() as usize].push_str(e["text"].as_str().unwrap());
        }
    }
    for (i, sec) in sections.iter().enumerate() {
        if !from_snapshot[i] && events[0]["current"]["index"] != json!(i) {
            assert_eq!(
                streamed[i].trim(),
                sec["text"].as_str().unwrap(),
                "section {i}"
            );
        }
    }
    for e in events.iter().filter(|e| e["type"] == "section_done") {
        let i = e["index"].as_u64().unwrap() as usize;
        assert_eq!(
            e["text"], sections[i]["text"],
            "section_done carries the saved text"
        );
    }
    let doc = s.get_text(&format!("/v1/longwrite/{id}/document"));
    let joined: Vec<&str> = sections
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    assert_eq!(doc, joined.join("\n\n"));
    let words = events.last().unwrap()["words"].as_u64().unwrap();
    assert_eq!(got["delivered_words"].as_u64().unwrap(), words);
    assert_eq!(lw_core::Counter::Unicode.count(&doc) as u64, words);
    assert!(
        got["usage"]["cached_prompt_tokens"].as_u64().unwrap() > 0,
        "later sections reuse the prefix"
    );
    // A finished job's events: the snapshot, then the end.
    let again = s.events(&format!("/v1/longwrite/{id}/events"));
    assert_eq!(again.len(), 1);
    assert_eq!(again[0]["status"], "finished");
    let (_, list) = s.get("/v1/longwrite");
    assert_eq!(list["data"][0]["id"], id.as_str());
}

#[test]
fn bad_jobs_are_refused_and_each_key_has_a_job_limit() {
    let dir = scratch("jobs-limits");
    let keys = dir.join("keys");
    std::fs::write(&keys, "one\ntwo\n").unwrap();
    let mut s = start(
        "",
        &tiny_model(),
        &dir,
        &[
            "--keys-file",
            keys.to_str().unwrap(),
            "--max-jobs-per-key",
            "1",
        ],
    );
    s.key = "one".into();
    for (what, body) in [
        ("empty instruction", json!({"instruction": "  "})),
        ("unknown mode", json!({"instruction": "x", "mode": "fast"})),
        (
            "bad plan",
            json!({"instruction": "x", "plan": "no plan here"}),
        ),
        (
            "unknown field",
            json!({"instruction": "x", "colour": "red"}),
        ),
        ("zero length", json!({"instruction": "x", "length": 0})),
        (
            "a billion words",
            json!({"instruction": "x", "length": 1_000_000_000u64}),
        ),
        (
            "a billion words in the instruction",
            json!({"instruction": "Write a 1000000000-word story about a river."}),
        ),
    ] {
        let (st, v) = s.post("/v1/longwrite", &body);
        assert_eq!(st, 400, "{what}: {v}");
        assert!(v["error"]["message"].is_string());
    }
    // A long job (direct mode: one pass of many tokens) holds key one's only slot.
    let long = json!({"instruction": "Write a very long story.", "mode": "direct", "length": 10000, "seed": 1});
    let (st, a) = s.post("/v1/longwrite", &long);
    assert_eq!(st, 201, "{a}");
    let a = a["id"].as_str().unwrap().to_string();
    let (st, v) = s.post("/v1/longwrite", &long);
    assert_eq!(st, 429, "{v}");
    assert_eq!(v["error"]["code"], "too_many_jobs");
    // Key two has its own limit and cannot see key one's job.
    s.key = "two".into();
    let (st, _) = s.get(&format!("/v1/longwrite/{a}"));
    assert_eq!(st, 404);
    let (st, v) = s.post(&format!("/v1/longwrite/{a}/cancel"), &json!({}));
    assert_eq!(st, 404, "{v}");
    // Nor its events or document: 404, as for an id that does not exist,
    // so that ids do not leak.
    for tail in ["events", "document"] {
        let (st, v) = s.get(&format!("/v1/longwrite/{a}/{tail}"));
        assert_eq!(st, 404, "{tail}: {v}");
        let (st_none, _) = s.get(&format!("/v1/longwrite/lw-none/{tail}"));
        assert_eq!(st_none, 404, "{tail} of no job");
    }
    s.key = "one".into();
    let (st, v) = s.post(&format!("/v1/longwrite/{a}/cancel"), &json!({}));
    assert_eq!((st, v["cancelling"].as_bool()), (200, Some(true)), "{v}");
    let got = s.wait_for(
        &format!("/v1/longwrite/{a}"),
        Duration::from_secs(30),
        finished,
    );
    assert_eq!(got["status"], "cancelled");
    let (st, v) = s.post("/v1/longwrite", &job_body(2, 1));
    assert_eq!(st, 201, "the slot is free again: {v}");
}

/// Reads how many times each section of `job` was written, from the store.
fn section_writes(dir: &std::path::Path, job: &str) -> Vec<(i64, i64)> {
    let db = rusqlite::Connection::open(dir.join("jobs.sqlite")).unwrap();
    let mut st = db
        .prepare("SELECT idx, writes FROM sections WHERE job = ?1 ORDER BY idx")
        .unwrap();
    let rows = st
        .query_map([job], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    rows
}

#[test]
fn a_server_killed_mid_job_resumes_it_on_restart_and_keeps_finished_sections() {
    const SECTIONS: usize = 6;
    // The reference: the same job, never interrupted.
    let s = start("rk", &tiny_model(), &scratch("jobs-ref"), &[]);
    let (_, job) = s.post("/v1/longwrite", &job_body(21, SECTIONS));
    let id = job["id"].as_str().unwrap().to_string();
    s.wait_for(
        &format!("/v1/longwrite/{id}"),
        Duration::from_secs(120),
        finished,
    );
    let reference = s.get_text(&format!("/v1/longwrite/{id}/document"));
    drop(s);

    let dir = scratch("jobs-kill");
    let mut s = start("rk", &tiny_model(), &dir, &[]);
    let (_, job) = s.post("/v1/longwrite", &job_body(21, SECTIONS));
    let id = job["id"].as_str().unwrap().to_string();
    let before = s.wait_for(
        &format!("/v1/longwrite/{id}"),
        Duration::from_secs(120),
        |v| v["sections"].as_array().is_some_and(|a| a.len() >= 2),
    );
    s.child.kill().unwrap(); // SIGKILL
    s.child.wait().unwrap();
    let kept: Vec<Value> = before["sections"].as_array().unwrap().clone();
    assert!(kept.len() < SECTIONS, "killed too late to prove anything");

    let s = start("rk", &tiny_model(), &dir, &[]);
    let got = s.wait_for(
        &format!("/v1/longwrite/{id}"),
        Duration::from_secs(120),
        finished,
    );
    assert_eq!(got["status"], "finished", "{got}");
    let sections = got["sections"].as_array().unwrap();
    assert_eq!(sections.len(), SECTIONS);
    for k in &kept {
        let i = k["index"].as_u64().unwrap() as usize;
        assert_eq!(
            sections[i]["text"], k["text"],
            "section {i} survived the kill unchanged"
        );
    }
    let writes = section_writes(&dir, &id);
    assert_eq!(writes.len(), SECTIONS);
    assert!(
        writes.iter().all(|&(_, w)| w == 1),
        "no section written twice: {writes:?}"
    );
    assert_eq!(
        s.get_text(&format!("/v1/longwrite/{id}/document")),
        reference
    );
}
