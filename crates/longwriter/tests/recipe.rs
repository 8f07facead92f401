//! `scripts/longwriter_smol.sh`, the fine-tuning experiment's recipe, at toy
//! size on the tiny test model so the pipeline cannot rot: baseline
//! evaluation → instructions (with the overlap check) → AgentWrite data
//! mixed with short answers → LoRA fine-tuning → evaluation with the adapter
//! → a before/after report; a rerun skips every finished step.

mod common;

use std::process::Command;

use common::{root, scratch, text, tiny_model};

#[test]
fn the_recipe_runs_every_step_at_toy_size_and_resumes() {
    let d = scratch("recipe");
    let bench = d.join("bench.jsonl");
    std::fs::write(
        &bench,
        concat!(
            r#"{"prompt":"Write a 40-word note about rivers.","type":"note","length":40}"#,
            "\n",
            r#"{"prompt":"请写一篇60字的短文，介绍茶。","type":"essay","length":60}"#,
            "\n",
            r#"{"prompt":"Write a 500-word essay about salt.","type":"essay","length":500}"#,
            "\n"
        ),
    )
    .unwrap();
    let run = d.join("run");
    let recipe = |run: &std::path::Path| {
        Command::new("bash")
            .arg(root().join("scripts/longwriter_smol.sh"))
            .arg(run)
            .env("MODEL", tiny_model())
            .env("LONGWRITER", env!("CARGO_BIN_EXE_longwriter"))
            .env("BENCHES", &bench)
            .env("EVAL_MAX_TOKENS", "48")
            .env("EVAL_MAX_LENGTH", "100")
            .env("INSTRUCTIONS", "4")
            .env("SHORT", "4")
            .env("MAX_LENGTH", "60")
            .env("MIX_RATIO", "1")
            .env("SEQ_LEN", "256")
            .env("STEPS", "2")
            .env("THREADS", "1")
            .env("CONCURRENCY", "2")
            .output()
            .unwrap()
    };
    let out = recipe(&run);
    let err = text(&out.stderr);
    assert!(out.status.success(), "the recipe failed:\n{err}");
    for step in [
        "baseline",
        "instructions",
        "data",
        "finetune",
        "after",
        "report",
    ] {
        assert!(run.join(format!(".done-{step}")).exists(), "{step}: {err}");
    }
    // (b) 4 instructions, none an evaluation prompt.
    let overlap: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("overlap.json")).unwrap()).unwrap();
    assert_eq!(overlap["instructions"], 4);
    assert_eq!(overlap["identical"], 0);
    // (c) the training file holds built items and the model's short answers.
    let train = std::fs::read_to_string(run.join("train.jsonl")).unwrap();
    assert!(train.lines().count() >= 2, "{train}");
    assert!(run.join("build/data.sqlite").exists());
    // (d) an adapter; (e) both runs scored and side by side in the report.
    assert!(run.join("sft/final/adapter_model.safetensors").exists());
    // Both evaluations read the same items: those asking for at most
    // EVAL_MAX_LENGTH words.
    let kept = std::fs::read_to_string(run.join("bench/bench.jsonl")).unwrap();
    assert_eq!(kept.lines().count(), 2, "{kept}");
    assert!(!kept.contains("salt"), "{kept}");
    for label in ["baseline", "finetuned"] {
        let pred =
            std::fs::read_to_string(run.join(format!("eval/bench/{label}/pred.jsonl"))).unwrap();
        assert_eq!(pred.lines().count(), 2, "{label}: {pred}");
        let length = run.join(format!("eval/bench/{label}/length.json"));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&length).unwrap()).unwrap();
        assert!(v["overall"].is_number(), "{}: {v}", length.display());
    }
    assert!(
        err.contains("merged into the weights"),
        "the adapter is used: {err}"
    );
    let report = std::fs::read_to_string(run.join("report/bench/report.md")).unwrap();
    assert!(
        report.contains("| baseline |") && report.contains("| finetuned |"),
        "{report}"
    );
    assert!(run.join("report/bench/length.png").exists());

    // A rerun does nothing again.
    let again = recipe(&run);
    let err = text(&again.stderr);
    assert!(again.status.success(), "{err}");
    assert_eq!(err.matches("finished before, skipped").count(), 6, "{err}");
}
