//! GLM-4 in its two checkpoint layouts, and the built-in chat formats.
//!
//! `tests/fixtures/models/glm4` is `transformers`' Glm model; `glm4-chatglm`
//! holds the same weights under the original ChatGLM names and config
//! (fused `query_key_value`, `dense_h_to_4h`, `rope_ratio`), as
//! LongWriter-glm4-9b ships them. Both were written by
//! `scripts/make_fixtures.py`.

use std::path::PathBuf;

use lw_core::{Message, Role};
use lw_engine::gguf::{convert, Target};
use lw_engine::{ChatFormat, Engine, LoadOptions};
use lw_model::{GgufFile, QType};

mod common;
use common::{fixture, fixtures, ids, messages, worst_logit_diff};

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn load(name: &str, chat_format: ChatFormat) -> Result<Engine, lw_engine::EngineError> {
    Engine::load(
        &model_dir(name),
        &LoadOptions {
            chat_format,
            ..Default::default()
        },
    )
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lw-glm-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_chatglm_layout_gives_transformers_logits() {
    let fx = fixture("glm4");
    let mut engine = load("glm4-chatglm", ChatFormat::Auto).unwrap();
    let cfg = engine.model().config();
    assert_eq!(cfg.model_type, "glm");
    assert_eq!(cfg.rotary_dim, cfg.head_dim / 2);
    assert_eq!(cfg.rope_theta, 500000.0, "10000 × rope_ratio");
    let prompt = ids(&fx["prompt_ids"]);
    let rows = engine.score(&prompt).unwrap();
    let worst = worst_logit_diff(&rows, &fx);
    assert!(worst < 1e-4, "ChatGLM layout: logits differ by {worst}");
}

/// Both layouts convert to the same GGUF tensors (llama.cpp's chatglm
/// layout: one fused attn_qkv, a fused ffn_up), and the file runs.
#[test]
fn both_layouts_convert_to_the_same_gguf() {
    let dir = scratch("convert");
    let mut files = Vec::new();
    for name in ["glm4", "glm4-chatglm"] {
        let out = dir.join(format!("{name}.gguf"));
        convert(
            &model_dir(name),
            &out,
            Target::Uniform(QType::F32),
            |_, _, _| {},
        )
        .unwrap();
        files.push(out);
    }
    let (a, b) = (
        GgufFile::open(&files[0]).unwrap(),
        GgufFile::open(&files[1]).unwrap(),
    );
    assert_eq!(
        a.header().string("general.architecture").unwrap(),
        Some("chatglm")
    );
    let names = |f: &GgufFile| -> Vec<String> {
        let mut n: Vec<String> = f.header().tensors.iter().map(|t| t.name.clone()).collect();
        n.sort();
        n
    };
    assert_eq!(names(&a), names(&b));
    assert!(names(&a).contains(&"blk.1.attn_qkv.bias".to_string()));
    for t in &a.header().tensors {
        let u = b.tensor(&t.name).unwrap();
        assert_eq!(t.shape, u.shape, "{}", t.name);
        assert_eq!(
            a.data(t).as_slice(),
            b.data(u).as_slice(),
            "{} differs between the layouts",
            t.name
        );
    }
    let fx = fixture("glm4");
    let mut engine = Engine::load(&files[1], &LoadOptions::default()).unwrap();
    let rows = engine.score(&ids(&fx["prompt_ids"])).unwrap();
    let worst = worst_logit_diff(&rows, &fx);
    assert!(worst < 1e-4, "GGUF from the ChatGLM layout: {worst}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A ChatGLM checkpoint ships no Jinja template: the built-in GLM-4 format
/// renders what the fixture's `transformers` template renders, and GLM-4's
/// turn markers end generation.
#[test]
fn glm4_format_and_stop_tokens() {
    let fx = fixture("glm4");
    let engine = load("glm4-chatglm", ChatFormat::Auto).unwrap();
    for case in fx["chat"].as_array().unwrap() {
        let msgs = messages(case);
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let got = engine.chat_prompt(&msgs, agp).unwrap();
        assert_eq!(got, case["text"].as_str().unwrap(), "{msgs:?}");
    }
    let tok = engine.tokenizer();
    for t in ["<|endoftext|>", "<|user|>", "<|observation|>"] {
        let id = tok.token_id(t).unwrap();
        assert!(engine.eos_ids().contains(&id), "{t} must stop generation");
    }
    let assistant = tok.token_id("<|assistant|>").unwrap();
    assert!(!engine.eos_ids().contains(&assistant));
    // The prompt encodes its markers as single special tokens.
    let ids = engine
        .encode_chat(&[Message::new(Role::User, "Hello")])
        .unwrap();
    assert_eq!(ids[0], tok.token_id("[gMASK]").unwrap());
    assert_eq!(ids[1], tok.token_id("<sop>").unwrap());
    assert_eq!(*ids.last().unwrap(), assistant);
    // Asking for the checkpoint's own template when it has none is an error.
    let err = load("glm4-chatglm", ChatFormat::Template)
        .err()
        .expect("no template")
        .to_string();
    assert!(err.contains("chat template"), "{err}");
}

/// Llama-2 style turns, as LongWriter-llama3.1-8b was trained: BOS,
/// `[INST]…[/INST]`, the answer and EOS; a system message inside `<<SYS>>`.
#[test]
fn inst_format_renders_llama2_turns() {
    let engine = load("llama3-untied", ChatFormat::Inst).unwrap();
    let user = |s: &str| Message::new(Role::User, s);
    let one = engine
        .chat_prompt(&[user("Write 5000 words on rivers.")], true)
        .unwrap();
    assert_eq!(
        one,
        "<|begin_of_text|>[INST]Write 5000 words on rivers.[/INST]"
    );
    let many = engine
        .chat_prompt(
            &[
                Message::new(Role::System, "Be brief."),
                user("Hi"),
                Message::new(Role::Assistant, "Hello!"),
                user("Plan an essay."),
            ],
            true,
        )
        .unwrap();
    assert_eq!(
        many,
        "<|begin_of_text|>[INST]<<SYS>>\nBe brief.\n<</SYS>>\n\nHi[/INST]Hello!<|eot_id|>[INST]Plan an essay.[/INST]"
    );
    let ids = engine.encode_chat(&[user("Hi")]).unwrap();
    assert_eq!(
        ids[0],
        engine.tokenizer().token_id("<|begin_of_text|>").unwrap()
    );
    assert_eq!(
        ids.iter()
            .filter(|&&i| Some(i) == engine.tokenizer().token_id("<|begin_of_text|>"))
            .count(),
        1,
        "one BOS"
    );
}

#[test]
fn chatglm_configs_that_differ_are_refused_by_name() {
    let dir = scratch("badcfg");
    let src = model_dir("glm4-chatglm");
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    let write = |text: &str| std::fs::write(dir.join("config.json"), text).unwrap();
    write(&cfg.replace("\"rmsnorm\": true", "\"rmsnorm\": false"));
    let err = Engine::load(&dir, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("rmsnorm") && err.contains("config.json"),
        "{err}"
    );
    write(&cfg.replace("\"ffn_hidden_size\": 112,", ""));
    let err = Engine::load(&dir, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("ffn_hidden_size"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let mut b = [0u8; 3];
        b[..chunk.len()].copy_from_slice(chunk);
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
        for _ in chunk.len()..3 {
            out.push('=');
        }
    }
    out
}

/// The original GLM-4 checkpoints ship a tiktoken rank file instead of
/// tokenizer.json: the fixture's vocabulary written that way tokenizes
/// every fixture text to the same ids.
#[test]
fn a_tiktoken_rank_file_tokenizes_like_tokenizer_json() {
    let dir = scratch("tiktoken");
    let src = model_dir("glm4-chatglm");
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let tj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    let unicode = lw_engine::tiktoken::byte_to_unicode();
    let byte_of: std::collections::HashMap<char, u8> =
        (0..=255u8).map(|b| (unicode[b as usize], b)).collect();
    let specials: Vec<(u64, String)> = tj["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["id"].as_u64().unwrap(),
                t["content"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut lines = Vec::new();
    for (tok, id) in tj["model"]["vocab"].as_object().unwrap() {
        if specials.iter().any(|s| &s.1 == tok) {
            continue;
        }
        let bytes: Vec<u8> = tok.chars().map(|c| byte_of[&c]).collect();
        lines.push((id.as_u64().unwrap(), base64(&bytes)));
    }
    lines.sort();
    let text: String = lines.iter().map(|(id, b)| format!("{b} {id}\n")).collect();
    std::fs::write(dir.join("tokenizer.model"), text).unwrap();
    let decoder: serde_json::Map<String, serde_json::Value> = specials
        .iter()
        .map(|(id, t)| {
            (
                id.to_string(),
                serde_json::json!({"content": t, "special": true}),
            )
        })
        .collect();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({"added_tokens_decoder": decoder, "eos_token": "<|endoftext|>"})
            .to_string(),
    )
    .unwrap();
    let tiktoken = Engine::load(&dir, &LoadOptions::default()).unwrap();
    let json = load("glm4-chatglm", ChatFormat::Auto).unwrap();
    let fx = fixture("glm4");
    for case in fx["encodings"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tiktoken.tokenizer().encode(text, false).unwrap(),
            ids(&case["ids_no_special"]),
            "{text:?}"
        );
    }
    // The chat prompt's markers are the same special tokens. (Text after
    // them may split differently: the fixture's tokenizer.json has GPT-2's
    // pre-tokenizer, a tiktoken file GLM-4's.)
    let msgs = [Message::new(Role::User, "Hello")];
    let (a, b) = (
        tiktoken.encode_chat(&msgs).unwrap(),
        json.encode_chat(&msgs).unwrap(),
    );
    assert_eq!(a[..3], b[..3]);
    assert_eq!(a.last(), b.last());
    assert_eq!(tiktoken.eos_ids(), json.eos_ids());
    std::fs::remove_dir_all(&dir).ok();
}
