//! `longwriter tokenizer train` → `data tokenize` → `train pretrain` (with
//! Ctrl-C and `--resume`) → `generate`; `data synth` → `train sft` (full and
//! LoRA) → `lora merge` → `generate`; and the errors of bad training input.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{longwriter, root, scratch, text, tiny_model};
use serde_json::json;

fn ok(args: &[&str]) -> String {
    let out = longwriter(args);
    assert!(
        out.status.success(),
        "longwriter {args:?} failed:\n{}",
        text(&out.stderr)
    );
    text(&out.stderr)
}

fn fails(args: &[&str]) -> String {
    let out = longwriter(args);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "longwriter {args:?} should fail");
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Sentences from a small grammar: enough structure to learn quickly.
fn corpus(dir: &Path) -> PathBuf {
    let subjects = [
        "The river",
        "A small boat",
        "The old miller",
        "Her sister",
        "The north wind",
    ];
    let verbs = ["carried", "followed", "remembered", "crossed", "warmed"];
    let objects = [
        "the valley.",
        "the stone bridge.",
        "a quiet song.",
        "the morning light.",
        "the long road home.",
    ];
    let mut s = String::new();
    let mut docs = Vec::new();
    for i in 0..1500 {
        s.push_str(&format!(
            "{} {} {}",
            subjects[i % 5],
            verbs[(i / 5) % 5],
            objects[(i / 25) % 5]
        ));
        s.push(if i % 4 == 3 { '\n' } else { ' ' });
        if i % 12 == 11 {
            docs.push(json!({ "text": std::mem::take(&mut s) }).to_string());
        }
    }
    // One document per line, so some go to validation.
    let f = dir.join("corpus.jsonl");
    std::fs::write(&f, docs.join("\n")).unwrap();
    f
}

fn tiny_config(dir: &Path, vocab: usize) -> PathBuf {
    let cfg = json!({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512,
        "tie_word_embeddings": true, "eos_token_id": 0,
    });
    let f = dir.join(format!("config-{vocab}.json"));
    std::fs::write(&f, cfg.to_string()).unwrap();
    f
}

fn loss_lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("loss.jsonl"))
        .unwrap_or_default()
        .lines()
        // A process killed mid-write may leave a partial last line.
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The grammar corpus, a 300-entry tokenizer trained on it and its
/// shards (a fifth for validation).
fn pretrain_data(d: &Path) -> PathBuf {
    let corpus = corpus(d);
    let tok = d.join("tok");
    ok(&[
        "tokenizer",
        "train",
        p(&corpus),
        "--out",
        p(&tok),
        "--vocab-size",
        "300",
    ]);
    let shards = d.join("shards");
    ok(&[
        "data",
        "tokenize",
        p(&corpus),
        "--tokenizer",
        p(&tok),
        "--out",
        p(&shards),
        "--val-fraction",
        "0.2",
    ]);
    shards
}

