//! The `longwriter` binary as a user runs it: real processes, real files.

mod common;

use common::{longwriter, root, text};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn model(name: &str) -> String {
    root()
        .join("tests/fixtures/models")
        .join(name)
        .display()
        .to_string()
}

fn fixture(name: &str) -> serde_json::Value {
    let p = root().join("tests/fixtures").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn every_subcommand_has_help() {
    for sub in [
        &["--help"][..],
        &["generate", "--help"],
        &["chat", "--help"],
        &["bench", "--help"],
        &["serve", "--help"],
        &["write", "--help"],
        &["eval", "run", "--help"],
        &["eval", "length", "--help"],
        &["eval", "quality", "--help"],
        &["eval", "ruler", "--help"],
        &["eval", "report", "--help"],
        &["tokenizer", "train", "--help"],
        &["train", "pretrain", "--help"],
        &["train", "sft", "--help"],
        &["lora", "merge", "--help"],
        &["data", "synth", "--help"],
        &["data", "tokenize", "--help"],
        &["tokenize", "--help"],
    ] {
        let out = longwriter(sub);
        assert!(out.status.success(), "{sub:?}");
        let help = text(&out.stdout);
        assert!(help.contains("Usage: longwriter"), "{sub:?}: {help}");
    }
    let help = text(&longwriter(&["generate", "--help"]).stdout);
    for flag in [
        "--model",
        "--chat",
        "--max-tokens",
        "--temperature",
        "--seed",
        "--top-p",
        "--min-p",
        "--stop",
        "--threads",
    ] {
        assert!(help.contains(flag), "generate --help lacks {flag}");
    }
}

#[test]
fn generate_streams_only_the_text_to_stdout_and_figures_to_stderr() {
    let fx = fixture("llama3-untied");
    let out = longwriter(&[
        "generate",
        "--model",
        &model("llama3-untied"),
        "--temperature",
        "0",
        "--max-tokens",
        "32",
        "--threads",
        "1",
        fx["prompt"].as_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let greedy = fx["greedy_text"].as_str().unwrap();
    // Greedy output is transformers' greedy output, up to a possible
    // end-of-sequence token (which the fixture's loop did not stop at).
    assert!(
        !stdout.is_empty() && greedy.starts_with(&stdout),
        "{stdout:?} vs {greedy:?}"
    );
    let stderr = text(&out.stderr);
    assert!(stderr.contains("prompt tokens: 39"), "{stderr}");
    for figure in ["generated tokens:", "prefill:", "decode:", "tok/s"] {
        assert!(stderr.contains(figure), "{stderr}");
    }
    assert!(!stdout.contains("tok/s"));
}

#[test]
fn chat_mode_and_seeds_repeat() {
    let run = |seed: &str| {
        let out = longwriter(&[
            "generate",
            "--model",
            &model("qwen2"),
            "--chat",
            "--system",
            "Be brief.",
            "--max-tokens",
            "12",
            "--temperature",
            "1.0",
            "--seed",
            seed,
            "Write about rivers.",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("prompt tokens: "));
        text(&out.stdout)
    };
    assert_eq!(run("3"), run("3"));
}

#[test]
fn bad_input_exits_non_zero_with_a_message_and_no_panic() {
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "generate".into(),
                "--model".into(),
                "/nonexistent/model-dir".into(),
                "hi".into(),
            ],
            "/nonexistent/model-dir",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                model("qwen2"),
                "".into(),
            ],
            "prompt is empty",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                model("qwen2"),
                "--chat".into(),
                "--max-tokens".into(),
                "2".into(),
                "x".repeat(2000),
            ],
            "context holds 256",
        ),
        (
            vec![
                "bench".into(),
                "--model".into(),
                model("qwen2"),
                "--prompt-tokens".into(),
                "300".into(),
            ],
            "context of 256",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = longwriter(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn hub_download_failure_says_how_to_proceed() {
    // Loopback port 9 refuses connections: the hub is unreachable.
    let home = std::env::temp_dir().join(format!("lw-hf-home-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .args(["generate", "--model", "some-org/some-model", "hi"])
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HOME", &home)
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("some-org/some-model")
            && stderr.contains("--model")
            && stderr.contains("--api-base"),
        "{stderr}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .args(["generate", "--model", "some-org/some-model", "hi"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", &home)
        .output()
        .unwrap();
    assert!(
        text(&out.stderr).contains("HF_HUB_OFFLINE"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn chat_repl_answers_each_turn_and_exits() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .args([
            "chat",
            "--model",
            &model("qwen2"),
            "--max-tokens",
            "6",
            "--seed",
            "1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello!\nAnd again?\n/exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("prompt tokens:").count(), 2, "{stderr}");
    // The second turn reuses the first turn's cache.
    let second = stderr
        .lines()
        .filter(|l| l.starts_with("prompt tokens:"))
        .nth(1)
        .unwrap();
    assert!(!second.contains("(0 reused)"), "{second}");
}

#[test]
fn bench_prints_one_json_object_with_the_figures() {
    let out = longwriter(&[
        "bench",
        "--model",
        &model("llama3-untied"),
        "--prompt-tokens",
        "32",
        "--gen-tokens",
        "8",
        "--runs",
        "2",
        "--threads",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    for key in ["prefill_tok_s", "decode_tok_s", "peak_rss_mb"] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {v}");
    }
    assert_eq!(v["threads"], 1);
    // No quantized matrices, so no quantized kernels ran.
    assert_eq!(v["kernels"], serde_json::Value::Null, "{v}");
}

#[test]
fn bench_names_the_kernels_of_a_quantized_model_and_takes_the_cap() {
    let model = model("llama3-untied");
    let bench = |kernels: &str| {
        Command::new(env!("CARGO_BIN_EXE_longwriter"))
            .args(["bench", "--model", &model, "--quantize", "q8_0"])
            .args([
                "--prompt-tokens",
                "8",
                "--gen-tokens",
                "4",
                "--runs",
                "1",
                "--json",
            ])
            .env("LONGWRITER_KERNELS", kernels)
            .output()
            .unwrap()
    };
    let out = bench("avx2");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    #[cfg(target_arch = "x86_64")]
    let expected = if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        "avx2"
    } else {
        "candle"
    };
    #[cfg(not(target_arch = "x86_64"))]
    let expected = "candle";
    assert_eq!(v["kernels"], expected, "{v}");
    // A name that is not a set is reported, and the run goes on.
    let out = bench("avx-2");
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    if expected != "candle" {
        assert!(
            stderr.contains("LONGWRITER_KERNELS=avx-2 is not a kernel set"),
            "{stderr}"
        );
    }
}

#[test]
fn count_prints_the_number_alone_with_either_counter() {
    let path = std::env::temp_dir().join(format!("lw-count-{}.txt", std::process::id()));
    std::fs::write(&path, "中文English中文 don't GPT4").unwrap();
    let p = path.display().to_string();
    let first_line = |out: Output| text(&out.stdout).lines().next().unwrap().to_string();
    assert_eq!(
        first_line(longwriter(&["count", "--counter", "longbench", &p])),
        "6"
    );
    assert_eq!(first_line(longwriter(&["count", &p])), "7");
    let mut child = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .args(["count", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"three small words")
        .unwrap();
    assert_eq!(first_line(child.wait_with_output().unwrap()), "3");
    let missing = longwriter(&["count", "/nonexistent/file.txt"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains("/nonexistent/file.txt"));
}

#[test]
fn tokenize_prints_the_ids_of_a_vocabulary_only_gguf_file() {
    let Some(models) = common::llama_cpp_models() else {
        return;
    };
    // llama.cpp's Llama 2 vocabulary: no tensors, SentencePiece, BOS by default.
    let spm = models
        .join("ggml-vocab-llama-spm.gguf")
        .display()
        .to_string();
    let run = |args: &[&str]| {
        let out = longwriter(&[&["tokenize", "--model", &spm][..], args].concat());
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    assert_eq!(run(&["Hello world"]), "1,15043,3186\n");
    assert_eq!(run(&["--no-bos", "Hello world"]), "15043,3186\n");
    // Special-token text is plain text unless asked.
    assert_eq!(run(&["--parse-special", "<s>Hello"]), "1,1,15043\n");
    assert_ne!(run(&["<s>Hello"]), "1,1,15043\n");
    let json: serde_json::Value =
        serde_json::from_str(&run(&["--json", "--no-bos", "Hello world"])).unwrap();
    assert_eq!(
        json,
        serde_json::json!([{"id": 15043, "piece": " Hello"}, {"id": 3186, "piece": " world"}])
    );
    assert_eq!(run(&["--detokenize", "15043, 3186"]), "Hello world\n");
    assert_eq!(run(&["--detokenize", "[1, 15043]"]), "<s> Hello\n");
    let mut child = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .args(["tokenize", "--no-bos", "--model", &spm, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello world")
        .unwrap();
    assert_eq!(
        text(&child.wait_with_output().unwrap().stdout),
        "15043,3186\n"
    );
    let bad = longwriter(&["tokenize", "--model", &spm, "--detokenize", "1,x"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(text(&bad.stderr).contains("\"x\" is not a token id"));
}

/// A private copy of the qwen2 fixture, broken by `breakage`.
fn broken_model(tag: &str, breakage: impl FnOnce(&std::path::Path)) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("lw-cli-broken-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(root().join("tests/fixtures/models/qwen2")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    breakage(&dst);
    dst
}

fn set_config(dir: &std::path::Path, key: &str, value: serde_json::Value) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v[key] = value;
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn broken_model_directories_exit_non_zero_naming_the_culprit() {
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            broken_model("noconfig", |d| {
                std::fs::remove_file(d.join("config.json")).unwrap()
            }),
            "config.json",
        ),
        (
            broken_model("truncated", |d| {
                let p = d.join("model.safetensors");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            }),
            "model.safetensors",
        ),
        (
            broken_model("shape", |d| set_config(d, "intermediate_size", 120.into())),
            "model.layers.0.mlp.gate_proj.weight",
        ),
        (
            broken_model("arch", |d| set_config(d, "model_type", "mamba".into())),
            "mamba",
        ),
        (
            broken_model("vocab", |d| set_config(d, "vocab_size", 600.into())),
            "tokenizer.json",
        ),
    ];
    for (dir, needle) in cases {
        let out = longwriter(&["generate", "--model", &dir.display().to_string(), "hi"]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", dir.display());
        assert!(stderr.contains(needle), "{needle}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn tokenizer_train_writes_a_loadable_tokenizer_and_names_bad_files() {
    let out = std::env::temp_dir().join(format!("lw-cli-tok-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let readme = root().join("README.md");
    let o = longwriter(&[
        "tokenizer",
        "train",
        readme.to_str().unwrap(),
        "--vocab-size",
        "600",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("byte-level BPE of 600 entries"),
        "{}",
        text(&o.stderr)
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert!(cfg["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    assert!(out.join("tokenizer.json").exists());
    let o = longwriter(&[
        "tokenizer",
        "train",
        "/no/such.txt",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("/no/such.txt"),
        "{}",
        text(&o.stderr)
    );
    let o = longwriter(&[
        "tokenizer",
        "train",
        readme.to_str().unwrap(),
        "--vocab-size",
        "10",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("too small"), "{}", text(&o.stderr));
}

#[test]
fn the_shipped_tiny_model_runs_offline() {
    let home = std::env::temp_dir().join(format!("lw-hf-home-tiny-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .args([
            "generate",
            "--model",
            "tiny",
            "--chat",
            "--max-tokens",
            "16",
            "--threads",
            "1",
            "Write about a river.",
        ])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", &home)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("longwriter-tiny"),
        "{}",
        text(&out.stderr)
    );
    assert!(!text(&out.stdout).trim().is_empty());
}
