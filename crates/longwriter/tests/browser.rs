//! The web page in a real browser: headless Chromium driven over WebDriver
//! (chromedriver) types an instruction, a length and a plan, starts a job on
//! the deterministic test model, waits for the document, checks what the
//! page shows against the API, and saves a screenshot.
//!
//! CI installs Debian's `chromium` and `chromium-driver`. Elsewhere the test
//! says it is skipped when they are missing.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{plan_text, scratch, start, tiny_model};
use serde_json::{json, Value};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find_tool(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for n in names {
            let p = dir.join(n);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

struct Driver {
    child: Child,
    base: String,
    session: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = ureq::delete(&format!("{}/session/{}", self.base, self.session)).call();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wd(method: &str, url: &str, body: Option<Value>) -> Value {
    let req = ureq::request(method, url);
    let resp = match body {
        Some(b) => req.send_string(&b.to_string()),
        None => req.call(),
    };
    let text = match resp {
        Ok(r) => r.into_string().unwrap(),
        Err(ureq::Error::Status(code, r)) => {
            panic!(
                "WebDriver {method} {url}: {code} {}",
                r.into_string().unwrap()
            )
        }
        Err(e) => panic!("WebDriver {method} {url}: {e}"),
    };
    serde_json::from_str::<Value>(&text).unwrap()["value"].clone()
}

impl Driver {
    fn start(chromedriver: &Path, chromium: &Path, profile: &Path) -> Driver {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        while ureq::get(&format!("{base}/status")).call().is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--disable-quic", "--window-size=1280,1100",
                     format!("--user-data-dir={}", profile.display())],
        }}}});
        let v = wd("POST", &format!("{base}/session"), Some(caps));
        let session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_string();
        Driver {
            child,
            base,
            session,
        }
    }

    fn url(&self, tail: &str) -> String {
        format!("{}/session/{}{tail}", self.base, self.session)
    }

    fn go(&self, url: &str) {
        wd("POST", &self.url("/url"), Some(json!({"url": url})));
    }

    fn el(&self, css: &str) -> String {
        let v = wd(
            "POST",
            &self.url("/element"),
            Some(json!({"using": "css selector", "value": css})),
        );
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    fn click(&self, css: &str) {
        let e = self.el(css);
        wd(
            "POST",
            &self.url(&format!("/element/{e}/click")),
            Some(json!({})),
        );
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.el(css);
        wd(
            "POST",
            &self.url(&format!("/element/{e}/value")),
            Some(json!({"text": text})),
        );
    }

    fn script(&self, js: &str) -> Value {
        wd(
            "POST",
            &self.url("/execute/sync"),
            Some(json!({"script": js, "args": []})),
        )
    }

    fn screenshot(&self) -> Vec<u8> {
        let v = wd("GET", &self.url("/screenshot"), None);
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap()
    }
}

#[test]
fn the_page_writes_a_document_in_a_real_browser() {
    let tools = (
        find_tool(&["chromedriver"]),
        find_tool(&["chromium", "chromium-browser", "google-chrome"]),
    );
    let (Some(chromedriver), Some(chromium)) = tools else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install chromium and chromium-driver (.ci/run does)"
        );
        eprintln!("SKIPPED: chromium and chromedriver are not installed");
        return;
    };
    let work = scratch("browser");
    let mut s = start("page-key", &tiny_model(), &work.join("data"), &[]);
    let d = Driver::start(&chromedriver, &chromium, &work.join("profile"));
    d.go(&s.url("/"));
    // Without the key the page says so instead of listing jobs.
    let started = Instant::now();
    loop {
        let msg = d.script("return document.getElementById('form-error').textContent");
        if msg.as_str().is_some_and(|m| m.contains("API key")) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no key prompt: {msg}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    d.type_into("#key", "page-key");
    d.click("#save-key");
    d.type_into(
        "#instruction",
        "Write a story about a river and the town beside it.",
    );
    d.type_into("#length", "600");
    d.click("details summary");
    d.type_into("#plan", &plan_text(4, 150));
    d.click("#start");
    let started = Instant::now();
    let shown = loop {
        let v = d.script(
            "return {state: document.getElementById('state').textContent,
                     words: document.getElementById('words').textContent,
                     final: document.getElementById('words').dataset.final,
                     sections: [...document.querySelectorAll('#document section')].map(s => s.textContent),
                     plan: document.querySelectorAll('#plan-list li').length,
                     jobs: [...document.querySelectorAll('#jobs li')].map(l => l.dataset.id),
                     download: !document.getElementById('download').hidden,
                     error: document.getElementById('job-error').textContent + document.getElementById('form-error').textContent}",
        );
        if v["state"] == "finished" && v["final"] == "true" {
            break v;
        }
        assert!(v["state"] != "failed", "the job failed: {v}");
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the page never finished: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let png = d.screenshot();
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("page-finished.png");
    std::fs::write(&shot, &png).unwrap();
    eprintln!("screenshot: {}", shot.display());
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "a real screenshot"
    );

    // What the page shows is the job as the API has it.
    s.key = "page-key".into();
    let (_, list) = s.get("/v1/longwrite");
    let id = list["data"][0]["id"].as_str().unwrap().to_string();
    let (_, job) = s.get(&format!("/v1/longwrite/{id}"));
    assert_eq!(job["status"], "finished");
    let sections: Vec<&str> = job["sections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["text"].as_str().unwrap())
        .collect();
    let on_page: Vec<&str> = shown["sections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert_eq!(on_page, sections, "the page shows the finished document");
    let words = job["delivered_words"].as_u64().unwrap();
    assert!(words > 0);
    assert_eq!(
        shown["words"],
        format!("{words} words"),
        "the page shows its word count"
    );
    assert_eq!(shown["plan"], 4);
    assert_eq!(shown["download"], true);
    assert!(shown["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j == id.as_str()));
    assert_eq!(shown["error"], "");

    // The page never runs model output: a section holding a script, an
    // image with an error handler and a `javascript:` link (put into the
    // job's record in the store, where the writer's text lands) is shown
    // as text when the job is opened again.
    let hostile = "<script>window.__lw_ran = 'script'</script>                   <img src=\"x\" onerror=\"window.__lw_ran = 'img'\">                   <a href=\"javascript:window.__lw_ran = 'link'\">read on</a>";
    let db = rusqlite::Connection::open(work.join("data/jobs.sqlite")).unwrap();
    let changed = db
        .execute(
            "UPDATE sections SET text = ?1 WHERE job = ?2 AND idx = 0",
            rusqlite::params![hostile, id],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(db);
    d.go(&s.url("/"));
    let started = Instant::now();
    let opened = loop {
        let v = d.script(&format!(
            "const li = document.querySelector('#jobs li[data-id=\"{id}\"]');
             if (li && !window.__lw_clicked) {{ window.__lw_clicked = true; li.click(); }}
             const first = document.querySelector('#document section');
             return {{first: first ? first.textContent : null,
                      ran: window.__lw_ran || null,
                      elements: document.querySelectorAll('#document script, #document img, #document a').length}}"
        ));
        if v["first"] == hostile {
            break v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the job never reopened with its section: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(opened["elements"], 0, "{opened}");
    // Give an image's error handler time to fire, had it been created.
    std::thread::sleep(Duration::from_millis(500));
    let ran = d.script("return window.__lw_ran || null");
    assert_eq!(ran, Value::Null, "model output ran as code: {ran}");
}
