//! Tokenizers read from GGUF metadata, checked against llama.cpp's own test
//! vocabularies: each `models/ggml-vocab-*.gguf` with `.inp`/`.out` files
//! tokenizes every case to exactly the ids llama.cpp's `test-tokenizer-0`
//! expects (no BOS, special-token text read as plain text), and decoding
//! those ids gives the text back. Then the errors for vocabularies this
//! engine cannot read.

use std::path::Path;

use lw_engine::gguf::tokenizer_from_gguf;
use lw_engine::Tokenizer;
use lw_model::gguf::Value;
use lw_model::GgufFile;

mod common;

/// Tokenizer models (`tokenizer.ggml.model`) this engine does not run.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("bert", "BERT WordPiece is not implemented"),
    ("t5", "Unigram (T5/UGM) is not implemented"),
    ("rwkv", "the RWKV tokenizer is not implemented"),
];

/// The cases of `FILE.inp`/`FILE.out` as `test-tokenizer-0.cpp` reads them:
/// inputs separated by a marker line, one line of space-separated ids each.
fn cases(vocab: &Path) -> Option<Vec<(String, Vec<u32>)>> {
    let with = |ext: &str| {
        let mut p = vocab.as_os_str().to_owned();
        p.push(ext);
        std::fs::read_to_string(p).ok()
    };
    let (inp, out) = (with(".inp")?, with(".out")?);
    let sep = "\n__ggml_vocab_test__\n";
    let mut inputs = Vec::new();
    let mut rest = inp.as_str();
    while !rest.is_empty() {
        match rest.find(sep) {
            Some(at) => {
                inputs.push(rest[..at].to_string());
                rest = &rest[at + sep.len()..];
            }
            None => {
                inputs.push(rest.to_string());
                break;
            }
        }
    }
    let outputs: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(inputs.len(), outputs.len(), "{}: cases", vocab.display());
    Some(inputs.into_iter().zip(outputs).collect())
}

fn tokenizer_model(file: &GgufFile) -> String {
    file.header()
        .string("tokenizer.ggml.model")
        .unwrap()
        .unwrap_or("")
        .to_string()
}

/// The failures of one vocabulary's cases.
fn check(tok: &Tokenizer, cases: &[(String, Vec<u32>)]) -> Vec<String> {
    let mut failures = Vec::new();
    for (text, want) in cases {
        let got = tok.encode_with(text, false, false).unwrap();
        if &got != want {
            failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
            continue;
        }
        let back = tok.decode(&got).unwrap();
        if &back != text {
            failures.push(format!("{text:?} decodes back as {back:?}"));
        }
    }
    failures
}

#[test]
fn llama_cpp_vocabularies_give_the_expected_ids() {
    let Some(models) = common::llama_cpp_models() else {
        return;
    };
    let mut files: Vec<_> = std::fs::read_dir(&models)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    files.sort();
    let mut report = Vec::new();
    let mut failed = Vec::new();
    let mut passed = 0;
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let file = GgufFile::open(path).unwrap();
        let model = tokenizer_model(&file);
        if let Some((_, why)) = UNSUPPORTED.iter().find(|(m, _)| *m == model) {
            report.push(format!(
                "{name}: skipped, {why} (tokenizer.ggml.model = {model})"
            ));
            continue;
        }
        // Every vocabulary of a supported model loads, cases or not.
        let tok = tokenizer_from_gguf(&file).unwrap_or_else(|e| panic!("{name}: {e}"));
        let Some(cases) = cases(path) else {
            report.push(format!("{name}: loads (no test cases)"));
            continue;
        };
        let failures = check(&tok, &cases);
        report.push(format!(
            "{name}: {}/{} cases pass",
            cases.len() - failures.len(),
            cases.len()
        ));
        if failures.is_empty() {
            passed += 1;
        }
        failed.extend(failures.into_iter().map(|f| format!("{name}: {f}")));
    }
    eprintln!("{}", report.join("\n"));
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert!(passed >= 14, "only {passed} vocabularies with cases passed");
}

#[test]
fn special_tokens_and_bos_follow_the_vocabulary() {
    let Some(models) = common::llama_cpp_models() else {
        return;
    };
    let load = |name: &str| {
        let file = GgufFile::open(&models.join(format!("ggml-vocab-{name}.gguf"))).unwrap();
        tokenizer_from_gguf(&file).unwrap()
    };
    // SentencePiece (Llama 2): BOS by default; `<s>` is a token only when
    // special-token text is parsed; the space before the text comes off.
    let spm = load("llama-spm");
    assert_eq!(
        spm.encode_with("Hello world", true, false).unwrap(),
        [1, 15043, 3186]
    );
    assert_eq!(
        spm.encode_with("<s>Hello", false, true).unwrap(),
        [1, 15043]
    );
    assert_ne!(spm.encode_with("<s>Hello", false, false).unwrap()[0], 1);
    assert_eq!(spm.decode(&[1, 15043, 3186]).unwrap(), "Hello world");
    assert_eq!(spm.decode_with(&[1, 15043], true).unwrap(), "<s> Hello");
    assert_eq!(spm.piece(15043).unwrap(), " Hello");
    // Llama 3 adds BOS; Qwen2 does not.
    let llama3 = load("llama-bpe");
    assert_eq!(
        llama3.encode_with("Hello", true, false).unwrap()[0],
        llama3.token_id("<|begin_of_text|>").unwrap()
    );
    let qwen = load("qwen2");
    let im_start = qwen.token_id("<|im_start|>").unwrap();
    assert_eq!(
        qwen.encode_with("<|im_start|>", true, true).unwrap(),
        [im_start]
    );
    assert!(qwen.encode_with("<|im_start|>", true, false).unwrap().len() > 1);
    // Gemma 4: always BOS, spaces as ▁ and newline runs as one token.
    let gemma = load("gemma-4");
    let ids = gemma.encode_with("a b\n\n\nc", true, false).unwrap();
    assert_eq!(ids[0], gemma.token_id("<bos>").unwrap());
    assert_eq!(gemma.decode(&ids).unwrap(), "a b\n\n\nc");
}

