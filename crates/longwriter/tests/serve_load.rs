//! Load: concurrent streaming clients against one server, each getting
//! exactly what it gets alone.

mod common;

use std::time::{Duration, Instant};

use common::{scratch, start, tiny_model};
use serde_json::{json, Value};

fn body(i: usize) -> Value {
    json!({
        "messages": [{"role": "user", "content": format!("Tell story number {i} about the sea.")}],
        "max_tokens": 40 + 10 * (i % 5),
        "temperature": if i.is_multiple_of(3) { 0.0 } else { 0.9 },
        "top_p": 0.95,
        "seed": 100 + i,
        "stream": true,
    })
}

/// The streamed text and finish reason of one response.
fn collect(parts: &[String]) -> (String, String) {
    assert_eq!(
        parts.last().map(String::as_str),
        Some("[DONE]"),
        "incomplete stream"
    );
    let mut text = String::new();
    let mut finish = String::new();
    for p in &parts[..parts.len() - 1] {
        let v: Value = serde_json::from_str(p).unwrap();
        assert!(v["error"].is_null(), "error in stream: {v}");
        if let Some(d) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(d);
        }
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (text, finish)
}

#[test]
fn sixteen_concurrent_streams_match_the_same_requests_one_by_one() {
    const CLIENTS: usize = 16;
    let s = start(
        "lk",
        &tiny_model(),
        &scratch("load"),
        &["--max-batch", "16"],
    );
    let started = Instant::now();
    let solo: Vec<(String, String)> = (0..CLIENTS)
        .map(|i| collect(&s.stream("/v1/chat/completions", &body(i))))
        .collect();
    let solo_time = started.elapsed();
    // Every client sends request after request for a bounded time, each
    // one a different body from the solo set, so batches keep changing.
    let window = Duration::from_secs(4);
    let started = Instant::now();
    let counts: Vec<usize> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (s, solo) = (&s, &solo);
                scope.spawn(move || {
                    let mut round = 0;
                    while round == 0 || started.elapsed() < window {
                        let i = (c + round * 5) % CLIENTS;
                        let got = collect(&s.stream("/v1/chat/completions", &body(i)));
                        assert_eq!(
                            got, solo[i],
                            "client {c}, round {round}: request {i} differs from its solo run"
                        );
                        round += 1;
                    }
                    round
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let together_time = started.elapsed();
    let total: usize = counts.iter().sum();
    assert!(counts.iter().all(|&n| n >= 1));
    let (_, health) = s.get("/health");
    assert_eq!(health["running"], 0, "{health}");
    assert_eq!(health["waiting"], 0, "{health}");
    eprintln!(
        "{CLIENTS} requests one by one: {:.2}s; {CLIENTS} concurrent clients: {total} requests in {:.2}s, all identical to their solo runs",
        solo_time.as_secs_f64(),
        together_time.as_secs_f64()
    );
}
