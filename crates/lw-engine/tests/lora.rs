//! `--lora`: PEFT adapters made by `peft` itself (`scripts/make_lora_fixtures.py`)
//! merged into the fixture models as they load give the logits `peft`
//! computes in `transformers`, from a model directory and from llama.cpp's
//! GGUF file of the same model (whose Llama q rows are in another order);
//! in a quantized file the change lands within the quantization's noise;
//! adapters that do not fit the model are clear errors.

use std::path::PathBuf;

use lw_engine::gguf::{convert, Target};
use lw_engine::{Engine, LoadOptions};
use lw_model::QType;

mod common;
use common::{fixture, fixtures, ids, worst_logit_diff};

fn adapter(name: &str) -> PathBuf {
    fixtures().join("lora").join(name)
}

fn load(model: &std::path::Path, lora: Option<PathBuf>) -> Result<Engine, String> {
    Engine::load(
        model,
        &LoadOptions {
            lora,
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())
}

#[test]
fn peft_adapters_give_peft_logits_from_directories_and_gguf_files() {
    for name in ["qwen2-peft", "llama3-rslora"] {
        let fx = fixture(&format!("lora/{name}"));
        let base = fx["base"].as_str().unwrap();
        let prompt = ids(&fx["prompt_ids"]);
        for model in [
            fixtures().join("models").join(base),
            fixtures().join(format!("models/{base}.llama-cpp.gguf")),
        ] {
            let mut engine = load(&model, Some(adapter(name))).unwrap();
            let rows = engine.score(&prompt).unwrap();
            let worst = worst_logit_diff(&rows, &fx);
            assert!(
                worst < 1e-4,
                "{name} on {}: logits differ by {worst}",
                model.display()
            );
            // The adapter is what moved them: the base model alone is far off.
            let mut plain = load(&model, None).unwrap();
            let off = worst_logit_diff(&plain.score(&prompt).unwrap(), &fx);
            assert!(
                off > 0.05,
                "{name}: the adapter changes the logits by only {off}"
            );
        }
    }
}

#[test]
fn an_adapter_on_a_quantized_file_is_merged_and_quantized_again() {
    let fx = fixture("lora/qwen2-peft");
    let prompt = ids(&fx["prompt_ids"]);
    let dir = std::env::temp_dir().join(format!("lw-lora-q8-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("qwen2-q8_0.gguf");
    convert(
        &fixtures().join("models/qwen2"),
        &file,
        Target::Uniform(QType::Q8_0),
        |_, _, _| {},
    )
    .unwrap();
    let mut adapted = load(&file, Some(adapter("qwen2-peft"))).unwrap();
    assert!(
        adapted.model().weight_format().contains("Q8_0"),
        "{}",
        adapted.model().weight_format()
    );
    let near = worst_logit_diff(&adapted.score(&prompt).unwrap(), &fx);
    let mut plain = load(&file, None).unwrap();
    let far = worst_logit_diff(&plain.score(&prompt).unwrap(), &fx);
    // Q8_0's own noise on this random model is a few tenths of a logit.
    // Measured: 0.31 from peft's logits with the adapter, 5.2 without.
    assert!(
        near < 0.5 && far > 5.0 * near,
        "with the adapter {near}, without {far}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn adapters_that_do_not_fit_are_clear_errors() {
    // An adapter for another model: its matrices have other shapes.
    let err = load(
        &fixtures().join("models/qwen3"),
        Some(adapter("qwen2-peft")),
    )
    .err()
    .unwrap();
    assert!(err.contains("adapter_model.safetensors"), "{err}");
    // No adapter there.
    let err = load(
        &fixtures().join("models/qwen2"),
        Some(fixtures().join("models/qwen2")),
    )
    .err()
    .unwrap();
    assert!(err.contains("adapter_config.json"), "{err}");
}
