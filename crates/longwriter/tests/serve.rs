//! `longwriter serve` as a client sees it: a real server process on
//! loopback, real HTTP, streaming and not, faults and bad input.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{root, scratch, start, tiny_model, Server};
use serde_json::{json, Value};

fn start_fixture(key: &str, max_new: usize) -> Server {
    start(
        key,
        &root().join("tests/fixtures/models/qwen2"),
        &scratch(&format!("serve-{key}")),
        &["--max-new-tokens", &max_new.to_string()],
    )
}

#[allow(clippy::result_large_err)] // ureq's error type, in a test helper
fn post(s: &Server, path: &str, key: &str, body: &Value) -> Result<ureq::Response, ureq::Error> {
    ureq::post(&format!("{}{path}", s.base))
        .set("Authorization", &format!("Bearer {key}"))
        .send_string(&body.to_string())
}

#[test]
fn health_models_auth_and_errors() {
    let s = start_fixture("k1", 64);
    assert_eq!(
        ureq::get(&format!("{}/health", s.base))
            .call()
            .unwrap()
            .status(),
        200
    );
    match ureq::get(&format!("{}/v1/models", s.base)).call() {
        Err(ureq::Error::Status(401, r)) => {
            let v: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
            assert_eq!(v["error"]["code"], "invalid_api_key");
        }
        other => panic!("expected 401, got {other:?}"),
    }
    let models: Value = serde_json::from_str(
        &ureq::get(&format!("{}/v1/models", s.base))
            .set("Authorization", "Bearer k1")
            .call()
            .unwrap()
            .into_string()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(models["object"], "list");
    assert!(models["data"][0]["id"].as_str().unwrap().ends_with("qwen2"));
    // A prompt longer than the context: 400 with OpenAI's code.
    let long =
        json!({"messages": [{"role": "user", "content": "word ".repeat(400)}], "max_tokens": 4});
    match post(&s, "/v1/chat/completions", "k1", &long) {
        Err(ureq::Error::Status(400, r)) => {
            let v: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
            assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
        }
        other => panic!("expected 400, got {other:?}"),
    }
    // Malformed bodies and unsupported n get 400 in the same shape.
    for bad in [
        json!({"messages": "nope"}),
        json!({"messages": [{"role": "user", "content": "x"}], "n": 2}),
    ] {
        match post(&s, "/v1/chat/completions", "k1", &bad) {
            Err(ureq::Error::Status(400, r)) => {
                let v: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
                assert!(v["error"]["message"].is_string(), "{v}");
            }
            other => panic!("expected 400 for {bad}, got {other:?}"),
        }
    }
}

#[test]
fn streamed_deltas_concatenate_to_the_plain_answer_with_the_same_seed() {
    let s = start_fixture("k2", 64);
    let body = |stream: bool| {
        json!({"model": "qwen2", "messages": [{"role": "user", "content": "Write about rivers."}],
               "max_tokens": 20, "temperature": 1.0, "seed": 5, "stream": stream,
               "stream_options": {"include_usage": true}})
    };
    let plain: Value = serde_json::from_str(
        &post(&s, "/v1/chat/completions", "k2", &body(false))
            .unwrap()
            .into_string()
            .unwrap(),
    )
    .unwrap();
    let content = plain["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(plain["object"], "chat.completion");
    assert!(plain["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    let stream = post(&s, "/v1/chat/completions", "k2", &body(true)).unwrap();
    assert!(stream.content_type().starts_with("text/event-stream"));
    let mut deltas = String::new();
    let mut done = false;
    let mut usage = None;
    for line in BufReader::new(stream.into_reader()).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if let Some(d) = v["choices"][0]["delta"]["content"].as_str() {
            deltas.push_str(d);
        }
        if !v["usage"].is_null() {
            usage = Some(v["usage"].clone());
        }
    }
    assert!(done, "the stream ends with [DONE]");
    assert_eq!(deltas, content);
    assert_eq!(
        usage.unwrap()["completion_tokens"],
        plain["usage"]["completion_tokens"]
    );

    // The writing pipeline's own HTTP client reads the same stream.
    let mut opts = lw_write::HttpOptions::new(format!("{}/v1", s.base), "qwen2");
    opts.api_key = Some("k2".into());
    let mut client = lw_write::HttpModel::new(opts);
    let req = lw_write::ChatRequest {
        messages: vec![lw_core::Message::user("Write about rivers.")],
        max_tokens: 20,
        sampling: lw_core::SamplingParams {
            temperature: 1.0,
            seed: 5,
            ..Default::default()
        },
        stop: vec![],
        ..Default::default()
    };
    let got = lw_write::LanguageModel::complete(&mut client, &req, &mut |_| true).unwrap();
    assert_eq!(got.text, content);
}

#[test]
fn longwriter_write_runs_against_longwriter_serve_and_reuses_the_prefix() {
    let s = start(
        "k3",
        &tiny_model(),
        &scratch("serve-k3"),
        &["--max-new-tokens", "4096"],
    );
    let run = std::env::temp_dir().join(format!("lw-serve-write-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run);
    let out = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .current_dir(root())
        .args([
            "write",
            "--quiet",
            "--api-key",
            "k3",
            "--plan",
            "examples/river-plan.txt",
            "--api-base",
        ])
        .arg(format!("{}/v1", s.base))
        .arg("--out")
        .arg(&run)
        .arg("Write a 2000-word story about a river.")
        .env_remove("LONGWRITER_MODEL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["sections"].as_array().unwrap().len(), 4);
    assert!(
        state["usage"]["cached_prompt_tokens"].as_u64().unwrap() > 0,
        "{state}"
    );
    assert!(run.join("document.md").exists());
}

/// Every kind of bad request gets OpenAI's error shape and the right status.
#[test]
fn faults_and_bad_input_get_the_right_status_and_shape() {
    let dir = scratch("faults");
    let keys = dir.join("keys.txt");
    std::fs::write(&keys, "# team keys\nalpha\n\nbeta  # second\n").unwrap();
    let mut s = start(
        "",
        &root().join("tests/fixtures/models/qwen2"),
        &dir,
        &[
            "--keys-file",
            keys.to_str().unwrap(),
            "--max-body-bytes",
            "4000",
            "--max-prompt-tokens",
            "100",
            "--max-new-tokens",
            "64",
        ],
    );
    let send = |key: Option<&str>, path: &str, body: &str| -> (u16, Value) {
        let mut r = ureq::post(&format!("{}{path}", s.base));
        if let Some(k) = key {
            r = r.set("Authorization", &format!("Bearer {k}"));
        }
        let resp = match r.send_string(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{e}"),
        };
        let status = resp.status();
        (
            status,
            serde_json::from_str(&resp.into_string().unwrap()).unwrap(),
        )
    };
    s.key = "alpha".into();
    let chat = "/v1/chat/completions";
    let ok = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).to_string();
    // Both keys of the file work; others and none get 401.
    assert_eq!(send(Some("alpha"), chat, &ok).0, 200);
    assert_eq!(send(Some("beta"), chat, &ok).0, 200);
    for key in [None, Some("gamma")] {
        let (st, v) = send(key, chat, &ok);
        assert_eq!(st, 401, "{v}");
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "malformed JSON",
            "{\"messages\": [".into(),
            400,
            "invalid request body",
        ),
        (
            "wrong type",
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"})
                .to_string(),
            400,
            "invalid request body",
        ),
        (
            "negative max_tokens",
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}).to_string(),
            400,
            "invalid request body",
        ),
        (
            "zero max_tokens",
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).to_string(),
            400,
            "at least 1",
        ),
        (
            "max_tokens over the limit",
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 65}).to_string(),
            400,
            "limit of 64",
        ),
        (
            "unknown model",
            json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).to_string(),
            404,
            "gpt-9",
        ),
        (
            "unknown role",
            json!({"messages": [{"role": "wizard", "content": "x"}]}).to_string(),
            400,
            "wizard",
        ),
        (
            "temperature out of range",
            json!({"messages": [{"role": "user", "content": "x"}], "temperature": 7}).to_string(),
            400,
            "temperature",
        ),
        (
            "prompt over --max-prompt-tokens",
            json!({"messages": [{"role": "user", "content": "word ".repeat(150)}]}).to_string(),
            400,
            "at most 100",
        ),
        (
            "oversized body",
            json!({"messages": [{"role": "user", "content": "x".repeat(5000)}]}).to_string(),
            413,
            "larger than",
        ),
    ];
    for (what, body, status, needle) in cases {
        let (st, v) = send(Some("alpha"), chat, &body);
        assert_eq!(st, status, "{what}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{what}: {msg}");
        assert!(v["error"]["type"].is_string(), "{what}: {v}");
    }
    let (st, v) = send(
        Some("alpha"),
        chat,
        &json!({"messages": [{"role": "user", "content": "word ".repeat(150)}]}).to_string(),
    );
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("context_length_exceeded"))
    );
    // The text completions endpoint, plain and streamed.
    let (st, v) = send(
        Some("alpha"),
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "max_tokens": 5, "seed": 3, "temperature": 0})
            .to_string(),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let parts = s.stream("/v1/completions", &json!({"prompt": "Once upon a time", "max_tokens": 5, "seed": 3, "temperature": 0, "stream": true}));
    assert_eq!(parts.last().map(String::as_str), Some("[DONE]"));
    let streamed: String = parts[..parts.len() - 1]
        .iter()
        .map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(streamed, text);
    let (st, _) = send(
        Some("alpha"),
        "/v1/completions",
        &json!({"prompt": ["a", "b"]}).to_string(),
    );
    assert_eq!(st, 400);
    // Unknown routes answer 404 in the same shape.
    let (st, v) = send(Some("alpha"), "/v1/nothing", "{}");
    assert_eq!((st, v["error"]["code"].as_str()), (404, Some("not_found")));
}

