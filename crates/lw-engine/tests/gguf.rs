//! GGUF files written by `convert` from the fixture checkpoints, loaded back:
//! the same logits as `transformers` (f32), close ones when quantized, the
//! same tokens and chat prompts from the GGUF tokenizer, and clear errors
//! for broken files.

use std::path::{Path, PathBuf};

use lw_core::{Message, Role};
use lw_engine::gguf::{convert, Target};
use lw_engine::{Engine, LoadOptions};
use lw_model::QType;

mod common;
use common::{fixture, fixtures, ids, max_abs_diff, worst_logit_diff, MODELS};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lw-gguf-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn to_gguf(dir: &Path, out: &Path, target: Target) -> PathBuf {
    convert(dir, out, target, |_, _, _| {}).unwrap();
    out.to_path_buf()
}

fn load(path: &Path) -> Engine {
    Engine::load(path, &LoadOptions::default()).unwrap()
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0
}

#[test]
fn f32_gguf_files_match_transformers_for_every_architecture() {
    let tmp = scratch("f32");
    // Gemma 2's fixture scales scores by a query_pre_attn_scalar llama.cpp
    // would not read (the next test but one).
    for &name in MODELS.iter().filter(|n| **n != "gemma2") {
        let fx = fixture(name);
        let path = to_gguf(
            &model_dir(name),
            &tmp.join(format!("{name}.gguf")),
            Target::Uniform(QType::F32),
        );
        let mut engine = load(&path);
        // The tokenizer rebuilt from the GGUF metadata gives the same ids.
        let prompt = engine.encode_raw(fx["prompt"].as_str().unwrap()).unwrap();
        assert_eq!(
            prompt,
            ids(&fx["prompt_ids"]),
            "{name}: prompt ids from the GGUF tokenizer"
        );
        let rows = engine.score(&prompt).unwrap();
        let worst = worst_logit_diff(&rows, &fx);
        assert!(worst < 1e-4, "{name}: GGUF logits differ by {worst}");
    }
}

