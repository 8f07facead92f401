//! GGUF on the engine's side: the tokenizer and chat template a GGUF file
//! carries (llama.cpp's `tokenizer.ggml.*` keys, read by `vocab`), and
//! `convert`, which writes a Hugging Face checkpoint as a GGUF file that both
//! this engine and llama.cpp load.

use std::path::{Path, PathBuf};

use lw_model::gguf::{self, GgufFile, OutTensor, Value};
use lw_model::gguf_model::{config_metadata, halves_to_pairs};
use lw_model::quant::encode;
use lw_model::{DType, ModelConfig, QType, Weights};
use serde_json::Value as Json;

use crate::error::EngineError;
use crate::template::ChatTemplate;
use crate::tokenizer::Tokenizer;
use crate::vocab::Vocab;

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The tokenizer of a GGUF file, with its chat template.
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<Tokenizer, EngineError> {
    let mut tokenizer = Tokenizer::from_vocab(Vocab::from_gguf(file)?);
    let source = file
        .header()
        .string("tokenizer.chat_template")
        .map_err(|e| EngineError::from(file.err(e)))?;
    if let Some(src) = source {
        let bos = tokenizer.bos_token().unwrap_or("");
        let eos = tokenizer.eos_token().unwrap_or("");
        let template = ChatTemplate::new(src, bos, eos)
            .map_err(|e| EngineError::file(file.path(), format!("tokenizer.chat_template: {e}")))?;
        tokenizer.set_chat_template(Some(template));
    }
    Ok(tokenizer)
}

/// The tokenizer keys for a model directory's `tokenizer.json` and
/// `tokenizer_config.json`, with the token list padded to `vocab_size`.
fn tokenizer_metadata(dir: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>, EngineError> {
    let path = dir.join("tokenizer.json");
    let text =
        std::fs::read_to_string(&path).map_err(|e| EngineError::file(&path, e.to_string()))?;
    let tj: Json = serde_json::from_str(&text)
        .map_err(|e| EngineError::file(&path, format!("invalid JSON: {e}")))?;
    let bad = |reason: String| EngineError::file(&path, reason);
    let model = &tj["model"];
    if model["type"] != "BPE" {
        return Err(bad(format!(
            "only byte-level BPE tokenizers can be written to GGUF (this one is {})",
            model["type"]
        )));
    }
    let pre = pre_name(&tj["pre_tokenizer"]).ok_or_else(|| {
        bad(format!(
            "its pre-tokenizer has no llama.cpp name (byte-level with one split regex of a llama.cpp pre-tokenizer is supported): {}",
            tj["pre_tokenizer"]
        ))
    })?;
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let mut put = |id: u64, tok: &str, ty: i32| -> Result<(), EngineError> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            bad(format!(
                "token id {id} ({tok:?}) is beyond the model's vocabulary of {vocab_size}"
            ))
        })?;
        *slot = Some((tok.to_string(), ty));
        Ok(())
    };
    for (tok, id) in model["vocab"].as_object().into_iter().flatten() {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("vocab entry {tok:?} has no id")))?;
        put(id, tok, NORMAL)?;
    }
    for t in tj["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(tok)) = (t["id"].as_u64(), t["content"].as_str()) else {
            return Err(bad(format!("an added token without id or content: {t}")));
        };
        let ty = if t["special"].as_bool().unwrap_or(false) {
            CONTROL
        } else {
            USER_DEFINED
        };
        put(id, tok, ty)?;
    }
    let (names, types): (Vec<Value>, Vec<Value>) = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| match t {
            Some((tok, ty)) => (Value::String(tok), Value::I32(ty)),
            None => (Value::String(format!("[PAD{i}]")), Value::I32(UNUSED)),
        })
        .unzip();
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|mg| match mg {
            Json::String(s) => Ok(Value::String(s.clone())),
            Json::Array(p) if p.len() == 2 => Ok(Value::String(format!(
                "{} {}",
                p[0].as_str().unwrap_or_default(),
                p[1].as_str().unwrap_or_default()
            ))),
            other => Err(bad(format!("a merge that is not a pair: {other}"))),
        })
        .collect::<Result<_, _>>()?;
    let mut meta = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(names)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
    ];
    // Special tokens and the chat template from tokenizer_config.json.
    let cfg_path = dir.join("tokenizer_config.json");
    let cfg: Json = std::fs::read_to_string(&cfg_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Json::Null);
    let probe = Tokenizer::from_dir(dir)?;
    let id_of = |key: &str| -> Option<u32> {
        let tok = match &cfg[key] {
            Json::String(s) => Some(s.as_str()),
            Json::Object(o) => o.get("content").and_then(Json::as_str),
            _ => None,
        }?;
        probe.token_id(tok)
    };
    for (key, name) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(id) = id_of(key) {
            meta.push((name.to_string(), Value::U32(id)));
        }
    }
    let adds_bos = probe
        .encode("a", true)
        .map(|ids| ids.len() > 1 && Some(ids[0]) == id_of("bos_token"))
        .unwrap_or(false);
    meta.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(adds_bos)));
    if let Some(t) = probe.chat_template() {
        meta.push((
            "tokenizer.chat_template".into(),
            Value::String(t.source().to_string()),
        ));
    }
    Ok(meta)
}

