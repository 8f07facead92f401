//! Real chat templates render exactly as transformers renders them.
//!
//! llama.cpp keeps a collection of real models' templates (Llama 3.x, Qwen,
//! Mistral, Gemma, Phi, DeepSeek, Command-R, GLM, …) in
//! `models/templates/*.jinja`; the llama-cpp-python source package carries it.
//! `scripts/render_templates.py` rendered each of them with Python's jinja2,
//! set up as `apply_chat_template` sets it up, over fixed conversations, and
//! committed the outputs (and each file's sha256) to
//! `tests/fixtures/templates/expected.json`. Here every one of those
//! renderings must come out of [`ChatTemplate`] byte for byte, and where
//! jinja2 failed (a template refusing a system message, a tool template
//! given no tools) ours must fail too, with an error, not a panic.
//!
//! The source package is found at `$LONGWRITER_LLAMA_CPP_SRC` (its
//! `vendor/llama.cpp` directory) or where `scripts/llama_cpp_setup.sh`
//! unpacks it; without it the test says it is skipped, except in CI.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use lw_core::Message;
use lw_engine::template::{parse_json, TemplateInputs, Value};
use lw_engine::ChatTemplate;

/// Renderings not compared: (template, case, reason).
const SKIPPED: &[(&str, &str, &str)] = &[(
    "meetkai-functionary-medium-v3.1",
    "tools+gen",
    "the template adds `tojson`'s text to a `|safe` string, and jinja2's Markup \
     HTML-escapes the JSON's quotes (`{&#34;name&#34;: …`); minijinja's `+` \
     concatenates plain text, and a prompt full of `&#34;` is a quirk, not a format",
)];

/// The instant the reference renderings were made at: 2024-07-26 14:05:09.
const NOW_UNIX_SECS: u64 = 1_722_002_709;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/templates/expected.json")
}

/// The `vendor/llama.cpp` directory of llama-cpp-python's source package.
fn llama_cpp_source() -> Option<PathBuf> {
    let dir = match std::env::var_os("LONGWRITER_LLAMA_CPP_SRC") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME")?)
            .join(".cache/longwriter/llama-cpp/llama_cpp_python-0.3.36/vendor/llama.cpp"),
    };
    dir.join("models/templates").is_dir().then_some(dir)
}

fn text(v: &Value, key: &str) -> String {
    v.get_attr(key)
        .ok()
        .and_then(|s| s.as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("expected.json: no string {key:?} in {v}"))
}

fn keys(v: &Value) -> Vec<String> {
    v.try_iter()
        .expect("expected.json: a map")
        .map(|k| k.as_str().expect("a string key").to_string())
        .collect()
}

/// One conversation of expected.json's `cases`, as our API takes it.
struct Case {
    messages: Vec<Message>,
    inputs: TemplateInputs,
}

