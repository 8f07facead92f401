//! `serve` at its edges, over real HTTP on loopback: hostile bodies, a full
//! queue, a client that trickles its headers, more connections than the
//! limit. Each gets a clear answer (or a closed connection), and the server
//! goes on serving.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{root, scratch, start, Server};
use serde_json::{json, Value};

fn fixture_server(tag: &str, extra: &[&str]) -> Server {
    start(
        "",
        &root().join("tests/fixtures/models/qwen2"),
        &scratch(tag),
        extra,
    )
}

fn addr(s: &Server) -> String {
    s.base.trim_start_matches("http://").to_string()
}

/// One raw HTTP/1.1 request; the status line's code and the whole answer.
/// The body is written from another thread while the answer is read, so a
/// server that answers before reading all of it (413) is seen answering.
fn raw(s: &Server, head: &str, body: Vec<u8>) -> (u16, String) {
    let mut conn = TcpStream::connect(addr(s)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let request = format!(
        "{head}\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(request.as_bytes()).unwrap();
    let mut writer = conn.try_clone().unwrap();
    let sending = std::thread::spawn(move || {
        for chunk in body.chunks(1 << 16) {
            if writer.write_all(chunk).is_err() {
                break;
            }
        }
    });
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    drop(conn);
    let _ = sending.join();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let code = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, answer)
}

fn error_of(answer: &str) -> Value {
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or(Value::Null)
}

fn healthy(s: &Server) {
    let (st, v) = s.get("/health");
    assert_eq!((st, v["status"].as_str()), (200, Some("ok")), "{v}");
}

#[test]
fn hostile_bodies_get_clear_errors_and_the_server_lives_on() {
    let s = fixture_server("edges-bodies", &[]);
    let chat = "POST /v1/chat/completions HTTP/1.1";
    // Bytes that are not UTF-8 where JSON text must be.
    let mut bad = br#"{"messages": [{"role": "user", "content": ""#.to_vec();
    bad.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    bad.extend_from_slice(br#""}]}"#);
    let (st, answer) = raw(&s, chat, bad);
    assert_eq!(st, 400, "{answer}");
    assert!(
        error_of(&answer)["error"]["message"].is_string(),
        "{answer}"
    );
    // No messages at all.
    let (st, answer) = raw(&s, chat, br#"{"messages": []}"#.to_vec());
    assert_eq!(st, 400, "{answer}");
    let msg = error_of(&answer)["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(msg.contains("messages"), "{msg}");
    // JSON nested 10,000 deep: refused, not a stack overflow.
    let deep = format!(
        r#"{{"messages": [{{"role": "user", "content": "x"}}], "stop": {}1{}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let (st, answer) = raw(&s, chat, deep.into_bytes());
    assert_eq!(st, 400, "{answer}");
    // 20 MB, over the default limit of 4 MiB: 413, answered without
    // reading it all.
    let big = format!(
        r#"{{"messages": [{{"role": "user", "content": "{}"}}]}}"#,
        "a".repeat(20 << 20)
    );
    let (st, answer) = raw(&s, chat, big.into_bytes());
    assert_eq!(st, 413, "{}", &answer[..answer.len().min(400)]);
    assert!(
        error_of(&answer)["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("larger than"),
        "{answer}"
    );
    healthy(&s);
    let (st, v) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
    );
    assert_eq!(st, 200, "{v}");
}

/// With one sequence decoding and one waiting (the queue's limit), a third
/// request is answered 503 with `Retry-After`, in the API's error shape,
/// over HTTP.
#[test]
fn a_full_queue_is_answered_503_with_retry_after() {
    // The running request holds its slot with min_tokens (the chat API has
    // no ignore_eos); should it still finish between the moment the queue
    // is seen full and the third request (a fast machine, a slow one that
    // took long to queue the second), the whole exchange runs again on a
    // fresh server, and the third must be refused in one of five.
    let mut answers = Vec::new();
    for attempt in 0..5 {
        match full_queue_answer(attempt) {
            Ok(resp) => {
                assert_eq!(resp.header("retry-after"), Some("1"));
                let v: Value = serde_json::from_str(&resp.into_string().unwrap()).unwrap();
                assert_eq!(v["error"]["code"], "server_busy", "{v}");
                return;
            }
            Err(other) => answers.push(other),
        }
    }
    panic!("expected 503 in one of five tries, got {answers:?}");
}

/// One try: the third request's 503 response, or what came instead (with
/// the server's count of finished requests when it came).
fn full_queue_answer(attempt: usize) -> Result<ureq::Response, String> {
    let s = start(
        "",
        &common::tiny_model(),
        &scratch(&format!("edges-queue-{attempt}")),
        &["--max-batch", "1", "--max-queue", "1"],
    );
    let long = json!({
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": 20000, "min_tokens": 20000, "stream": true
    });
    let first = ureq::post(&s.url("/v1/chat/completions"))
        .send_string(&long.to_string())
        .unwrap();
    // The first request is decoding once its first delta arrives.
    let mut reader = std::io::BufReader::new(first.into_reader());
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    }
    let url = s.url("/v1/chat/completions");
    let waiting = long.to_string();
    std::thread::spawn(move || {
        let _ = ureq::post(&url).send_string(&waiting);
    });
    s.wait_for("/health", Duration::from_secs(30), |v| v["waiting"] == 1);
    let third = ureq::post(&s.url("/v1/chat/completions")).send_string(
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).to_string(),
    );
    let result = match third {
        Err(ureq::Error::Status(503, resp)) => Ok(resp),
        other => {
            let (_, health) = s.get("/health");
            Err(format!("{other:?} with /health {health}"))
        }
    };
    drop(reader);
    result
}

/// A client that sends its headers a byte at a time is closed at the
/// header deadline; the server answers others meanwhile and after.
#[test]
fn a_client_that_trickles_its_headers_is_closed_at_the_deadline() {
    let s = fixture_server("edges-slow", &["--header-timeout", "1"]);
    let mut conn = TcpStream::connect(addr(&s)).unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let request =
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let start = Instant::now();
    let mut sent = 0;
    let mut closed = false;
    for &b in request.iter() {
        if conn.write_all(&[b]).is_err() {
            closed = true;
            break;
        }
        sent += 1;
        let mut buf = [0u8; 256];
        match conn.read(&mut buf) {
            // Closed (with or without a 408 first).
            Ok(_) => {
                closed = true;
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
        if sent == 3 {
            // Others are served while it trickles.
            healthy(&s);
        }
    }
    let took = start.elapsed();
    assert!(
        closed && sent < request.len(),
        "the trickling client was never closed ({sent} bytes in {took:?})"
    );
    assert!(
        took < Duration::from_secs(5),
        "closed only after {took:?} (deadline 1 s)"
    );
    healthy(&s);
}

/// Beyond `--max-connections`, a connection is answered 503 with
/// `Retry-After` and closed; once one closes, the next is served.
#[test]
fn connections_over_the_limit_are_refused_until_one_closes() {
    let s = fixture_server(
        "edges-conns",
        &["--max-connections", "2", "--header-timeout", "60"],
    );
    // Two connections that hold their slots (headers never finished).
    let mut held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut c = TcpStream::connect(addr(&s)).unwrap();
            c.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
            c
        })
        .collect();
    // The third: answered at once, in the API's shape.
    let refused = ureq::get(&s.url("/health"))
        .timeout(Duration::from_secs(20))
        .call();
    let Err(ureq::Error::Status(503, resp)) = refused else {
        panic!("expected 503, got {refused:?}");
    };
    assert_eq!(resp.header("retry-after"), Some("1"));
    let v: Value = serde_json::from_str(&resp.into_string().unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "server_busy", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit of 2"),
        "{v}"
    );
    // One finishes its request: its slot is free once it closes.
    let mut c = held.pop().unwrap();
    c.write_all(b"Host: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ureq::get(&s.url("/health")).call() {
            Ok(r) => {
                assert_eq!(r.status(), 200);
                break;
            }
            Err(ureq::Error::Status(503, _)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("the freed slot was never reused: {e}"),
        }
    }
    drop(held);
}