/// llama.cpp's name for a `tokenizer.json` pre-tokenizer.
fn pre_name(pre: &Json) -> Option<&'static str> {
    let is_byte_level = |p: &Json, regex: bool| {
        p["type"] == "ByteLevel" && p["use_regex"].as_bool().unwrap_or(true) == regex
    };
    if is_byte_level(pre, true) {
        return Some("gpt-2");
    }
    let parts = pre["pretokenizers"].as_array()?;
    if pre["type"] != "Sequence" || parts.len() != 2 || !is_byte_level(&parts[1], false) {
        return None;
    }
    crate::pre_tokenizer::name_of_split(parts[0]["pattern"]["Regex"].as_str()?)
}

/// What `convert` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Every matrix in one type (norms stay f32).
    Uniform(QType),
    /// llama.cpp's Q4_K_M recipe: Q4_K, with Q6_K for the output matrix and
    /// for `attn_v` / `ffn_down` in the first and last eighth of the layers
    /// and every third layer between; a fused `attn_qkv` gets Q5_K.
    Q4KM,
    /// The same recipe with Q5_K in place of Q4_K (and Q6_K for `attn_qkv`).
    Q5KM,
}

impl Target {
    pub fn parse(s: &str) -> Option<Target> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "q4_k_m" | "q4km" => Some(Target::Q4KM),
            "q5_k_m" | "q5km" => Some(Target::Q5KM),
            other => QType::parse(other)
                .filter(|q| q.encodable())
                .map(Target::Uniform),
        }
    }

    pub fn name(self) -> String {
        match self {
            Target::Uniform(q) => q.name().to_string(),
            Target::Q4KM => "Q4_K_M".into(),
            Target::Q5KM => "Q5_K_M".into(),
        }
    }

    /// The type of matrix `name` (GGUF name) of layer `layer` of `layers`.
    fn qtype(self, name: &str, layer: Option<usize>, layers: usize) -> QType {
        let base = match self {
            Target::Uniform(q) => return q,
            Target::Q4KM => QType::Q4K,
            Target::Q5KM => QType::Q5K,
        };
        let more_bits =
            |i: usize| i < layers / 8 || i >= 7 * layers / 8 || (i - layers / 8) % 3 == 2;
        if name == "output.weight" {
            return QType::Q6K;
        }
        if name.contains("attn_qkv") {
            return if self == Target::Q4KM {
                QType::Q5K
            } else {
                QType::Q6K
            };
        }
        match layer {
            Some(i) if (name.contains("attn_v") || name.contains("ffn_down")) && more_bits(i) => {
                QType::Q6K
            }
            _ => base,
        }
    }
}