fn case(spec: &Value) -> Case {
    let messages = spec
        .get_attr("messages")
        .unwrap()
        .try_iter()
        .unwrap()
        .map(|m| match text(&m, "role").as_str() {
            "system" => Message::system(text(&m, "content")),
            "user" => Message::user(text(&m, "content")),
            "assistant" => Message::assistant(text(&m, "content")),
            other => panic!("expected.json: a role {other:?} our messages cannot hold"),
        })
        .collect();
    let mut inputs = TemplateInputs::new(spec.get_attr("add_generation_prompt").unwrap().is_true());
    let tools = spec.get_attr("tools").unwrap();
    if !tools.is_none() {
        inputs = inputs.with_tools(tools);
    }
    let kwargs = spec.get_attr("kwargs").unwrap();
    for name in keys(&kwargs) {
        inputs = inputs.with_var(&name, kwargs.get_attr(&name).unwrap());
    }
    Case { messages, inputs }
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where two renderings first part, with some text around it.
fn first_difference(ours: &str, theirs: &str) -> String {
    let at = ours
        .char_indices()
        .zip(theirs.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or(ours.len().min(theirs.len()));
    let at = (0..=at)
        .rev()
        .find(|&i| theirs.is_char_boundary(i) && ours.is_char_boundary(i))
        .unwrap_or(0);
    let around = |s: &str| {
        let from = (0..=at.saturating_sub(40))
            .rev()
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        s[from..].chars().take(100).collect::<String>()
    };
    format!(
        "at byte {at}:\n      ours:   {:?}\n      jinja2: {:?}",
        around(ours),
        around(theirs)
    )
}

/// Probes (expected.json's `probes`) where we knowingly differ: (probe, reason).
const PROBE_DIFFERENCES: &[(&str, &str)] = &[];

/// One Python-ism per small template, over a fixed context: values print as
/// Python prints them, loops and filters behave as jinja2's, and what fails
/// there fails here. Needs no source package.
#[test]
fn python_isms_render_as_jinja2_renders_them() {
    let doc = parse_json(&std::fs::read_to_string(fixture()).unwrap()).unwrap();
    let ctx = doc.get_attr("probe_context").unwrap();
    let messages: Vec<Message> = ctx
        .get_attr("messages")
        .unwrap()
        .try_iter()
        .unwrap()
        .map(|m| match text(&m, "role").as_str() {
            "system" => Message::system(text(&m, "content")),
            _ => Message::user(text(&m, "content")),
        })
        .collect();
    let inputs = TemplateInputs::new(false).with_var("d", ctx.get_attr("d").unwrap());
    let now = UNIX_EPOCH + Duration::from_secs(NOW_UNIX_SECS);
    let probes = doc.get_attr("probes").unwrap();
    let mut failures = Vec::new();
    let names = keys(&probes);
    for name in &names {
        if PROBE_DIFFERENCES.iter().any(|(n, _)| n == name) {
            continue;
        }
        let probe = probes.get_attr(name).unwrap();
        let expected = probe.get_attr("output").unwrap();
        let ours = ChatTemplate::new(&text(&probe, "source"), "<s>", "</s>")
            .and_then(|t| t.with_clock(move || now).render_with(&messages, &inputs));
        match (expected.as_str(), ours) {
            (Some(theirs), Ok(ours)) if ours == theirs => {}
            (Some(theirs), ours) => {
                failures.push(format!("{name}: jinja2 {theirs:?}, ours {ours:?}"))
            }
            (None, Ok(ours)) => failures.push(format!(
                "{name}: jinja2 fails ({}), ours renders {ours:?}",
                text(&expected, "error")
            )),
            (None, Err(_)) => {}
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} probes differ from jinja2:\n  {}",
        failures.len(),
        names.len(),
        failures.join("\n  ")
    );
}

#[test]
fn real_chat_templates_render_as_transformers_renders_them() {
    let Some(src) = llama_cpp_source() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must fetch the llama-cpp-python 0.3.36 source package (.ci/run does) \
             and point LONGWRITER_LLAMA_CPP_SRC at its vendor/llama.cpp"
        );
        eprintln!(
            "SKIPPED: llama-cpp-python's source (vendor/llama.cpp/models/templates) not found; \
             set LONGWRITER_LLAMA_CPP_SRC or run scripts/llama_cpp_setup.sh"
        );
        return;
    };
    let dir = src.join("models/templates");
    let doc = parse_json(&std::fs::read_to_string(fixture()).unwrap()).unwrap();
    let cases_doc = doc.get_attr("cases").unwrap();
    let cases: BTreeMap<String, Case> = keys(&cases_doc)
        .into_iter()
        .map(|name| {
            let spec = cases_doc.get_attr(&name).unwrap();
            (name, case(&spec))
        })
        .collect();
    let templates = doc.get_attr("templates").unwrap();
    let mut names = keys(&templates);
    names.sort();

    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().ok()?;
            Some(name.strip_suffix(".jinja")?.to_string())
        })
        .collect();
    on_disk.sort();
    assert_eq!(
        on_disk,
        names,
        "{} holds other templates than expected.json: rerun scripts/render_templates.py",
        dir.display()
    );

    let now = UNIX_EPOCH + Duration::from_secs(NOW_UNIX_SECS);
    let (mut passed, mut total) = (0, 0);
    let mut failures = Vec::new();
    for name in &names {
        let entry = templates.get_attr(name).unwrap();
        let bytes = std::fs::read(dir.join(format!("{name}.jinja"))).unwrap();
        assert_eq!(
            sha256_hex(&bytes),
            text(&entry, "sha256"),
            "{name}.jinja changed since expected.json was written: rerun scripts/render_templates.py"
        );
        let source = String::from_utf8(bytes).unwrap();
        let template = ChatTemplate::new(
            &source,
            &text(&entry, "bos_token"),
            &text(&entry, "eos_token"),
        )
        .map(|t| t.with_clock(move || now));
        let outputs = entry.get_attr("outputs").unwrap();
        for case_name in keys(&outputs) {
            if let Some((_, _, why)) = SKIPPED
                .iter()
                .find(|(n, c, _)| n == name && *c == case_name)
            {
                eprintln!("skipped {name} / {case_name}: {why}");
                continue;
            }
            total += 1;
            let expected = outputs.get_attr(&case_name).unwrap();
            let case = &cases[&case_name];
            let ours = match &template {
                Ok(t) => catch_unwind(AssertUnwindSafe(|| {
                    t.render_with(&case.messages, &case.inputs)
                }))
                .unwrap_or_else(|_| panic!("{name} / {case_name}: rendering panicked")),
                Err(e) => Err(lw_engine::EngineError::Template(e.to_string())),
            };
            let verdict = match (expected.as_str(), &ours) {
                (Some(theirs), Ok(ours)) if ours == theirs => None,
                (Some(theirs), Ok(ours)) => Some(first_difference(ours, theirs)),
                (Some(_), Err(e)) => Some(format!("jinja2 renders it, ours fails: {e}")),
                (None, Ok(_)) => Some(format!(
                    "jinja2 fails ({}), ours renders",
                    text(&expected, "error")
                )),
                (None, Err(e)) => {
                    let theirs = text(&expected, "error");
                    // A template's own refusal must reach the caller word for word.
                    match theirs.strip_prefix("TemplateError: ") {
                        Some(msg) if !e.to_string().contains(msg) => Some(format!(
                            "the template's message {msg:?} is missing from ours: {e}"
                        )),
                        _ => None,
                    }
                }
            };
            match verdict {
                None => passed += 1,
                Some(why) => failures.push(format!("{name} / {case_name}: {why}")),
            }
        }
    }
    eprintln!(
        "{passed}/{total} renderings match jinja2 over {} templates ({} skipped)",
        names.len(),
        SKIPPED.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {total} renderings differ from jinja2's:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}
