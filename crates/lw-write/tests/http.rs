//! The whole pipeline over real HTTP: a loopback server speaking the OpenAI
//! chat-completions protocol (SSE) with a deterministic writer behind it,
//! and scripted failures in front of it.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lw_core::SamplingParams;
use lw_write::{
    HttpModel, HttpOptions, Language, Mode, ModelCallError, Request, RunDir, RunStore, WriteError,
    WriteOptions,
};
use serde_json::{json, Value};

/// What the server does with the next request.
#[derive(Clone, Debug)]
enum Behaviour {
    Answer,
    Status(u16),
    RateLimited,
    ContentFilter,
    ContextLength,
    /// A degenerate answer: one phrase over and over.
    Loop,
}

struct Server {
    base: String,
    /// Bodies of every request received.
    requests: Arc<Mutex<Vec<Value>>>,
}

fn serve(script: Vec<Behaviour>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let script = Arc::new(Mutex::new(VecDeque::from(script)));
    let seen = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            handle(stream, &script, &seen);
        }
    });
    Server { base, requests }
}

/// Answers one request: `/tokenize` with 404, as OpenAI-style servers
/// without that route do (the client then measures no tokenizer), and
/// chat completions with the script's next behaviour.
fn handle(mut stream: TcpStream, script: &Mutex<VecDeque<Behaviour>>, seen: &Mutex<Vec<Value>>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut length = 0;
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return;
    }
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).unwrap();
    let plain = |code: u16, reason: &str, extra: &str, body: &str| {
        format!("HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}", body.len())
    };
    if !request_line.contains("/chat/completions") {
        let reply = plain(
            404,
            "Not Found",
            "",
            r#"{"error":{"message":"no such route"}}"#,
        );
        let _ = stream.write_all(reply.as_bytes());
        return;
    }
    let request: Value = serde_json::from_slice(&body).unwrap();
    seen.lock().unwrap().push(request.clone());
    let behaviour = script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Behaviour::Answer);
    let reply = match behaviour {
        Behaviour::Status(code) => plain(
            code,
            "Error",
            "",
            r#"{"error":{"message":"upstream exploded","type":"server_error"}}"#,
        ),
        Behaviour::RateLimited => plain(
            429,
            "Too Many Requests",
            "Retry-After: 0\r\n",
            r#"{"error":{"message":"slow down","type":"rate_limit"}}"#,
        ),
        Behaviour::ContextLength => plain(
            400,
            "Bad Request",
            "",
            r#"{"error":{"message":"This model's maximum context length is 4096 tokens. However, you requested 9000 tokens.","code":"context_length_exceeded","type":"invalid_request_error"}}"#,
        ),
        Behaviour::ContentFilter => sse(&["I can't write", " that."], "content_filter"),
        Behaviour::Loop => {
            let deltas: Vec<&str> = std::iter::repeat_n("and the river rose again ", 40).collect();
            sse(&deltas, "stop")
        }
        Behaviour::Answer => {
            let prompt = request["messages"][0]["content"].as_str().unwrap();
            let text = answer(prompt);
            let words: Vec<String> = text.split_inclusive(' ').map(str::to_string).collect();
            let refs: Vec<&str> = words.iter().map(String::as_str).collect();
            sse(&refs, "stop")
        }
    };
    let _ = stream.write_all(reply.as_bytes());
}

/// A deterministic writer: a plan for plan prompts, a numbered paragraph for
/// write prompts.
fn answer(prompt: &str) -> String {
    if prompt.starts_with("You are planning") {
        return (1..=3)
            .map(|i| {
                format!(
                    "Paragraph {i} - Main Point: part {i} of the story - Word Count: 300 words\n"
                )
            })
            .collect();
    }
    let step = prompt
        .split("Now write paragraph ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .unwrap_or("?");
    let body: Vec<String> = (0..40).map(|i| format!("w{step}x{i}")).collect();
    format!("Section {step}. {}", body.join(" "))
}

fn sse(deltas: &[&str], finish: &str) -> String {
    let mut out = String::from(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n",
    );
    for d in deltas {
        let chunk =
            json!({"choices": [{"index": 0, "delta": {"content": d}, "finish_reason": null}]});
        out.push_str(&format!("data: {chunk}\n\n"));
    }
    let last = json!({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]});
    out.push_str(&format!("data: {last}\n\n"));
    let usage = json!({"choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": deltas.len(), "prompt_tokens_details": {"cached_tokens": 60}}});
    out.push_str(&format!("data: {usage}\n\ndata: [DONE]\n\n"));
    out
}

fn model(server: &Server) -> HttpModel {
    let mut opts = HttpOptions::new(&server.base, "test-writer");
    opts.backoff = Duration::from_millis(10);
    opts.retries = 3;
    opts.api_key = Some("sk-test".into());
    HttpModel::new(opts)
}