/// `convert` refuses what llama.cpp would read as another model, naming
/// the field: Gemma 2's fixture scales scores by query_pre_attn_scalar 24
/// where llama.cpp takes 1/√head_dim for every Gemma 2 but the 27B.
#[test]
fn convert_refuses_configs_llama_cpp_would_misread() {
    let tmp = scratch("refused");
    let out = tmp.join("gemma2.gguf");
    let err = convert(
        &model_dir("gemma2"),
        &out,
        Target::Uniform(QType::F32),
        |_, _, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("query_pre_attn_scalar") && err.contains("config.json"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written");
    // Experts' weights not renormalised: llama.cpp always renormalises.
    let moe = tmp.join("qwen3-moe");
    std::fs::create_dir_all(&moe).unwrap();
    for f in std::fs::read_dir(model_dir("qwen3-moe")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, moe.join(f.file_name().unwrap())).unwrap();
    }
    let config = moe.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("\"norm_topk_prob\": true"), "{text}");
    std::fs::write(
        &config,
        text.replace("\"norm_topk_prob\": true", "\"norm_topk_prob\": false"),
    )
    .unwrap();
    let err = convert(
        &moe,
        &tmp.join("moe.gguf"),
        Target::Uniform(QType::F32),
        |_, _, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("norm_topk_prob"), "{err}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// The fixture models as llama.cpp's own converter writes them
/// (`scripts/llama_cpp_convert.py`): the engine reads llama.cpp's layout,
/// names and metadata, not only its own converter's, and gives
/// transformers' logits and greedy tokens.
#[test]
fn files_from_llama_cpps_converter_match_transformers() {
    for name in [
        "llama3-untied",
        "qwen2",
        "qwen3",
        "qwen3-moe",
        "mixtral",
        "glm4-0414",
        "gemma3",
        "phi3",
        "phi3-longrope",
    ] {
        let fx = fixture(name);
        let path = fixtures().join(format!("models/{name}.llama-cpp.gguf"));
        let mut engine = load(&path);
        let prompt = engine.encode_raw(fx["prompt"].as_str().unwrap()).unwrap();
        assert_eq!(prompt, ids(&fx["prompt_ids"]), "{name}: prompt ids");
        let rows = engine.score(&prompt).unwrap();
        let worst = worst_logit_diff(&rows, &fx);
        assert!(worst < 1e-4, "{name}: logits differ by {worst}");
        let params = lw_core::GenerationParams {
            sampling: lw_core::SamplingParams::greedy(),
            max_tokens: Some(32),
            ignore_eos: true,
            ..Default::default()
        };
        let out = engine.generate(&prompt, &params, |_| true).unwrap();
        assert_eq!(
            out.tokens,
            ids(&fx["greedy_tokens"]),
            "{name}: greedy tokens"
        );
    }
}

/// Gemma 2 as llama.cpp's converter writes it: the same model as its
/// directory (windows, soft-caps, norms already holding 1 + w, GeGLU,
/// scaled embeddings), except the score scale, which llama.cpp takes as
/// 1/√head_dim (or hidden/heads for the 27B) instead of reading
/// query_pre_attn_scalar, which the fixture sets apart to cover it.
#[test]
fn gemma2_from_llama_cpps_converter_is_read_as_llama_cpp_reads_it() {
    let dir = lw_model::ModelConfig::from_file(&model_dir("gemma2").join("config.json")).unwrap();
    let file = lw_model::GgufFile::open(&fixtures().join("models/gemma2.llama-cpp.gguf")).unwrap();
    let gguf = lw_model::gguf_model::config(&file).unwrap();
    assert_eq!(gguf.model_type, "gemma2");
    assert_eq!(gguf.sliding_window, vec![Some(8), None]);
    assert_eq!(gguf.sliding_window, dir.sliding_window);
    assert_eq!(
        (gguf.attn_softcap, gguf.final_softcap),
        (Some(1.5), Some(2.5))
    );
    assert_eq!(
        (dir.attn_softcap, dir.final_softcap),
        (Some(1.5), Some(2.5))
    );
    assert!(gguf.embed_scale && gguf.post_norms && !gguf.qk_norm);
    assert_eq!((dir.norm_offset, gguf.norm_offset), (1.0, 0.0));
    assert_eq!(gguf.gate, dir.gate);
    assert_eq!(dir.attention_scale, Some(24f32.powf(-0.5)));
    assert_eq!(gguf.attention_scale, None);
    // Everything else the forward pass reads is the directory's.
    let same = lw_model::ModelConfig {
        attention_scale: None,
        norm_offset: 0.0,
        layout: gguf.layout,
        max_position_embeddings: gguf.max_position_embeddings,
        torch_dtype: None,
        // Stored as f32.
        rms_norm_eps: 1e-5f32 as f64,
        ..dir.clone()
    };
    let ids = |c: lw_model::ModelConfig| lw_model::ModelConfig {
        eos_token_ids: vec![],
        bos_token_id: None,
        ..c
    };
    assert_eq!(ids(gguf), ids(same));
}

#[test]
fn the_gguf_tokenizer_and_template_match_the_directory() {
    let tmp = scratch("tok");
    for name in ["qwen2", "llama3-untied"] {
        let dir = model_dir(name);
        let path = to_gguf(
            &dir,
            &tmp.join(format!("{name}.gguf")),
            Target::Uniform(QType::F16),
        );
        let from_dir = load(&dir);
        let from_gguf = load(&path);
        let text = "Rivers run 3,456 miles — naïve café, 東京 and emoji 🙂.\n\n  Done!";
        let a = from_dir.encode_raw(text).unwrap();
        let b = from_gguf.encode_raw(text).unwrap();
        assert_eq!(a, b, "{name}: token ids");
        assert_eq!(
            from_gguf.tokenizer().decode(&b).unwrap(),
            from_dir.tokenizer().decode(&a).unwrap()
        );
        let messages = vec![
            Message {
                role: Role::System,
                content: "Be brief.".into(),
            },
            Message {
                role: Role::User,
                content: "Write about rivers.".into(),
            },
        ];
        if from_dir.tokenizer().chat_template().is_some() {
            assert_eq!(
                from_gguf.encode_chat(&messages).unwrap(),
                from_dir.encode_chat(&messages).unwrap(),
                "{name}: chat prompt"
            );
        }
        assert_eq!(
            from_gguf.eos_ids(),
            from_dir.eos_ids(),
            "{name}: end-of-sequence ids"
        );
    }
}

#[test]
fn quantized_files_stay_close_to_the_full_precision_model() {
    let tmp = scratch("q");
    let dir = root().join("models/longwriter-tiny");
    let reference = load(&dir);
    let text = "The river ran past the old mill, and the children of the village \
                followed it down to the sea every summer, counting the boats.";
    let prompt = reference.encode_raw(text).unwrap();
    let mut reference = reference;
    let want = reference.score(&prompt).unwrap();
    for (target, max_rel, min_agree) in [
        (Target::Uniform(QType::Q8_0), 0.02, 0.95),
        (Target::Q4KM, 0.2, 0.8),
        (Target::Uniform(QType::Q6K), 0.05, 0.9),
    ] {
        let path = to_gguf(&dir, &tmp.join(format!("{}.gguf", target.name())), target);
        let mut engine = load(&path);
        let rows = engine.score(&prompt).unwrap();
        let scale = lw_core::compare::worst(want.iter().map(|w| lw_core::compare::max_abs(w)));
        let worst =
            lw_core::compare::worst(rows.iter().zip(&want).map(|(r, w)| max_abs_diff(r, w)));
        let agree = rows
            .iter()
            .zip(&want)
            .filter(|(r, w)| argmax(r) == argmax(w))
            .count() as f64
            / rows.len() as f64;
        eprintln!(
            "{}: max |Δlogit| {worst:.4} (scale {scale:.2}), top-1 agreement {agree:.3}",
            target.name()
        );
        assert!(
            worst / scale < max_rel,
            "{}: {worst} of {scale}",
            target.name()
        );
        assert!(
            worst > 0.0,
            "{}: quantization changed nothing",
            target.name()
        );
        assert!(
            agree >= min_agree,
            "{}: top-1 agreement {agree}",
            target.name()
        );
    }
    // Quantizing on load gives the same numbers as the quantized file.
    let mut on_load = Engine::load(
        &dir,
        &LoadOptions {
            quantize: Some(QType::Q8_0),
            ..Default::default()
        },
    )
    .unwrap();
    let mut file = load(&tmp.join("Q8_0.gguf"));
    let a = on_load.score(&prompt).unwrap();
    let b = file.score(&prompt).unwrap();
    let worst = lw_core::compare::worst(a.iter().zip(&b).map(|(x, y)| max_abs_diff(x, y)));
    assert!(worst < 1e-3, "--quantize q8_0 vs the Q8_0 file: {worst}");
}

/// The metadata and tensors of a converted fixture, to rewrite broken.
fn parts() -> (
    Vec<(String, lw_model::gguf::Value)>,
    Vec<lw_model::gguf::OutTensor>,
) {
    let tmp = scratch("parts");
    let path = to_gguf(
        &model_dir("qwen2"),
        &tmp.join("q.gguf"),
        Target::Uniform(QType::Q8_0),
    );
    let file = lw_model::GgufFile::open(&path).unwrap();
    let tensors = file
        .header()
        .tensors
        .iter()
        .map(|t| lw_model::gguf::OutTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            qtype: t.qtype,
            data: file.data(t).as_slice().to_vec(),
        })
        .collect();
    (file.header().metadata.clone(), tensors)
}

fn write_gguf(
    path: &Path,
    meta: &[(String, lw_model::gguf::Value)],
    tensors: &[lw_model::gguf::OutTensor],
) -> Vec<u8> {
    let mut bytes = Vec::new();
    lw_model::gguf::write(&mut bytes, meta, tensors).unwrap();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

fn load_error(path: &Path) -> String {
    match Engine::load(path, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_gguf_files_are_clear_errors() {
    use lw_model::gguf::Value;
    let tmp = scratch("bad");
    let (meta, tensors) = parts();
    let good = write_gguf(&tmp.join("good.gguf"), &meta, &tensors);
    assert!(Engine::load(&tmp.join("good.gguf"), &LoadOptions::default()).is_ok());

    // Cut in the middle of the tensor data.
    let cut = tmp.join("cut.gguf");
    std::fs::write(&cut, &good[..good.len() * 2 / 3]).unwrap();
    let e = load_error(&cut);
    assert!(
        e.contains("cut.gguf") && e.contains("run past the end"),
        "{e}"
    );

    // Cut inside the header.
    std::fs::write(&cut, &good[..200]).unwrap();
    let e = load_error(&cut);
    assert!(e.contains("truncated"), "{e}");

    // A tensor whose shape needs more bytes than it has.
    let mut t2 = parts().1;
    let last = t2.len() - 1;
    t2[last].shape[0] *= 4;
    let big = tmp.join("big.gguf");
    let mut bytes = Vec::new();
    lw_model::gguf::write(&mut bytes, &meta, &t2).unwrap();
    std::fs::write(&big, &bytes[..good.len()]).unwrap();
    let e = load_error(&big);
    assert!(e.contains(&format!("tensor \"{}\"", t2[last].name)), "{e}");

    // An unknown tensor type id, and a known one this engine does not run.
    for (id, want) in [
        (77u32, "unknown tensor type 77"),
        (39, "MXFP4, which is not supported"),
    ] {
        let mut bytes = good.clone();
        let name = b"blk.0.attn_q.weight";
        let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
        let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let ty = at + 4 + 8 * n_dims;
        bytes[ty..ty + 4].copy_from_slice(&id.to_le_bytes());
        let path = tmp.join("type.gguf");
        std::fs::write(&path, &bytes).unwrap();
        let e = load_error(&path);
        assert!(e.contains("blk.0.attn_q.weight") && e.contains(want), "{e}");
    }

    // Metadata of the wrong type, and an architecture this engine lacks
    // (the message lists exactly the architectures that run).
    let unknown = format!(
        "architecture \"rwkv6\" is not supported (supported: {})",
        lw_model::config::supported_architectures().join(", ")
    );
    for (value, want) in [
        (
            Value::U32(7),
            "\"general.architecture\" is u32, expected a string",
        ),
        (Value::String("rwkv6".into()), unknown.as_str()),
    ] {
        let mut m = meta.clone();
        m.iter_mut()
            .find(|(k, _)| k == "general.architecture")
            .unwrap()
            .1 = value;
        let path = tmp.join("meta.gguf");
        write_gguf(&path, &m, &tensors);
        let e = load_error(&path);
        assert!(e.contains("meta.gguf") && e.contains(want), "{e}");
    }

    // A vocabulary with more tokens than the embedding has rows.
    let mut m = meta.clone();
    let rows = tensors
        .iter()
        .find(|t| t.name == "token_embd.weight")
        .unwrap()
        .shape[0];
    for (key, value) in m.iter_mut() {
        if let Value::Array(items) = value {
            let extra = match key.as_str() {
                "tokenizer.ggml.tokens" => (0..rows + 8)
                    .map(|i| Value::String(format!("<extra_{i}>")))
                    .collect(),
                "tokenizer.ggml.token_type" => vec![Value::I32(1); rows + 8],
                "tokenizer.ggml.scores" => vec![Value::F32(0.0); rows + 8],
                _ => continue,
            };
            items.extend(extra);
        }
    }
    let path = tmp.join("vocab.gguf");
    write_gguf(&path, &m, &tensors);
    let e = load_error(&path);
    assert!(
        e.contains("vocab.gguf") && e.contains("do not belong together"),
        "{e}"
    );

    // A required key missing.
    let m: Vec<_> = meta
        .iter()
        .filter(|(k, _)| k != "qwen2.block_count")
        .cloned()
        .collect();
    let path = tmp.join("nokey.gguf");
    write_gguf(&path, &m, &tensors);
    let e = load_error(&path);
    assert!(e.contains("\"qwen2.block_count\" is missing"), "{e}");
}
