//! `longwriter data build` against real `longwriter serve` processes on
//! loopback (the trained toy model, seeded sampling, so every run writes the
//! same text): killed builds rerun to exactly the items of an uninterrupted
//! build with no section written twice; a server that dies mid-run loses
//! nothing; the export trains with `train sft`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{longwriter, root, scratch, start, start_on, text, Server};

fn toy_model() -> PathBuf {
    root().join("models/longwriter-tiny")
}

/// `n` distinct instructions the toy model can plan (400 or 500 words).
fn instructions(dir: &Path, n: usize) -> PathBuf {
    let topics = [
        "a fox",
        "the sea",
        "a clock",
        "winter",
        "a lighthouse",
        "bread",
        "a violin",
        "the moon",
        "a garden",
        "trains",
        "a letter",
        "the harvest",
    ];
    let lines: Vec<String> = (0..n)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("Write a {}-word story about {} (number {i}).", 400 + 100 * (i % 2), topics[i % topics.len()]),
                "source": "test",
                "n": i,
            })
            .to_string()
        })
        .collect();
    let path = dir.join("instructions.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn build_cmd(out: &Path, ins: &Path, servers: &[&Server]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_longwriter"));
    c.args([
        "data",
        "build",
        "--quiet",
        "--concurrency",
        "8",
        "--retries",
        "1",
    ])
    // The toy model writes short: a band that accepts some items and
    // rejects others.
    .args(["--endpoint-rest", "0.5", "--length-band", "0.15,3", "--out"])
    .arg(out)
    .arg("--instructions")
    .arg(ins)
    .env_remove("LONGWRITER_MODEL")
    .env_remove("OPENAI_API_KEY");
    for s in servers {
        c.arg("--api-base").arg(format!("{}/v1", s.base));
    }
    c
}

fn run_to_end(mut c: Command) -> String {
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stderr)
}

/// (id, status, reason, detail, document) of every item, by id.
type Row = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
);

