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
    // English and Chinese text from the repository itself.
    let files = vec![
        root().join("README.md"),
        root().join("data/eval/longbench-lw.jsonl"),
    ];
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
