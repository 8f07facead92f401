//! A real `longwriter serve` process on loopback, and small HTTP helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Server {
    pub child: Child,
    pub base: String,
    pub key: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary (without a model from the environment) to completion.
pub fn longwriter(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .args(args)
        .env_remove("LONGWRITER_MODEL")
        .output()
        .unwrap()
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh scratch directory for `tag`.
pub fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lw-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A private copy of the qwen2 fixture (its tokenizer trained on English
/// and Chinese) with a context of `context` positions.
pub fn qwen2_with_context(tag: &str, context: usize) -> PathBuf {
    let dst = scratch(&format!("model-{tag}"));
    let src = root().join("tests/fixtures/models/qwen2");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let cfg = dst.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["max_position_embeddings"] = context.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    dst
}

/// The bundled 32k-context random model (deterministic, fast, noisy text).
pub fn tiny_model() -> PathBuf {
    root().join("models/tiny-random-qwen2")
}

/// Starts `longwriter serve --port 0 --threads 1 --api-key KEY --model M
/// --data-dir D EXTRA…` and waits for its address.
pub fn start(key: &str, model: &Path, data_dir: &Path, extra: &[&str]) -> Server {
    start_on(0, key, model, data_dir, extra)
}

/// As [`start`], on a given port (0: any free one).
pub fn start_on(port: u16, key: &str, model: &Path, data_dir: &Path, extra: &[&str]) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_longwriter"));
    cmd.args(["serve", "--port", &port.to_string(), "--threads", "1"]);
    if !key.is_empty() {
        cmd.args(["--api-key", key]);
    }
    let mut child = cmd
        .arg("--model")
        .arg(model)
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .env_remove("LONGWRITER_API_KEY")
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
    Server {
        child,
        base,
        key: key.to_string(),
    }
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn auth(&self, r: ureq::Request) -> ureq::Request {
        if self.key.is_empty() {
            r
        } else {
            r.set("Authorization", &format!("Bearer {}", self.key))
        }
    }

    /// POST a JSON body; any status comes back as (status, JSON).
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .auth(ureq::post(&self.url(path)))
            .send_string(&body.to_string());
        status_json(r)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        status_json(self.auth(ureq::get(&self.url(path))).call())
    }

    pub fn get_text(&self, path: &str) -> String {
        self.auth(ureq::get(&self.url(path)))
            .call()
            .unwrap()
            .into_string()
            .unwrap()
    }

    /// POST, then read the SSE stream: every `data:` payload until `[DONE]`
    /// or the end (`[DONE]` itself is kept as the string "[DONE]").
    pub fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let r = self
            .auth(ureq::post(&self.url(path)))
            .send_string(&body.to_string())
            .unwrap();
        sse_data(r)
    }

    /// GET an SSE stream (job events) until it ends.
    pub fn events(&self, path: &str) -> Vec<Value> {
        let r = self.auth(ureq::get(&self.url(path))).call().unwrap();
        sse_data(r)
            .into_iter()
            .map(|d| serde_json::from_str(&d).unwrap())
            .collect()
    }

    /// Polls `GET path` until `done` holds for its JSON (or panics after `limit`).
    pub fn wait_for(&self, path: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let (_, v) = self.get(path);
            if done(&v) {
                return v;
            }
            assert!(start.elapsed() < limit, "timed out waiting on {path}: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn status_json(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = resp.status();
    let text = resp.into_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn sse_data(r: ureq::Response) -> Vec<String> {
    let mut out = Vec::new();
    for line in BufReader::new(r.into_reader()).lines() {
        let Ok(line) = line else { break };
        if let Some(data) = line.strip_prefix("data: ") {
            out.push(data.to_string());
            if data == "[DONE]" {
                break;
            }
        }
    }
    out
}

/// An AgentWrite plan of `n` paragraphs of `words` words each.
pub fn plan_text(n: usize, words: u32) -> String {
    (1..=n)
        .map(|i| format!("Paragraph {i} - Main Point: Part {i} of the river's story - Word Count: {words} words\n"))
        .collect()
}

#[path = "../../../lw-engine/tests/common/llama_cpp.rs"]
pub mod llama_cpp;
#[allow(unused_imports)] // not every test file that includes this module asks for them
pub use llama_cpp::llama_cpp_models;

/// `llama-server` on a free loopback port, killed when dropped.
pub struct LlamaServer {
    pub child: Child,
    pub base: String,
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LlamaServer {
    pub fn start(bin: &Path, model: &Path, context: usize) -> LlamaServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin.join("llama-server"))
            .args(["-m", &model.to_string_lossy(), "--host", "127.0.0.1"])
            .args([
                "--port",
                &port.to_string(),
                "-t",
                "2",
                "-c",
                &context.to_string(),
                "--jinja",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = LlamaServer {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while ureq::get(&format!("{}/health", server.base))
            .call()
            .is_err()
        {
            assert!(Instant::now() < deadline, "llama-server did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        server
    }

    pub fn post(&self, path: &str, body: Value) -> Value {
        // A hung server fails the test instead of stalling it.
        ureq::post(&format!("{}{path}", self.base))
            .timeout(Duration::from_secs(120))
            .send_json(body)
            .unwrap()
            .into_json()
            .unwrap()
    }
}

/// A small tmpfs mounted for a test (disk-full cases); unmounted on drop.
/// `None` where mounting is not allowed (not root, or no CAP_SYS_ADMIN).
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(tag: &str, kib: usize) -> Option<Tmpfs> {
        let path = scratch(&format!("tmpfs-{tag}"));
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(&path)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs { path })
    }

    /// Gives it `kib` KiB (space freed).
    pub fn resize(&self, kib: usize) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={kib}k")])
            .arg(&self.path)
            .status()
            .unwrap();
        assert!(st.success(), "remounting {}", self.path.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}