/// A tensor to convert: the HF tensors stacked into it (name, shape), its
/// layer, and the number of rotary heads whose rows to permute for
/// llama.cpp's Llama layout.
struct Planned {
    parts: Vec<(String, Vec<usize>)>,
    layer: Option<usize>,
    heads: Option<usize>,
    /// Experts' matrices: the parts stacked along a new first axis (one
    /// per expert) into the tensor of this GGUF name.
    experts: Option<String>,
}

/// Why llama.cpp would read a file of this config as another model, if it
/// would: `convert` writes only files that both engines read alike.
fn unwritable(cfg: &ModelConfig) -> Option<String> {
    if let Some(moe) = &cfg.moe {
        if !moe.normalize {
            return Some(format!(
                "norm_topk_prob is false, but llama.cpp renormalises the chosen experts' \
                 weights in {} files",
                cfg.model_type
            ));
        }
        if moe.layers.iter().any(|&experts| !experts) {
            return Some(
                "mlp_only_layers / decoder_sparse_step leave layers without experts; \
                 llama.cpp's files of this family have experts in every layer"
                    .into(),
            );
        }
    }
    let gemma2 = cfg.model_type == "gemma2";
    if gemma2 || cfg.model_type == "gemma3_text" {
        // llama.cpp scales scores by 1/√head_dim, or √(heads/hidden) in the
        // 27B models (told by their layer counts); it reads no scale.
        let big = cfg.num_layers == if gemma2 { 46 } else { 62 };
        let llama = if big {
            (cfg.hidden_size as f32 / cfg.num_heads as f32).powf(-0.5)
        } else {
            (cfg.head_dim as f32).powf(-0.5)
        };
        let ours = cfg
            .attention_scale
            .unwrap_or((cfg.head_dim as f32).powf(-0.5));
        if (ours - llama).abs() > 1e-6 * llama {
            return Some(format!(
                "query_pre_attn_scalar scales scores by {ours}, but llama.cpp scales those of \
                 {} files by {llama} (1/√head_dim, or √(heads/hidden) in the 27B models) \
                 and reads no scale from the file",
                cfg.model_type
            ));
        }
        if gemma2 && (cfg.attn_softcap.is_none() || cfg.final_softcap.is_none()) {
            return Some(
                "attn_logit_softcapping / final_logit_softcapping is null, but llama.cpp \
                 always soft-caps gemma2 files (50 and 30 unless the file says)"
                    .into(),
            );
        }
    }
    None
}

/// What `convert` wrote.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub tensors: usize,
    /// Tensors whose rows were not whole blocks of the asked type, with the
    /// type they got instead.
    pub fallbacks: Vec<(String, QType)>,
}