fn items(dir: &Path) -> Vec<Row> {
    let c = rusqlite::Connection::open(dir.join("data.sqlite")).unwrap();
    let mut st = c
        .prepare("SELECT id, status, reason, detail, document FROM items ORDER BY id")
        .unwrap();
    let rows = st
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

fn stats(dir: &Path) -> serde_json::Value {
    let out = longwriter(&["data", "stats", "--json", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn same_items(reference: &[Row], got: &[Row]) {
    assert_eq!(reference.len(), got.len());
    for (r, g) in reference.iter().zip(got) {
        assert_eq!(r, g, "item {} differs from the uninterrupted build", r.0);
    }
}

#[test]
fn killed_builds_rerun_to_the_items_of_an_uninterrupted_build() {
    let d = scratch("data-kill");
    let model = toy_model();
    let a = start("", &model, &d.join("srv-a"), &[]);
    let b = start("", &model, &d.join("srv-b"), &[]);
    let ins = instructions(&d, 200);

    let reference = d.join("reference");
    let started = Instant::now();
    run_to_end(build_cmd(&reference, &ins, &[&a, &b]));
    let uninterrupted = started.elapsed();
    eprintln!("uninterrupted build of 200 items: {uninterrupted:?}");
    let want = items(&reference);
    assert_eq!(want.len(), 200);
    let accepted = want.iter().filter(|r| r.1 == "accepted").count();
    assert!(accepted > 0, "some items pass the gates");
    assert!(want.iter().all(|r| r.1 == "accepted" || r.1 == "rejected"));

    // Five SIGKILLs, each once the build has finished another seventh of
    // the items (observed in its store, not guessed from a clock), each
    // followed by a rerun; every kill must land before the end, which the
    // last seventh leaves time for even on a loaded machine.
    let killed = d.join("killed");
    let finished = |dir: &Path| -> u64 {
        let out = longwriter(&["data", "stats", "--json", dir.to_str().unwrap()]);
        if !out.status.success() {
            return 0; // not created yet
        }
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        s["items"].as_u64().unwrap_or(0)
            - s["pending"].as_u64().unwrap_or(0)
            - s["running"].as_u64().unwrap_or(0)
    };
    for k in 1..=5u64 {
        let target = 200 * k / 7;
        let mut child: Child = build_cmd(&killed, &ins, &[&a, &b])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let waiting = Instant::now();
        while finished(&killed) < target {
            assert!(
                child.try_wait().unwrap().is_none(),
                "kill {k}: the build ended before {target} items were done"
            );
            assert!(
                waiting.elapsed() < Duration::from_secs(600),
                "kill {k}: no progress"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let done = finished(&killed);
        assert!(done < 200, "kill {k} landed after the build finished");
        eprintln!("kill {k}: {done} of 200 items done");
    }
    let log = run_to_end(build_cmd(&killed, &ins, &[&a, &b]));
    assert!(
        log.contains("0 instructions added, 200 already in the store"),
        "{log}"
    );
    same_items(&want, &items(&killed));
    let s = stats(&killed);
    assert_eq!(s["items"], 200);
    assert_eq!(
        s["pending"].as_u64().unwrap() + s["running"].as_u64().unwrap(),
        0
    );
    assert_eq!(s["section_max_writes"], 1, "a section was written twice");
    assert_eq!(stats(&reference)["section_max_writes"], 1);
}

#[test]
fn a_server_that_dies_mid_run_loses_nothing_and_the_export_trains() {
    let d = scratch("data-fail");
    let model = toy_model();
    let a = start("", &model, &d.join("srv-a"), &[]);
    let mut b = start("", &model, &d.join("srv-b"), &[]);
    let port: u16 = b.base.rsplit(':').next().unwrap().parse().unwrap();
    let ins = instructions(&d, 40);

    let reference = d.join("reference");
    run_to_end(build_cmd(&reference, &ins, &[&a]));

    let out = d.join("failover");
    let child = build_cmd(&out, &ins, &[&a, &b])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed once it is decoding for the build (observed, not timed), so
    // the kill lands mid-item; then down for a while before it returns.
    let waiting = Instant::now();
    loop {
        let (_, h) = b.get("/health");
        if h["running"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            waiting.elapsed() < Duration::from_secs(120),
            "the second server never got work: {h}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = b.child.kill();
    let _ = b.child.wait();
    std::thread::sleep(Duration::from_millis(2000));
    b = start_on(port, "", &model, &d.join("srv-b"), &[]);
    let done = child.wait_with_output().unwrap();
    assert!(done.status.success(), "{}", text(&done.stderr));
    let log = text(&done.stderr);
    same_items(&items(&reference), &items(&out));
    let s = stats(&out);
    assert!(
        s["endpoint_failures"].as_u64().unwrap() >= 1,
        "the dead server's items were put back: {s}\n{log}"
    );
    assert_eq!(s["section_max_writes"], 1);
    drop(b);

    // Export, mixed 1:1 with general chat data, and fine-tune on it.
    let general = d.join("general.jsonl");
    let lines: Vec<String> = (0..3)
        .map(|i| serde_json::json!({"messages": [{"role": "user", "content": format!("Say {i}.")}, {"role": "assistant", "content": format!("{i}.")}]}).to_string())
        .collect();
    std::fs::write(&general, lines.join("\n")).unwrap();
    let exported = d.join("sft.jsonl");
    let e = longwriter(&[
        "data",
        "export",
        out.to_str().unwrap(),
        "-o",
        exported.to_str().unwrap(),
        "--mix",
        general.to_str().unwrap(),
        "--mix-ratio",
        "1",
        "--seed",
        "7",
    ]);
    assert!(e.status.success(), "{}", text(&e.stderr));
    let accepted = s["accepted"].as_u64().unwrap() as usize;
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&exported)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), accepted + accepted.min(3));
    let long = rows
        .iter()
        .find(|r| {
            r["messages"][0]["content"]
                .as_str()
                .unwrap()
                .starts_with("Write a")
        })
        .expect("a long-output example");
    let document = long["messages"][1]["content"].as_str().unwrap();
    assert!(items(&out).iter().any(|r| r.4.as_deref() == Some(document)));
    // Through the model's chat template and tokenizer and back: the
    // rendered conversation holds the instruction and the answer verbatim.
    let messages: Vec<lw_core::Message> = serde_json::from_value(long["messages"].clone()).unwrap();
    let engine = lw_engine::Engine::load(&toy_model(), &Default::default()).unwrap();
    let ids = engine.encode_chat(&messages).unwrap();
    let rendered = engine.tokenizer().decode(&ids).unwrap();
    assert!(
        rendered.contains(&messages[0].content) && rendered.contains(document),
        "{rendered}"
    );

    let sft = longwriter(&[
        "train",
        "sft",
        "--model",
        toy_model().to_str().unwrap(),
        "--data",
        exported.to_str().unwrap(),
        "--out",
        d.join("sft").to_str().unwrap(),
        "--seq-len",
        "2048",
        "--batch",
        "1",
        "--steps",
        "1",
        "--threads",
        "1",
        "--quiet",
    ]);
    let log = text(&sft.stderr);
    assert!(sft.status.success(), "{log}");
    assert!(
        log.contains(&format!("{} conversations", rows.len())),
        "every exported conversation renders and fits: {log}"
    );
}

#[test]
fn bad_instruction_files_are_named_and_nothing_is_stored() {
    let d = scratch("data-bad");
    let ins = d.join("bad.jsonl");
    std::fs::write(
        &ins,
        "{\"prompt\": \"Write 400 words.\"}\n{\"prompt\": 3}\n",
    )
    .unwrap();
    let out = longwriter(&[
        "data",
        "build",
        "--out",
        d.join("b").to_str().unwrap(),
        "--instructions",
        ins.to_str().unwrap(),
        "--api-base",
        "http://127.0.0.1:9/v1",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("bad.jsonl:2") && err.contains("not a string"),
        "{err}"
    );
    let s = stats(&d.join("b"));
    assert_eq!(s["items"], 0);
    let out = longwriter(&["data", "stats", d.join("none").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no data build here"));
}

#[test]
fn ctrl_c_drains_the_items_in_flight_and_a_rerun_finishes() {
    use std::io::{BufRead, BufReader};
    let d = scratch("data-sigint");
    let ins = instructions(&d, 8);
    let out = d.join("b");
    let cmd = |c: &mut Command| {
        c.args(["data", "build", "--concurrency", "2", "--threads", "1"])
            .args(["--length-band", "0.15,3", "--model"])
            .arg(toy_model())
            .arg("--out")
            .arg(&out)
            .arg("--instructions")
            .arg(&ins)
            .env_remove("LONGWRITER_MODEL");
    };
    let mut c = Command::new(env!("CARGO_BIN_EXE_longwriter"));
    cmd(&mut c);
    let mut child = c.stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    // The first finished item, then one Ctrl-C.
    for line in lines.by_ref() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.starts_with("[1/8]") {
            break;
        }
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    for line in lines {
        log.push_str(&line.unwrap());
        log.push('\n');
    }
    assert!(child.wait().unwrap().success(), "{log}");
    assert!(log.contains("draining"), "{log}");
    assert!(log.contains("rerun the same command to continue"), "{log}");
    let s = stats(&out);
    assert_eq!(s["running"], 0, "items in flight finished: {s}");
    let done = s["accepted"].as_u64().unwrap() + s["rejected"].as_u64().unwrap();
    assert!((2..8).contains(&done), "{s}\n{log}");

    let mut c = Command::new(env!("CARGO_BIN_EXE_longwriter"));
    cmd(&mut c);
    let out2 = c.arg("--quiet").output().unwrap();
    assert!(out2.status.success(), "{}", text(&out2.stderr));
    let s = stats(&out);
    assert_eq!(
        s["accepted"].as_u64().unwrap() + s["rejected"].as_u64().unwrap(),
        8
    );
    assert_eq!(s["section_max_writes"], 1);
}

/// A local build that speculates (prompt lookup, or the model drafting for
/// itself) writes exactly the items of one that does not, under greedy
/// decoding: speculation inside the batching scheduler changes speed only.
#[test]
fn speculation_in_a_local_build_writes_the_same_items() {
    let d = scratch("data-spec");
    // Short pieces; at least one of them the greedy toy writes.
    let ins = d.join("instructions.jsonl");
    let lines: Vec<String> = ["a fox", "the sea"]
        .iter()
        .map(|t| serde_json::json!({"prompt": format!("Write a 200-word story about {t}."), "source": "test"}).to_string())
        .collect();
    std::fs::write(&ins, lines.join("\n") + "\n").unwrap();
    let model = toy_model();
    let build = |name: &str, extra: &[&str]| {
        let out = d.join(name);
        let mut c = Command::new(env!("CARGO_BIN_EXE_longwriter"));
        // Plain AgentWrite (held to its budgets, the greedy toy loops).
        c.args([
            "data",
            "build",
            "--quiet",
            "--concurrency",
            "2",
            "--no-constrain",
        ])
        .args(["--temperature", "0", "--threads", "1"])
        .args(["--length-band", "0.15,3", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(&out)
        .arg("--instructions")
        .arg(&ins)
        .args(extra)
        .env_remove("LONGWRITER_MODEL")
        .env_remove("OPENAI_API_KEY");
        let started = Instant::now();
        let log = run_to_end(c);
        eprintln!("{name}: {:?}", started.elapsed());
        (items(&out), log)
    };
    let (want, _) = build("plain", &[]);
    assert_eq!(want.len(), 2);
    assert!(
        want.iter()
            .any(|r| r.4.as_deref().is_some_and(|t| !t.is_empty())),
        "{want:?}"
    );
    let (lookup, _) = build("lookup", &["--prompt-lookup"]);
    same_items(&want, &lookup);
    let m = model.to_str().unwrap();
    let (drafted, _) = build("draft", &["--draft-model", m, "--draft-max", "2"]);
    same_items(&want, &drafted);
}
