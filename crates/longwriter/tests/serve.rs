//! `longwriter serve` as a client sees it: a real server process on
//! loopback, real HTTP, streaming and not.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn start(key: &str) -> Server {
    start_with(key, &root().join("tests/fixtures/models/qwen2"), 64)
}

fn start_with(key: &str, model: &std::path::Path, max_new: usize) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .args([
            "serve",
            "--port",
            "0",
            "--threads",
            "1",
            "--api-key",
            key,
            "--max-new-tokens",
        ])
        .arg(max_new.to_string())
        .arg("--data-dir")
        .arg(std::env::temp_dir().join(format!("lw-serve-data-{}-{key}", std::process::id())))
        .arg("--model")
        .arg(model)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let base = loop {
        let line = lines
            .next()
            .expect("the server printed its address")
            .unwrap();
        if let Some(rest) = line.strip_prefix("listening on ") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Keep draining stderr so the server never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    Server { child, base }
}

#[allow(clippy::result_large_err)] // ureq's error type, in a test helper
fn post(s: &Server, path: &str, key: &str, body: &Value) -> Result<ureq::Response, ureq::Error> {
    ureq::post(&format!("{}{path}", s.base))
        .set("Authorization", &format!("Bearer {key}"))
        .send_string(&body.to_string())
}

#[test]
fn health_models_auth_and_errors() {
    let s = start("k1");
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
    let s = start("k2");
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
    };
    let got = lw_write::LanguageModel::complete(&mut client, &req, &mut |_| true).unwrap();
    assert_eq!(got.text, content);
}

#[test]
fn longwriter_write_runs_against_longwriter_serve_and_reuses_the_prefix() {
    let s = start_with("k3", &root().join("models/tiny-random-qwen2"), 4096);
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