/// Writes the checkpoint in `dir` as a GGUF file at `out` (atomically:
/// a temporary file beside it, then a rename). `progress` gets each tensor's
/// name as it is encoded.
pub fn convert(
    dir: &Path,
    out: &Path,
    target: Target,
    mut progress: impl FnMut(usize, usize, &str),
) -> Result<ConvertReport, EngineError> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    if let Some(reason) = unwritable(&cfg) {
        return Err(EngineError::File {
            path: dir.join("config.json"),
            reason,
        });
    }
    let weights = Weights::for_config(dir, &cfg)?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let mut meta = config_metadata(&cfg, &name);
    meta.push(("general.file_type".into(), Value::U32(file_type(target))));
    meta.extend(tokenizer_metadata(dir, cfg.vocab_size)?);
    if !cfg.eos_token_ids.is_empty()
        && !meta.iter().any(|(k, _)| k == "tokenizer.ggml.eos_token_id")
    {
        meta.push((
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(cfg.eos_token_ids[0]),
        ));
    }
    let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (nq, nkv) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let one = |n: String, shape: Vec<usize>, layer: Option<usize>, heads: Option<usize>| Planned {
        parts: vec![(n, shape)],
        layer,
        heads,
        experts: None,
    };
    let mut plan = vec![one(
        "model.embed_tokens.weight".into(),
        vec![cfg.vocab_size, h],
        None,
        None,
    )];
    // llama.cpp's Llama graph (Llama, Mistral, Mixtral) wants q/k rows in
    // adjacent-pairs order; the other families keep the halves, GLM-4 is
    // interleaved already.
    let permute = lw_model::gguf_model::gguf_architecture(&cfg) == "llama" && !cfg.rope_interleaved;
    let glm = cfg.model_type == "glm";
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let mut add = |n: String, shape: Vec<usize>, heads: Option<usize>| {
            plan.push(one(n, shape, Some(l), heads.filter(|_| permute)))
        };
        add(format!("{p}.input_layernorm.weight"), vec![h], None);
        if glm || weights.contains(&format!("{p}.self_attn.qkv_proj.weight")) {
            // llama.cpp's chatglm graph reads one fused attn_qkv, and a
            // checkpoint that stores q, k and v fused (Phi-3) keeps it so.
            for kind in ["weight", "bias"] {
                if kind == "bias" && !cfg.qkv_bias {
                    continue;
                }
                let fused = format!("{p}.self_attn.qkv_proj.{kind}");
                let dims = |out: usize| {
                    if kind == "weight" {
                        vec![out, h]
                    } else {
                        vec![out]
                    }
                };
                let parts = if weights.contains(&fused) {
                    vec![(fused, dims(nq + 2 * nkv))]
                } else {
                    [("q_proj", nq), ("k_proj", nkv), ("v_proj", nkv)]
                        .iter()
                        .map(|(m, out)| (format!("{p}.self_attn.{m}.{kind}"), dims(*out)))
                        .collect()
                };
                plan.push(Planned {
                    parts,
                    layer: Some(l),
                    heads: None,
                    experts: None,
                });
            }
        } else {
            let mut add = |n: String, shape: Vec<usize>, heads: Option<usize>| {
                plan.push(one(n, shape, Some(l), heads.filter(|_| permute)))
            };
            for (m, out, heads) in [
                ("q_proj", nq, Some(cfg.num_heads)),
                ("k_proj", nkv, Some(cfg.num_kv_heads)),
                ("v_proj", nkv, None),
            ] {
                add(format!("{p}.self_attn.{m}.weight"), vec![out, h], heads);
                if cfg.qkv_bias {
                    add(format!("{p}.self_attn.{m}.bias"), vec![out], heads);
                }
            }
        }
        let mut add = |n: String, shape: Vec<usize>| plan.push(one(n, shape, Some(l), None));
        add(format!("{p}.self_attn.o_proj.weight"), vec![h, nq]);
        if cfg.o_bias {
            add(format!("{p}.self_attn.o_proj.bias"), vec![h]);
        }
        if cfg.qk_norm {
            add(format!("{p}.self_attn.q_norm.weight"), vec![hd]);
            add(format!("{p}.self_attn.k_norm.weight"), vec![hd]);
        }
        if cfg.post_norms {
            add(format!("{p}.post_self_attn_layernorm.weight"), vec![h]);
            add(format!("{p}.post_mlp_layernorm.weight"), vec![h]);
        }
        add(format!("{p}.post_attention_layernorm.weight"), vec![h]);
        if let Some(moe) = cfg.moe.as_ref().filter(|m| m.layers[l]) {
            // The router, then each projection of every expert stacked
            // into one 3-D tensor, as llama.cpp's `ffn_*_exps`.
            let (block, gate, up, down) =
                if weights.contains(&format!("{p}.block_sparse_moe.gate.weight")) {
                    ("block_sparse_moe", "w1", "w3", "w2")
                } else {
                    ("mlp", "gate_proj", "up_proj", "down_proj")
                };
            add(format!("{p}.{block}.gate.weight"), vec![moe.experts, h]);
            let mi = moe.intermediate;
            for (proj, gguf, out, inp) in [
                (gate, "ffn_gate_exps", mi, h),
                (up, "ffn_up_exps", mi, h),
                (down, "ffn_down_exps", h, mi),
            ] {
                plan.push(Planned {
                    parts: (0..moe.experts)
                        .map(|e| {
                            (
                                format!("{p}.{block}.experts.{e}.{proj}.weight"),
                                vec![out, inp],
                            )
                        })
                        .collect(),
                    layer: Some(l),
                    heads: None,
                    experts: Some(format!("blk.{l}.{gguf}.weight")),
                });
            }
            continue;
        }
        let mlp: &[(&str, usize, usize)] =
            if matches!(cfg.model_type.as_str(), "glm" | "glm4" | "phi3") {
                &[("gate_up_proj", 2 * i, h), ("down_proj", h, i)]
            } else {
                &[("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]
            };
        for &(m, out, inp) in mlp {
            add(format!("{p}.mlp.{m}.weight"), vec![out, inp]);
            if cfg.mlp_bias {
                add(format!("{p}.mlp.{m}.bias"), vec![out]);
            }
        }
    }
    plan.push(one("model.norm.weight".into(), vec![h], None, None));
    if !cfg.tie_word_embeddings {
        plan.push(one(
            "lm_head.weight".into(),
            vec![cfg.vocab_size, h],
            None,
            None,
        ));
    }
    let mut tensors = Vec::with_capacity(plan.len());
    let mut fallbacks = Vec::new();
    let total = plan.len();
    for (n, planned) in plan.into_iter().enumerate() {
        let gname = match &planned.experts {
            Some(name) => name.clone(),
            None => gguf_tensor_name(&planned.parts),
        };
        progress(n, total, &gname);
        let mut shape = planned.parts[0].1.clone();
        if planned.experts.is_some() {
            shape.insert(0, planned.parts.len());
        } else {
            shape[0] = planned.parts.iter().map(|p| p.1[0]).sum();
        }
        let mut values = Vec::with_capacity(shape.iter().product());
        for (hf, part_shape) in &planned.parts {
            let t = weights.get(hf, part_shape, DType::F32)?;
            values.extend(
                t.flatten_all()
                    .map_err(lw_model::ModelError::from)?
                    .to_vec1::<f32>()
                    .map_err(lw_model::ModelError::from)?,
            );
        }
        if let Some(heads) = planned.heads {
            values = halves_to_pairs(&values, heads, shape[0] / heads, values.len() / shape[0]);
        }
        // Gemma's norms scale by 1 + w; GGUF files hold 1 + w.
        if shape.len() == 1 && gname.ends_with("norm.weight") && cfg.norm_offset != 0.0 {
            values.iter_mut().for_each(|v| *v += cfg.norm_offset);
        }
        let cols = *shape.last().unwrap();
        let qtype = if shape.len() == 1 {
            QType::F32
        } else {
            // A tied embedding is also the output matrix: llama.cpp's
            // recipes give it the output's type.
            let role = if gname == "token_embd.weight" && cfg.tie_word_embeddings {
                "output.weight"
            } else {
                gname.as_str()
            };
            let want = target.qtype(role, planned.layer, cfg.num_layers);
            let fb = want.fallback(cols);
            if fb != want {
                fallbacks.push((gname.clone(), fb));
            }
            fb
        };
        let data = encode(qtype, &values, cols);
        tensors.push(OutTensor {
            name: gname,
            shape,
            qtype,
            data,
        });
    }
    // Llama 3.1's rescaling travels as per-frequency factors.
    if let Some(lw_model::config::RopeScaling::Llama3 { .. }) = cfg.rope_scaling {
        let scaled = lw_model::config::rope_inv_freq(&cfg);
        let plain = lw_model::config::rope_inv_freq(&ModelConfig {
            rope_scaling: None,
            ..cfg.clone()
        });
        let factors: Vec<f32> = plain.iter().zip(&scaled).map(|(p, s)| p / s).collect();
        tensors.push(OutTensor {
            name: "rope_freqs.weight".into(),
            shape: vec![factors.len()],
            qtype: QType::F32,
            data: encode(QType::F32, &factors, factors.len()),
        });
    }
    if let Some(lw_model::config::RopeScaling::LongRope {
        ref short,
        ref long,
        ..
    }) = cfg.rope_scaling
    {
        for (name, f) in [("rope_factors_long", long), ("rope_factors_short", short)] {
            tensors.push(OutTensor {
                name: format!("{name}.weight"),
                shape: vec![f.len()],
                qtype: QType::F32,
                data: encode(QType::F32, f, f.len()),
            });
        }
    }
    progress(total, total, "writing");
    let tmp = out.with_extension("gguf.tmp");
    let write = || -> std::io::Result<u64> {
        let file = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::new(file);
        gguf::write(&mut w, &meta, &tensors)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let bytes = file.metadata()?.len();
        std::fs::rename(&tmp, out)?;
        Ok(bytes)
    };
    let bytes = write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        EngineError::file(out, e.to_string())
    })?;
    Ok(ConvertReport {
        path: out.to_path_buf(),
        bytes,
        tensors: tensors.len(),
        fallbacks,
    })
}