#[test]
fn a_tokenizer_json_reads_special_token_text_as_text_when_asked() {
    let tok = Tokenizer::from_dir(&common::fixtures().join("models/qwen2")).unwrap();
    let im_start = tok.token_id("<|im_start|>").unwrap();
    assert_eq!(
        tok.encode_with("<|im_start|>", false, true).unwrap(),
        [im_start]
    );
    let plain = tok.encode_with("<|im_start|>", false, false).unwrap();
    assert!(plain.len() > 1 && !plain.contains(&im_start), "{plain:?}");
    assert_eq!(tok.decode(&plain).unwrap(), "<|im_start|>");
}

/// A GGUF file holding only tokenizer metadata: `tokens` with the BPE
/// merges `a b`, changed by `edit`.
fn vocab_only(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Value)>)) -> std::path::PathBuf {
    let strings =
        |v: &[&str]| Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect());
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            Value::String("llama".into()),
        ),
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String("smollm".into()),
        ),
        (
            "tokenizer.ggml.tokens".to_string(),
            strings(&["a", "b", "ab", "<|end|>"]),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array([1, 1, 1, 3].map(Value::I32).to_vec()),
        ),
        ("tokenizer.ggml.merges".to_string(), strings(&["a b"])),
        ("tokenizer.ggml.eot_token_id".to_string(), Value::U32(3)),
    ];
    edit(&mut meta);
    let path = dir.join("vocab.gguf");
    let mut bytes = Vec::new();
    lw_model::gguf::write(&mut bytes, &meta, &[]).unwrap();
    std::fs::write(&path, bytes).unwrap();
    path
}

fn load_error(path: &Path) -> String {
    match tokenizer_from_gguf(&GgufFile::open(path).unwrap()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

fn set(meta: &mut [(String, Value)], key: &str, value: Value) {
    meta.iter_mut().find(|(k, _)| k == key).unwrap().1 = value;
}

#[test]
fn vocabulary_only_files_load_and_bad_ones_are_named() {
    let dir = std::env::temp_dir().join(format!("lw-vocab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let tok = tokenizer_from_gguf(&GgufFile::open(&vocab_only(&dir, |_| {})).unwrap()).unwrap();
    assert_eq!(tok.encode_with("ab<|end|>", false, true).unwrap(), [2, 3]);
    assert_eq!(tok.stop_ids(), [3]);
    assert_eq!(tok.id_bound(), 4);
    assert_eq!(tok.decode(&[2, 3, 0]).unwrap(), "aba");

    // Unused padding at the end is never sampled.
    let padded = vocab_only(&dir, |m| {
        let tokens = ["a", "b", "ab", "<|end|>", "[PAD4]"].map(|t| Value::String(t.into()));
        set(m, "tokenizer.ggml.tokens", Value::Array(tokens.to_vec()));
        let types = [1, 1, 1, 3, 5].map(Value::I32);
        set(m, "tokenizer.ggml.token_type", Value::Array(types.to_vec()));
    });
    let tok = tokenizer_from_gguf(&GgufFile::open(&padded).unwrap()).unwrap();
    assert_eq!((tok.vocab_size(), tok.id_bound()), (5, 4));

    let path = vocab_only(&dir, |m| {
        set(m, "tokenizer.ggml.pre", Value::String("nope".into()))
    });
    let e = load_error(&path);
    assert!(
        e.contains("vocab.gguf") && e.contains("pre-tokenizer \"nope\""),
        "{e}"
    );
    for name in [
        "llama3",
        "smollm",
        "qwen35",
        "deepseek-v3",
        "tekken",
        "gpt-4o",
        "kimi-k2",
    ] {
        assert!(
            e.contains(&format!(" {name},")) || e.ends_with(name),
            "{name}: {e}"
        );
    }

    let path = vocab_only(&dir, |m| {
        set(m, "tokenizer.ggml.model", Value::String("bert".into()))
    });
    let e = load_error(&path);
    assert!(
        e.contains("tokenizer model \"bert\"") && e.contains("llama (SentencePiece)"),
        "{e}"
    );

    let path = vocab_only(&dir, |m| {
        m.push((
            "tokenizer.ggml.scores".into(),
            Value::Array(vec![Value::F32(0.0); 3]),
        ))
    });
    let e = load_error(&path);
    assert!(
        e.contains("tokenizer.ggml.scores has 3 entries for 4 tokens"),
        "{e}"
    );

    let path = vocab_only(&dir, |m| {
        set(
            m,
            "tokenizer.ggml.token_type",
            Value::Array(vec![Value::I32(1); 5]),
        )
    });
    let e = load_error(&path);
    assert!(
        e.contains("tokenizer.ggml.token_type has 5 entries for 4 tokens"),
        "{e}"
    );

    let _ = std::fs::remove_dir_all(&dir);
}
