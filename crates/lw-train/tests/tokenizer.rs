//! A tokenizer trained here loads in the engine, round-trips any text, keeps
//! its special tokens whole, and renders chats with its template.

use std::path::PathBuf;

use lw_core::Message;
use lw_train::{train_tokenizer, TokenizerSpec, TrainError};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lw-tok-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_trained_tokenizer_round_trips_and_loads_in_the_engine() {
    let out = scratch("train");
    // English and Chinese text from the repository itself, plain and JSONL
    // (whose "text" fields are the documents).
    let jsonl = out.join("docs.jsonl");
    let prompts: Vec<String> = std::fs::read_to_string(root().join("data/eval/longbench-lw.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::json!({"text": serde_json::from_str::<serde_json::Value>(l).unwrap()["prompt"]}).to_string())
        .collect();
    std::fs::write(&jsonl, prompts.join("\n")).unwrap();
    let files = vec![root().join("README.md"), jsonl];
    let spec = TokenizerSpec {
        vocab_size: 700,
        ..Default::default()
    };
    let vocab = train_tokenizer(&files, &spec, &out).unwrap();
    assert!(vocab > 400 && vocab <= 700, "{vocab}");
    let tok = lw_engine::Tokenizer::from_dir(&out).unwrap();
    for (i, s) in spec.special_tokens.iter().enumerate() {
        assert_eq!(tok.token_id(s), Some(i as u32), "{s} comes first");
        assert_eq!(
            tok.encode(s, false).unwrap(),
            vec![i as u32],
            "{s} stays whole"
        );
    }
    for text in [
        "Write a 10000-word guide to the history of the printing press.",
        "请写一篇一万字的文章，介绍造纸术的历史。",
        "emoji 🙂 and tabs\tand\nnewlines, café, naïve — «quotes»",
        "",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text, "round trip");
    }
    // Merges were learned: common English needs fewer tokens than bytes.
    let common = "the history of the printing press";
    assert!(tok.encode(common, false).unwrap().len() < common.len() / 2);
    let tmpl = tok.chat_template().expect("a chat template");
    let rendered = tmpl
        .render(&[Message::system("Be brief."), Message::user("Hi")], true)
        .unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    // Only the documents were learned, not the JSON around them: trained on
    // the JSONL alone (whose prompts hold no ASCII quotes), no merged token
    // contains a quote, though `{"text": "` starts every line.
    let only = scratch("jsonl-only");
    train_tokenizer(&files[1..], &spec, &only).unwrap();
    let vocab: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(only.join("tokenizer.json")).unwrap())
            .unwrap();
    let quoted: Vec<&String> = vocab["model"]["vocab"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|t| t.chars().count() > 1 && t.contains('"'))
        .collect();
    assert!(
        quoted.is_empty(),
        "JSON syntax leaked into the vocabulary: {quoted:?}"
    );
}

#[test]
fn bad_requests_are_refused_with_the_reason() {
    let out = scratch("bad");
    let readme = vec![root().join("README.md")];
    let small = TokenizerSpec {
        vocab_size: 100,
        ..Default::default()
    };
    let e = train_tokenizer(&readme, &small, &out).unwrap_err();
    assert!(
        matches!(e, TrainError::VocabTooSmall { needed: 259, .. }),
        "{e}"
    );
    let missing = vec![root().join("no-such-file.txt")];
    let e = train_tokenizer(&missing, &TokenizerSpec::default(), &out).unwrap_err();
    assert!(e.to_string().contains("no-such-file.txt"), "{e}");
    assert!(matches!(
        train_tokenizer(&[], &TokenizerSpec::default(), &out),
        Err(TrainError::NoFiles)
    ));
    let dup = TokenizerSpec {
        special_tokens: vec!["<|a|>".into(), "<|a|>".into()],
        ..Default::default()
    };
    assert!(matches!(
        train_tokenizer(&readme, &dup, &out),
        Err(TrainError::DuplicateSpecial(_))
    ));
}

#[test]
fn a_corpus_tokenizes_into_shards_that_decode_back_to_its_documents() {
    let work = scratch("corpus");
    let tok_dir = work.join("tok");
    let readme = root().join("README.md");
    train_tokenizer(
        std::slice::from_ref(&readme),
        &TokenizerSpec {
            vocab_size: 600,
            ..Default::default()
        },
        &tok_dir,
    )
    .unwrap();
    // A JSONL corpus: one document per line's "text".
    let docs: Vec<String> = (0..200)
        .map(|i| {
            format!(
                "Document {i}: the river runs {} miles. 河流第{i}段。",
                i * 3
            )
        })
        .collect();
    let jsonl = work.join("docs.jsonl");
    let lines: Vec<String> = docs
        .iter()
        .map(|d| serde_json::json!({"text": d}).to_string())
        .collect();
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    // A plain text file is one document (fixed text: the split hashes content).
    let story = work.join("story.txt");
    std::fs::write(
        &story,
        "The river rose in the hills.\n\nIt ran to the sea.\n",
    )
    .unwrap();
    let out = work.join("shards");
    let s = lw_train::tokenize_corpus(&tok_dir, &[jsonl.clone(), story.clone()], &out, 0.1, 1500)
        .unwrap();
    assert_eq!(s.documents, 201);
    assert!(s.val_tokens > 0 && s.train_tokens > s.val_tokens);
    assert!(s.shards.len() > 2, "small shards roll over: {:?}", s.shards);
    let tok = lw_engine::Tokenizer::from_dir(&tok_dir).unwrap();
    let eot = tok.token_id("<|endoftext|>").unwrap();
    let mut decoded = Vec::new();
    for path in &s.shards {
        let shard = lw_train::Shard::open(path).unwrap();
        let ids = shard.window(0, shard.len());
        for doc in ids.split(|&t| t == eot).filter(|d| !d.is_empty()) {
            decoded.push(tok.decode(doc).unwrap());
        }
    }
    let mut want: Vec<String> = docs.clone();
    want.push(std::fs::read_to_string(&story).unwrap());
    decoded.sort();
    want.sort();
    assert_eq!(
        decoded, want,
        "every document, exactly once, split across train and val"
    );
    // The split is by content: a second run writes the same shards.
    let again = work.join("again");
    let s2 =
        lw_train::tokenize_corpus(&tok_dir, &[jsonl.clone(), story], &again, 0.1, 1500).unwrap();
    assert_eq!(
        (s2.train_tokens, s2.val_tokens),
        (s.train_tokens, s.val_tokens)
    );
    // Bad input names the file and the line.
    std::fs::write(&jsonl, "{\"text\": \"ok\"}\n{\"txt\": 1}\n").unwrap();
    let e = lw_train::tokenize_corpus(&tok_dir, &[jsonl], &out, 0.1, 1500)
        .unwrap_err()
        .to_string();
    assert!(e.contains("docs.jsonl") && e.contains("line 2"), "{e}");
}