/// The GGUF name of a planned tensor: stacked q/k/v parts become `attn_qkv`.
fn gguf_tensor_name(parts: &[(String, Vec<usize>)]) -> String {
    let first = &parts[0].0;
    let hf = if parts.len() > 1 {
        first.replace(".q_proj.", ".qkv_proj.")
    } else {
        first.clone()
    };
    lw_model::loader::gguf_name(&hf).unwrap_or(hf)
}

/// llama.cpp's `general.file_type` codes.
fn file_type(target: Target) -> u32 {
    match target {
        Target::Uniform(QType::F32) => 0,
        Target::Uniform(QType::F16) => 1,
        Target::Uniform(QType::Q4_0) => 2,
        Target::Uniform(QType::Q4_1) => 3,
        Target::Uniform(QType::Q8_0) => 7,
        Target::Uniform(QType::Q5_0) => 8,
        Target::Uniform(QType::Q5_1) => 9,
        Target::Uniform(QType::Q2K) => 10,
        // A uniform Q3_K is llama.cpp's "Q3_K_S".
        Target::Uniform(QType::Q3K) => 11,
        Target::Uniform(QType::Q4K) | Target::Q4KM => 15,
        Target::Uniform(QType::Q5K) | Target::Q5KM => 17,
        Target::Uniform(QType::Q6K) => 18,
        Target::Uniform(QType::BF16) => 32,
        // Target::parse takes only types this crate can write.
        Target::Uniform(q) => unreachable!("{} is not a convert target", q.name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_gives_more_bits_to_a_third_of_the_layers() {
        let t = Target::Q4KM;
        let v: Vec<QType> = (0..16)
            .map(|l| t.qtype("blk.x.ffn_down.weight", Some(l), 16))
            .collect();
        assert_eq!(v[0], QType::Q6K);
        assert_eq!(v[1], QType::Q6K);
        assert_eq!(v[2], QType::Q4K);
        assert_eq!(v[4], QType::Q6K);
        assert_eq!(v[15], QType::Q6K);
        assert_eq!(t.qtype("blk.3.attn_q.weight", Some(3), 16), QType::Q4K);
        assert_eq!(t.qtype("output.weight", None, 16), QType::Q6K);
        assert_eq!(Target::parse("Q4_K_M"), Some(Target::Q4KM));
        assert_eq!(Target::parse("q8_0"), Some(Target::Uniform(QType::Q8_0)));
    }

    #[test]
    fn permutation_moves_halves_to_pairs() {
        // One head of 4 rows (cols 1): [a0 a1 b0 b1] → [a0 b0 a1 b1].
        assert_eq!(
            halves_to_pairs(&[0., 1., 2., 3.], 1, 4, 1),
            [0., 2., 1., 3.]
        );
    }
}