/// `train pretrain` of the tiny config on `shards` into `out`: 300 steps of
/// 4 rows of 32, a checkpoint every 100, then `extra`.
fn pretrain_args(shards: &Path, cfg: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    [
        "train",
        "pretrain",
        "--data",
        p(shards),
        "--config",
        p(cfg),
        "--out",
        p(out),
        "--seq-len",
        "32",
        "--batch",
        "4",
        "--steps",
        "300",
        "--lr",
        "1e-2",
        "--warmup",
        "10",
        "--save-every",
        "100",
        "--threads",
        "1",
        "--quiet",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn pretrain_survives_ctrl_c_and_sigkill_resumes_exactly_and_the_model_generates() {
    let d = scratch("pretrain");
    let shards = pretrain_data(&d);
    // The tokenizer has 300 entries: a 64-row embedding is refused.
    let small = tiny_config(&d, 64);
    let e = fails(&[
        "train",
        "pretrain",
        "--data",
        p(&shards),
        "--config",
        p(&small),
        "--out",
        p(&d.join("x")),
        "--steps",
        "2",
    ]);
    assert!(
        e.contains("vocab_size") && e.contains("tokenizer.json"),
        "{e}"
    );

    let cfg = tiny_config(&d, 320);
    let common = |out: &Path| pretrain_args(&shards, &cfg, out, &["--eval-every", "50"]);
    let a = d.join("a");
    let args: Vec<String> = common(&a);
    let err = ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("validation loss"), "{err}");
    assert!(a.join("final/model.safetensors").exists() && a.join("final/tokenizer.json").exists());
    assert!(a.join("loss.png").exists() && a.join("loss.svg").exists());
    // keep-last 2: the step-300 and step-200 checkpoints.
    let mut kept: Vec<String> = std::fs::read_dir(&a)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    kept.sort();
    assert_eq!(kept, vec!["checkpoint-0000200", "checkpoint-0000300"]);
    let la = loss_lines(&a);
    let first = la[0]["loss"].as_f64().unwrap();
    let val = la.last().unwrap()["val_loss"].as_f64().unwrap();
    assert!(
        val < first / 3.0,
        "validation loss {val} vs first training loss {first}"
    );

    // Ctrl-C part-way, then --resume: the same losses as the uninterrupted run.
    let b = d.join("b");
    let child = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .args(common(&b))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while loss_lines(&b).len() < 120 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "training made no progress"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("interrupted at step"), "{err}");
    let stopped = loss_lines(&b).len();
    assert!(stopped < 300, "stopped at {stopped}");
    assert!(b
        .join(format!("checkpoint-{stopped:07}/optimizer.safetensors"))
        .exists());
    assert!(!b.join("final").exists());
    let mut resumed = common(&b);
    resumed.push("--resume".into());
    let err = ok(&resumed.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains(&format!("resumed at step {stopped}")), "{err}");
    let lb = loss_lines(&b);
    assert_eq!(lb.len(), 300);
    for (x, y) in la.iter().zip(&lb) {
        for k in ["step", "loss", "grad_norm", "tokens", "val_loss"] {
            assert_eq!(x.get(k), y.get(k), "{k} differs at step {}", x["step"]);
        }
    }
    // SIGKILL mid-step (no chance to save): --resume starts from the last
    // checkpoint, drops the log lines written after it, and ends with the
    // uninterrupted run's losses.
    let c = d.join("c");
    let mut child = Command::new(env!("CARGO_BIN_EXE_longwriter"))
        .args(common(&c))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while loss_lines(&c).len() < 150 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "training made no progress"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let logged = loss_lines(&c).len();
    assert!(
        logged < 300 && !c.join("final").exists(),
        "the kill landed after the run ended ({logged} steps)"
    );
    // The last whole checkpoint (100, or 200 if the kill came late).
    let last = [200, 100]
        .into_iter()
        .find(|s| {
            c.join(format!("checkpoint-{s:07}/optimizer.safetensors"))
                .exists()
        })
        .expect("a checkpoint before the kill");
    assert!(logged >= last, "{logged} steps logged, checkpoint {last}");
    let mut resumed = common(&c);
    resumed.push("--resume".into());
    let err = ok(&resumed.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains(&format!("resumed at step {last}")), "{err}");
    let lc = loss_lines(&c);
    assert_eq!(lc.len(), 300);
    for (x, y) in la.iter().zip(&lc) {
        for k in ["step", "loss", "grad_norm", "tokens", "val_loss"] {
            assert_eq!(x.get(k), y.get(k), "{k} differs at step {}", x["step"]);
        }
    }
    // The engine loads and runs the trained model.
    let out = longwriter(&[
        "generate",
        "--model",
        p(&b.join("final")),
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--threads",
        "1",
        "The river",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).trim().is_empty());
}

/// `train sft` on `data` into `out` with one thread and no progress bar,
/// rows of `seq_len`, then `extra`.
fn sft_args<'a>(
    model: &'a Path,
    data: &'a Path,
    out: &'a Path,
    seq_len: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "sft",
        "--model",
        p(model),
        "--data",
        p(data),
        "--out",
        p(out),
        "--seq-len",
        seq_len,
        "--threads",
        "1",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    args
}

fn chat_line(user: &str, answer: &str) -> String {
    json!({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}).to_string()
}

