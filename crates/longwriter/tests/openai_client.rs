//! The official `openai` Python package as the client. Its interpreter comes
//! from `LONGWRITER_TEST_PYTHON` (CI creates a venv with `openai` and sets
//! it); outside CI the test looks for a `python3` that can import `openai`
//! and says so when there is none.

mod common;

use std::process::Command;

use common::{root, scratch, start, tiny_model};

fn python_with_openai() -> Option<String> {
    if let Ok(p) = std::env::var("LONGWRITER_TEST_PYTHON") {
        return Some(p);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must set LONGWRITER_TEST_PYTHON to a Python with the openai package (.ci/run does)"
    );
    let ok = Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then(|| "python3".to_string())
}

#[test]
fn the_official_openai_client_works_against_longwriter_serve() {
    let Some(python) = python_with_openai() else {
        eprintln!("SKIPPED: no Python with the openai package (set LONGWRITER_TEST_PYTHON)");
        return;
    };
    let s = start(
        "sk-test",
        &tiny_model(),
        &scratch("openai"),
        &["--max-new-tokens", "256"],
    );
    let out = Command::new(&python)
        .arg(root().join("scripts/openai_client_check.py"))
        .arg(format!("{}/v1", s.base))
        .arg("sk-test")
        .arg("tiny-random-qwen2")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("all as expected"), "{stdout}");
    eprintln!("{stdout}");
}