fn run_dir(tag: &str) -> RunDir {
    let dir: PathBuf = std::env::temp_dir().join(format!("lw-http-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    RunDir::create(
        &dir,
        &Request {
            instruction: "Write a 900-word story about a river.".into(),
            asked_words: Some(900),
            language: Language::English,
            mode: Mode::AgentWrite,
            sampling: SamplingParams::default(),
            model: "test-writer".into(),
        },
    )
    .unwrap()
}

fn run(server: &Server, dir: &RunDir) -> Result<lw_write::Summary, WriteError> {
    let mut m = model(server);
    lw_write::write(
        &mut m,
        dir,
        &WriteOptions::default(),
        &AtomicBool::new(false),
        &mut |_| {},
    )
}

#[test]
fn plan_and_sections_over_http_with_the_text_so_far_in_each_prompt() {
    let server = serve(vec![]);
    let dir = run_dir("ok");
    let summary = run(&server, &dir).unwrap();
    let doc = std::fs::read_to_string(dir.document_path()).unwrap();
    assert_eq!(doc, summary.document);
    for i in 1..=3 {
        assert!(doc.contains(&format!("Section {i}. w{i}x0")), "{doc}");
    }
    let reqs = server.requests.lock().unwrap();
    assert_eq!(reqs.len(), 4, "one plan and three sections");
    assert_eq!(reqs[0]["stream"], true);
    assert_eq!(reqs[0]["model"], "test-writer");
    // Each write prompt carries every earlier section, before its own step.
    let third = reqs[3]["messages"][0]["content"].as_str().unwrap();
    let step_at = third.find("Now write paragraph 3").unwrap();
    assert!(third[..step_at].contains("Section 1.") && third[..step_at].contains("Section 2."));
    // The prefix is stable: the second write prompt starts with the first one's text-so-far header.
    let second = reqs[2]["messages"][0]["content"].as_str().unwrap();
    let first = reqs[1]["messages"][0]["content"].as_str().unwrap();
    let shared = first.find("<<<").unwrap();
    assert_eq!(first[..shared], second[..shared]);
    assert_eq!(summary.usage.prompt_tokens, 400);
    assert_eq!(summary.usage.cached_prompt_tokens, 240);
}

#[test]
fn server_errors_and_rate_limits_are_retried_and_leave_no_trace() {
    let server = serve(vec![
        Behaviour::Status(500),
        Behaviour::RateLimited,
        Behaviour::Answer,
        Behaviour::Status(503),
    ]);
    let dir = run_dir("retry");
    let summary = run(&server, &dir).unwrap();
    assert!(!summary.document.contains("exploded") && !summary.document.contains("slow down"));
    assert!(!summary.document.contains("HTTP"));
    assert_eq!(server.requests.lock().unwrap().len(), 4 + 3);
}

#[test]
fn a_content_filter_refusal_is_a_typed_error_and_nothing_is_written() {
    let server = serve(vec![
        Behaviour::Answer,
        Behaviour::Answer,
        Behaviour::ContentFilter,
    ]);
    let dir = run_dir("filter");
    let err = run(&server, &dir).unwrap_err();
    assert!(
        matches!(&err, WriteError::Model { source: ModelCallError::ContentFilter(_), step } if step == "paragraph 2 of 3"),
        "{err:?}"
    );
    assert!(dir.section(0).unwrap().is_some());
    assert!(
        dir.section(1).unwrap().is_none(),
        "the refused section must not be saved"
    );
    assert!(!dir.document_path().exists());
    // Resuming once the server behaves finishes the run.
    let summary = run(&server, &dir).unwrap();
    assert!(!summary.document.contains("can't write"));
}

#[test]
fn a_context_overflow_names_the_step() {
    let server = serve(vec![Behaviour::Answer, Behaviour::ContextLength]);
    let dir = run_dir("context");
    let err = run(&server, &dir).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("paragraph 1 of 3") && msg.contains("4096"),
        "{msg}"
    );
    assert_eq!(server.requests.lock().unwrap().len(), 2, "not retried");
}

#[test]
fn an_unreachable_server_fails_after_the_retries() {
    // Bind then drop: the port refuses connections.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut opts = HttpOptions::new(format!("http://127.0.0.1:{port}/v1"), "m");
    opts.backoff = Duration::from_millis(1);
    opts.retries = 2;
    let mut m = HttpModel::new(opts);
    let req = lw_write::ChatRequest {
        messages: vec![lw_core::Message::user("hi")],
        max_tokens: 5,
        sampling: SamplingParams::default(),
        stop: vec![],
        ..Default::default()
    };
    let err = lw_write::LanguageModel::complete(&mut m, &req, &mut |_| true).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("gave up after 3 attempts") && msg.contains("cannot reach"),
        "{msg}"
    );
}

#[test]
fn a_section_that_loops_is_stopped_and_written_again() {
    let server = serve(vec![Behaviour::Answer, Behaviour::Loop, Behaviour::Answer]);
    let dir = run_dir("loop");
    let mut events = Vec::new();
    let mut m = model(&server);
    let summary = lw_write::write(
        &mut m,
        &dir,
        &WriteOptions::default(),
        &AtomicBool::new(false),
        &mut |e| {
            if let lw_write::Event::SectionRetry { index, reason, .. } = e {
                events.push((index, reason.to_string()));
            }
        },
    )
    .unwrap();
    assert_eq!(events, vec![(0, "repeating loop".to_string())]);
    assert!(!summary.document.contains("river rose again"));
    let st = dir.state().unwrap();
    assert_eq!(st.sections[0].attempts, 2);
}