/// A client that leaves mid-stream frees its sequence: the server's batch
/// empties while the request was far from its token limit.
#[test]
fn a_client_that_disconnects_mid_stream_frees_its_slot() {
    let s = start("k5", &tiny_model(), &scratch("disconnect"), &[]);
    let body = json!({"messages": [{"role": "user", "content": "Go on forever."}],
                      "max_tokens": 30000, "stream": true, "temperature": 1.0, "seed": 1});
    let resp = post(&s, "/v1/chat/completions", "k5", &body).unwrap();
    let mut reader = BufReader::new(resp.into_reader());
    let mut chunks = 0;
    let mut line = String::new();
    while chunks < 20 {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.starts_with("data: ") {
            chunks += 1;
        }
    }
    let (_, health) = s.get("/health");
    assert_eq!(health["running"], 1, "{health}");
    drop(reader);
    let start = Instant::now();
    loop {
        let (_, health) = s.get("/health");
        if health["running"] == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the sequence was not freed: {health}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The server still answers.
    let (st, _) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    );
    assert_eq!(st, 200);
}

/// `serve` with a draft model or prompt lookup answers concurrent greedy
/// requests with exactly the text of a server that does not speculate,
/// reports the guesses in `usage`, and a request may opt out.
#[test]
fn a_speculating_server_answers_greedy_requests_with_the_plain_text() {
    let models = root().join("tests/fixtures/models");
    let target = models.join("llama3-untied");
    let draft = models.join("llama3-untied-bf16");
    let draft = draft.to_str().unwrap();
    let servers = [
        ("plain", vec![]),
        ("draft", vec!["--draft-model", draft, "--draft-max", "4"]),
        ("lookup", vec!["--prompt-lookup"]),
    ]
    .map(|(name, extra)| {
        let mut args = vec!["--max-new-tokens", "64", "--max-batch", "4"];
        args.extend(extra);
        let s = start(
            "ks",
            &target,
            &scratch(&format!("serve-spec-{name}")),
            &args,
        );
        (name, s)
    });
    let prompts = [
        "The river runs to the sea. The river runs to the sea. The river",
        "Once upon a time",
        "A river, a river, a river, and",
        "The sea",
    ];
    let body = |prompt: &str, speculate: Option<bool>| {
        let mut b = json!({"prompt": prompt, "max_tokens": 32, "temperature": 0.0});
        if let Some(s) = speculate {
            b["speculate"] = json!(s);
        }
        b
    };
    // All of one server's requests at once, so they share batches.
    let answers = |s: &Server, speculate: Option<bool>| -> Vec<Value> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = prompts
                .iter()
                .map(|p| scope.spawn(move || s.post("/v1/completions", &body(p, speculate))))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    let (status, v) = h.join().unwrap();
                    assert_eq!(status, 200, "{v}");
                    v
                })
                .collect()
        })
    };
    let text = |v: &Value| v["choices"][0]["text"].as_str().unwrap().to_string();
    let guesses = |v: &Value| {
        let d = &v["usage"]["completion_tokens_details"];
        d["accepted_prediction_tokens"].as_u64().unwrap()
            + d["rejected_prediction_tokens"].as_u64().unwrap()
    };
    let want: Vec<String> = answers(&servers[0].1, None).iter().map(text).collect();
    assert!(want.iter().all(|t| !t.is_empty()), "{want:?}");
    for (name, s) in &servers[1..] {
        let got = answers(s, None);
        let texts: Vec<String> = got.iter().map(text).collect();
        assert_eq!(texts, want, "{name}");
        let drafted: u64 = got.iter().map(guesses).sum();
        assert!(drafted > 0, "{name}: no guesses reported: {got:?}");
        let accepted: u64 = got
            .iter()
            .map(|v| {
                v["usage"]["completion_tokens_details"]["accepted_prediction_tokens"]
                    .as_u64()
                    .unwrap()
            })
            .sum();
        assert!(accepted > 0, "{name}: nothing accepted");
        // Opting out: the same text, nothing drafted.
        let off = answers(s, Some(false));
        assert_eq!(
            off.iter().map(text).collect::<Vec<_>>(),
            want,
            "{name}, opted out"
        );
        assert_eq!(off.iter().map(guesses).sum::<u64>(), 0, "{name}, opted out");
    }
}

#[test]
fn a_second_server_on_the_same_data_directory_refuses_to_start() {
    let dir = scratch("serve-lock");
    let first = start("", &tiny_model(), &dir, &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .args(["serve", "--port", "0", "--threads", "1", "--model"])
        .arg(tiny_model())
        .arg("--data-dir")
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second server started: {stderr}");
    assert!(
        stderr.contains("another `serve` is using this data directory")
            && stderr.contains(&*dir.to_string_lossy())
            && !stderr.contains("panicked"),
        "{stderr}"
    );
    // The first one still answers; once it is gone, the directory is free.
    let (code, _) = first.get("/health");
    assert_eq!(code, 200);
    drop(first);
    let again = start("", &tiny_model(), &dir, &[]);
    assert_eq!(again.get("/health").0, 200);
}
