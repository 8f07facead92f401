//! Broken model directories and impossible prompts give typed errors that
//! name the file, tensor or limit, never a panic.

use std::path::{Path, PathBuf};

use lw_core::GenerationParams;
use lw_engine::{Engine, EngineError, LoadOptions};
use lw_model::ModelError;

fn fixture_model(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// A private copy of a fixture model to break.
fn copy_model(name: &str, tag: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("lw-bad-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(fixture_model(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn load(dir: &Path) -> Result<Engine, EngineError> {
    Engine::load(dir, &LoadOptions::default())
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn missing_config_names_the_file() {
    let dir = copy_model("qwen2", "noconfig");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let err = load(&dir).err().unwrap();
    assert!(
        matches!(err, EngineError::Model(ModelError::Io { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = copy_model("qwen2", "truncated");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load(&dir).err().unwrap();
    assert!(
        matches!(err, EngineError::Model(ModelError::Safetensors { .. })),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("not a valid safetensors file"),
        "{msg}"
    );
}

#[test]
fn wrong_tensor_shape_names_the_tensor_and_both_shapes() {
    let dir = copy_model("qwen2", "shape");
    // The config claims a wider MLP than the weights have.
    edit_json(&dir.join("config.json"), |v| {
        v["intermediate_size"] = 120.into()
    });
    let err = load(&dir).err().unwrap();
    let msg = err.to_string();
    assert!(
        matches!(err, EngineError::Model(ModelError::Shape { .. })),
        "{err:?}"
    );
    assert!(
        msg.contains("model.layers.0.mlp.gate_proj.weight")
            && msg.contains("[112, 64]")
            && msg.contains("[120, 64]"),
        "{msg}"
    );
}

#[test]
fn unknown_model_type_names_it_and_the_supported_ones() {
    let dir = copy_model("qwen2", "arch");
    edit_json(&dir.join("config.json"), |v| {
        v["model_type"] = "mamba".into()
    });
    let msg = load(&dir).err().unwrap().to_string();
    let supported = lw_model::config::supported_model_types().join(", ");
    assert!(
        msg.contains("config.json")
            && msg.contains("mamba")
            && msg.contains(&format!("(supported: {supported})"))
            && supported.contains("gemma3_text"),
        "{msg}"
    );
}

#[test]
fn tokenizer_larger_than_the_embedding_is_refused() {
    let dir = copy_model("qwen2", "vocab");
    edit_json(&dir.join("config.json"), |v| v["vocab_size"] = 600.into());
    let err = load(&dir).err().unwrap();
    assert!(
        matches!(
            err,
            EngineError::VocabMismatch {
                tokenizer: 640,
                model: 600,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn empty_prompt_and_overlong_prompt_are_refused_with_the_limit() {
    let mut engine = load(&fixture_model("qwen2")).unwrap();
    let params = GenerationParams::default();
    let err = engine.generate(&[], &params, |_| true).err().unwrap();
    assert!(matches!(err, EngineError::EmptyPrompt));
    let long = vec![5u32; 300];
    let err = engine.generate(&long, &params, |_| true).err().unwrap();
    assert!(
        matches!(
            err,
            EngineError::PromptTooLong {
                tokens: 300,
                limit: 256
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("256"));
    // The engine is still usable afterwards.
    let ok = engine
        .generate(
            &[5, 6, 7],
            &GenerationParams {
                max_tokens: Some(3),
                ..params
            },
            |_| true,
        )
        .unwrap();
    assert!(ok.tokens.len() <= 3);
}

#[test]
fn generation_stops_cleanly_at_the_end_of_the_context() {
    let mut engine = load(&fixture_model("qwen2")).unwrap();
    let prompt = vec![5u32; 250];
    let params = GenerationParams {
        sampling: lw_core::SamplingParams::greedy(),
        max_tokens: None,
        ignore_eos: true,
        ..Default::default()
    };
    let out = engine.generate(&prompt, &params, |_| true).unwrap();
    assert_eq!(out.finish_reason, lw_core::FinishReason::ContextFull);
    assert_eq!(out.tokens.len(), 256 - 250 + 1);
}

#[test]
fn padded_embedding_never_yields_ids_the_tokenizer_lacks() {
    // Pad the embedding and classifier rows beyond the tokenizer with huge
    // logits: a sampler that looked at them would pick them every time.
    let dir = copy_model("qwen2", "padded");
    let st_path = dir.join("model.safetensors");
    let bytes = std::fs::read(&st_path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let mut shape = view.shape().to_vec();
        let mut data = view.data().to_vec();
        if name == "model.embed_tokens.weight" {
            shape[0] += 64;
            data.extend(std::iter::repeat_n(1.0f32, 64 * shape[1]).flat_map(f32::to_le_bytes));
        }
        tensors.push((name, shape, data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &st_path).unwrap();
    edit_json(&dir.join("config.json"), |v| v["vocab_size"] = 704.into());
    let mut engine = load(&dir).unwrap();
    let out = engine
        .generate(
            &[5, 6, 7, 8],
            &GenerationParams {
                sampling: lw_core::SamplingParams {
                    temperature: 1.0,
                    ..Default::default()
                },
                max_tokens: Some(40),
                ignore_eos: true,
                ..Default::default()
            },
            |_| true,
        )
        .unwrap();
    assert!(out.tokens.iter().all(|&t| t < 640), "{:?}", out.tokens);
}

/// Splits a copy of the qwen2 fixture into two shards with an index, as large
/// checkpoints are published.
fn shard_model(tag: &str) -> PathBuf {
    let dir = copy_model("qwen2", tag);
    let st_path = dir.join("model.safetensors");
    let bytes = std::fs::read(&st_path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let half = names.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [&names[..half], &names[half..]].into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for n in part {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    std::fs::remove_file(&st_path).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    dir
}

#[test]
fn sharded_checkpoints_load_and_compute_the_same_logits() {
    let dir = shard_model("sharded");
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_model("qwen2").join("../../qwen2.json")).unwrap(),
    )
    .unwrap();
    let prompt: Vec<u32> = fx["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let mut engine = load(&dir).unwrap();
    let rows = engine.score(&prompt).unwrap();
    let want: Vec<f32> = fx["logits"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let diff = lw_core::compare::max_abs_diff(rows.last().unwrap(), &want);
    assert!(diff < 1e-4, "{diff}");
}

#[test]
fn missing_shard_names_the_shard() {
    let dir = shard_model("missing-shard");
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let msg = load(&dir).err().unwrap().to_string();
    assert!(msg.contains("model-00002-of-00002.safetensors"), "{msg}");
}

/// Gemma's soft-caps must be positive: a cap of 0 (or below) is refused
/// by field name, not turned into a division by zero.
#[test]
fn a_soft_cap_of_zero_names_the_field() {
    for field in ["attn_logit_softcapping", "final_logit_softcapping"] {
        let dir = copy_model("gemma2", "softcap");
        edit_json(&dir.join("config.json"), |v| v[field] = 0.0.into());
        let msg = load(&dir).err().unwrap().to_string();
        assert!(
            msg.contains("config.json") && msg.contains(field) && msg.contains("positive"),
            "{msg}"
        );
    }
}

/// A checkpoint whose layer lacks a tensor its family needs (Gemma 3's
/// per-head query norm) is refused with the tensor's name.
#[test]
fn a_missing_query_norm_names_the_tensor() {
    let dir = copy_model("gemma3", "qnorm");
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    // Rename the tensor in the header, keeping its length.
    let name = b"model.layers.3.self_attn.q_norm.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("the fixture has the tensor");
    bytes[at..at + name.len()].copy_from_slice(b"model.layers.3.self_attn.q_nrm_.weight");
    std::fs::write(&path, bytes).unwrap();
    let msg = load(&dir).err().unwrap().to_string();
    assert!(
        msg.contains("model.layers.3.self_attn.q_norm.weight"),
        "{msg}"
    );
}

/// More experts active per token than a layer has is refused by field.
#[test]
fn more_active_experts_than_experts_names_the_field() {
    let dir = copy_model("qwen3-moe", "experts");
    edit_json(&dir.join("config.json"), |v| {
        v["num_experts_per_tok"] = 9.into()
    });
    let msg = load(&dir).err().unwrap().to_string();
    assert!(
        msg.contains("config.json") && msg.contains("num_experts_per_tok"),
        "{msg}"
    );
}