#[test]
fn sft_full_and_lora_then_merge_gives_a_model_the_engine_runs() {
    let d = scratch("sft");
    let data = d.join("chat.jsonl");
    let lines: Vec<String> = (0..12)
        .map(|i| chat_line(&format!("Say {i}."), &format!("Here is {i}, as asked.")))
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let model = tiny_model();
    let sft = |out: &Path, extra: &[&str]| {
        let mut args = vec!["--batch", "2", "--steps", "3"];
        args.extend_from_slice(extra);
        ok(&sft_args(&model, &data, out, "96", &args))
    };
    let full = d.join("full");
    let err = sft(&full, &[]);
    assert!(err.contains("12 conversations"), "{err}");
    assert!(
        full.join("final/model.safetensors").exists()
            && full.join("final/tokenizer_config.json").exists()
    );
    let lora = d.join("lora");
    let err = sft(
        &lora,
        &[
            "--lr",
            "1e-2",
            "--lora-rank",
            "4",
            "--lora-targets",
            "q_proj,v_proj",
        ],
    );
    assert!(err.contains("LoRA rank 4"), "{err}");
    let adapter = lora.join("final");
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    let merged = d.join("merged");
    let err = ok(&[
        "lora",
        "merge",
        "--base",
        p(&model),
        "--adapter",
        p(&adapter),
        "--out",
        p(&merged),
    ]);
    assert!(err.contains("merged 4 adapted matrices"), "{err}");
    for m in [&full.join("final"), &merged] {
        let out = longwriter(&[
            "generate",
            "--model",
            p(m),
            "--chat",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "--threads",
            "1",
            "Say 3.",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    // The adapter merged as the model loads (`--lora`) gives the merged
    // directory's logits.
    let score = |args: &[&str], out: &std::path::Path| -> Vec<f32> {
        let mut all = vec!["score", "--threads", "1", "--ids", "1,5,9,14,3,7,2,11"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--out", p(out)]);
        let run = longwriter(&all);
        assert!(run.status.success(), "{}", text(&run.stderr));
        std::fs::read(out)
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let with_lora = score(
        &["--model", p(&model), "--lora", p(&adapter)],
        &d.join("lora.bin"),
    );
    let from_merged = score(&["--model", p(&merged)], &d.join("merged.bin"));
    let base = score(&["--model", p(&model)], &d.join("base.bin"));
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert_eq!(with_lora.len(), from_merged.len());
    assert!(
        diff(&with_lora, &from_merged) < 1e-4,
        "{}",
        diff(&with_lora, &from_merged)
    );
    assert!(
        diff(&with_lora, &base) > 1e-3,
        "the adapter changed nothing"
    );
}

#[test]
fn bad_sft_input_is_reported_and_skippable() {
    let d = scratch("sft-bad");
    let data = d.join("chat.jsonl");
    let long = "word ".repeat(400);
    let lines = [
        chat_line("Hi.", "Hello."),
        "{broken".to_string(),
        json!({"messages": [{"role": "user", "content": "no answer"}]}).to_string(),
        chat_line("Tell me everything.", &long),
        chat_line("Bye.", "Goodbye."),
    ];
    std::fs::write(&data, lines.join("\n")).unwrap();
    let model = tiny_model();
    let out = d.join("out");
    let base = sft_args(&model, &data, &out, "64", &["--batch", "1", "--steps", "1"]);
    let e = fails(&base);
    assert!(
        e.contains("chat.jsonl, line 2") && e.contains("not JSON"),
        "{e}"
    );
    let mut skip = base.clone();
    skip.push("--skip-bad-lines");
    let err = ok(&skip);
    assert!(err.contains("line 2: skipped"), "{err}");
    assert!(
        err.contains("line 3: skipped: the conversation has no assistant turn"),
        "{err}"
    );
    assert!(
        err.contains("2 conversations (2 skipped as malformed, 1 longer than 64 tokens)"),
        "{err}"
    );
    let missing = d.join("missing.jsonl");
    let e = fails(&sft_args(&model, &missing, &out, "64", &[]));
    assert!(e.contains("missing.jsonl"), "{e}");
    let e = fails(&sft_args(
        &model,
        &data,
        &out,
        "64",
        &[
            "--skip-bad-lines",
            "--lora-rank",
            "2",
            "--lora-targets",
            "qq_proj",
        ],
    ));
    assert!(e.contains("qq_proj"), "{e}");
    let e = fails(&[
        "lora",
        "merge",
        "--base",
        p(&model),
        "--adapter",
        p(&d),
        "--out",
        p(&d.join("m")),
    ]);
    assert!(e.contains("adapter_config.json"), "{e}");
}

#[test]
fn synthetic_agentwrite_data_trains() {
    let d = scratch("synth");
    let paras: Vec<String> = (0..20)
        .map(|i| {
            format!(
                "Chapter part {i} begins by the water. {}",
                "The boat moved slowly past the reeds and the mill. ".repeat(3)
            )
        })
        .collect();
    let src = d.join("book.txt");
    std::fs::write(&src, paras.join("\n\n")).unwrap();
    let out = d.join("synth.jsonl");
    let synth = |paragraphs: &'static str| {
        longwriter(&[
            "data",
            "synth",
            p(&src),
            "--out",
            p(&out),
            "--paragraphs",
            paragraphs,
        ])
    };
    let run = synth("3-4");
    let err = text(&run.stderr);
    assert!(run.status.success(), "{err}");
    assert!(err.contains("conversations"), "{err}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let plans = lines.iter().filter(|l| l["kind"] == "plan").count();
    assert!(plans >= 4, "{plans} documents");
    assert!(lines[0]["messages"][1]["content"]
        .as_str()
        .unwrap()
        .contains("Word Count:"));
    let run = synth("5-2");
    let e = text(&run.stderr);
    assert!(!run.status.success() && e.contains("--paragraphs"), "{e}");
    let train = d.join("train");
    let model = tiny_model();
    ok(&sft_args(
        &model,
        &out,
        &train,
        "2048",
        &["--batch", "1", "--steps", "1"],
    ));
    assert!(train.join("final/model.safetensors").exists());
    let _ = root();
}

/// The disk fills while a checkpoint is saved: a clear error naming the
/// file, the previous checkpoint intact, and `--resume` after space is
/// freed ends with the losses of a run that never ran out.
#[test]
fn a_full_disk_while_checkpointing_is_a_clear_error_and_resume_continues() {
    let d = scratch("train-full");
    let Some(disk) = common::Tmpfs::mount("train-full", 700) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root and must mount a tmpfs"
        );
        eprintln!("SKIPPED: cannot mount a tmpfs here");
        return;
    };
    let shards = pretrain_data(&d);
    let cfg = tiny_config(&d, 320);
    let args = |out: &Path| pretrain_args(&shards, &cfg, out, &[]);
    let reference = d.join("reference");
    ok(&args(&reference)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let out = disk.path.join("run");
    let err = fails(&args(&out).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        err.contains("No space left on device")
            && err.contains(p(&out))
            && err.contains("checkpoint-0000200"),
        "{err}"
    );
    let logged = loss_lines(&out);
    assert!(logged.len() >= 100, "{} steps logged", logged.len());
    assert!(out
        .join("checkpoint-0000100/optimizer.safetensors")
        .exists());
    disk.resize(8192);
    let mut resumed = args(&out);
    resumed.push("--resume".into());
    let err = ok(&resumed.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("resumed at step"), "{err}");
    let (want, got) = (loss_lines(&reference), loss_lines(&out));
    assert_eq!(got.len(), 300);
    for (x, y) in want.iter().zip(&got) {
        for k in ["step", "loss", "grad_norm", "tokens"] {
            assert_eq!(x.get(k), y.get(k), "{k} differs at step {}", x["step"]);
        }
    }
    assert!(out.join("final/model.safetensors").exists());
}

#[test]
fn sft_on_a_gguf_file_trains_an_adapter_that_runs_on_it() {
    let d = scratch("sft-gguf");
    let data = d.join("chat.jsonl");
    let lines: Vec<String> = (0..6)
        .map(|i| chat_line(&format!("Say {i}."), &format!("Here is {i}, as asked.")))
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let gguf = root().join("tests/fixtures/models/llama3-untied.llama-cpp.gguf");
    let out = d.join("lora");
    let err = ok(&sft_args(
        &gguf,
        &data,
        &out,
        "64",
        &["--batch", "2", "--steps", "2", "--lora-rank", "4"],
    ));
    assert!(err.contains("6 conversations"), "{err}");
    assert!(
        err.contains("--lora"),
        "the summary says how to run it: {err}"
    );
    let adapter = out.join("final");
    assert!(adapter.join("adapter_model.safetensors").exists());
    ok(&[
        "generate",
        "-m",
        p(&gguf),
        "--lora",
        p(&adapter),
        "--max-tokens",
        "4",
        "--threads",
        "1",
        "Say 3.",
    ]);
    // Full fine-tuning of a GGUF file is refused before any work.
    let err = fails(&sft_args(
        &gguf,
        &data,
        &d.join("full"),
        "64",
        &["--steps", "1"],
    ));
    assert!(err.contains("a GGUF file trains with LoRA only"), "{err}");
    assert!(!d.join("full").exists());
}
