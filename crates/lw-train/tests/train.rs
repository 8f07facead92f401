//! The training loop on real files: resume repeats an uninterrupted run,
//! pretraining learns a learnable corpus, a tiny dataset is overfitted,
//! every trainable tensor receives a gradient, chat data is rendered, masked,
//! packed and weighted as specified, and merged LoRA equals the adapted model.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use lw_core::{Message, Role};
use lw_model::ModelConfig;
use lw_train::data::{
    read_conversations, strip_zero_width, tokenize_conversation, LossMode, PretrainData, SftData,
    PAD_SEGMENT,
};
use lw_train::model::{Batch, LoraSpec, Rng, TrainModel};
use lw_train::train::{
    gradients, read_loss_log, train, BatchSource, OptimSpec, TrainEvent, TrainSpec,
};
use lw_train::write_shard;
use serde_json::json;

fn tmp(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tiny_config(model_type: &str, tied: bool) -> serde_json::Value {
    json!({
        "model_type": model_type, "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 256,
        "tie_word_embeddings": tied, "eos_token_id": 0,
    })
}

fn new_model(v: serde_json::Value, seed: u64) -> TrainModel {
    let cfg = ModelConfig::from_json(&v.to_string()).unwrap();
    TrainModel::init(cfg, v, seed).unwrap()
}

/// A corpus of arithmetic progressions mod 60 (offset by 4): after two tokens
/// the rest of a document is determined, so a model can learn it well.
fn progression_corpus(dir: &Path, docs: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut make = |n: usize| {
        let mut toks = Vec::new();
        for _ in 0..n {
            let (start, step) = (rng.below(60), 1 + rng.below(3));
            toks.extend((0..40).map(|i| 4 + ((start + i * step) % 60) as u32));
            toks.push(0);
        }
        toks
    };
    write_shard(&dir.join("train-00000.bin"), &make(docs)).unwrap();
    write_shard(&dir.join("val-00000.bin"), &make(docs / 10 + 8)).unwrap();
    let meta = json!({"shards": ["train-00000.bin", "val-00000.bin"], "vocab_size": 64});
    std::fs::write(dir.join("meta.json"), meta.to_string()).unwrap();
}

fn spec(out: &Path, steps: u64, lr: f64) -> TrainSpec {
    TrainSpec {
        steps,
        accum: 2,
        optim: OptimSpec {
            lr,
            min_lr: lr / 10.0,
            warmup_steps: 5,
            ..OptimSpec::default()
        },
        seed: 3,
        eval_every: 4,
        save_every: 0,
        keep_last: 2,
        keep_every: 0,
        out: out.to_path_buf(),
        extra_files: Vec::new(),
        kind: "pretrain".into(),
    }
}

#[test]
fn resuming_repeats_an_uninterrupted_run_exactly() {
    let data_dir = tmp("resume-data");
    progression_corpus(&data_dir, 200, 1);
    let data = PretrainData::open(&data_dir, 4, 32, 3).unwrap();
    let never = AtomicBool::new(false);

    let a = tmp("resume-a");
    let model = new_model(tiny_config("llama", true), 3);
    train(
        &model,
        &data,
        &spec(&a, 10, 3e-3),
        None,
        &never,
        &mut |_| {},
    )
    .unwrap();

    let b = tmp("resume-b");
    let model = new_model(tiny_config("llama", true), 3);
    let stop = AtomicBool::new(false);
    let s = train(&model, &data, &spec(&b, 10, 3e-3), None, &stop, &mut |e| {
        if let TrainEvent::Step(s) = e {
            if s.step == 6 {
                stop.store(true, Ordering::SeqCst);
            }
        }
    })
    .unwrap();
    assert!(s.interrupted);
    assert_eq!(s.steps_done, 6);
    let ckpt = s.last_checkpoint.unwrap();
    assert!(ckpt.ends_with("checkpoint-0000006"), "{}", ckpt.display());
    // A fresh process: new random weights, replaced by the checkpoint's.
    let model = new_model(tiny_config("llama", true), 99);
    let s = train(
        &model,
        &data,
        &spec(&b, 10, 3e-3),
        Some(&ckpt),
        &never,
        &mut |_| {},
    )
    .unwrap();
    assert!(!s.interrupted);

    let la = read_loss_log(&a.join("loss.jsonl")).unwrap();
    let lb = read_loss_log(&b.join("loss.jsonl")).unwrap();
    assert_eq!(la.len(), 10);
    let strip = |v: Vec<lw_train::StepLog>| -> Vec<(u64, u32, u32, u64, Option<u32>)> {
        v.into_iter()
            .map(|s| {
                (
                    s.step,
                    s.loss.to_bits(),
                    s.grad_norm.to_bits(),
                    s.tokens,
                    s.val_loss.map(f32::to_bits),
                )
            })
            .collect()
    };
    assert_eq!(strip(la), strip(lb), "the resumed run's losses differ");
    let wa = std::fs::read(a.join("checkpoint-0000010/model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("checkpoint-0000010/model.safetensors")).unwrap();
    assert!(wa == wb, "final weights differ");
}

#[test]
fn pretraining_learns_a_learnable_corpus() {
    let data_dir = tmp("learn-data");
    progression_corpus(&data_dir, 400, 2);
    let data = PretrainData::open(&data_dir, 8, 48, 0).unwrap();
    let out = tmp("learn-out");
    let model = new_model(tiny_config("llama", true), 0);
    let mut sp = spec(&out, 150, 1e-2);
    sp.accum = 1;
    sp.eval_every = 50;
    let s = train(
        &model,
        &data,
        &sp,
        None,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    let log = read_loss_log(&out.join("loss.jsonl")).unwrap();
    let first = log[0].loss;
    let val = s.val_loss.unwrap();
    eprintln!("loss {first} -> validation {val}");
    // Uniform guessing over 64 tokens is ln 64 = 4.16 nats.
    assert!(first > 3.5, "starting loss {first}");
    assert!(val < 1.0, "validation loss {val} after 150 steps");
}

struct Fixed(Batch);

impl BatchSource for Fixed {
    fn batch(&self, _: u64, _: usize, _: usize) -> Batch {
        self.0.clone()
    }
    fn validation(&self) -> Vec<Batch> {
        vec![self.0.clone()]
    }
}

fn random_batch(rows: usize, len: usize, seed: u64) -> Batch {
    let mut rng = Rng::new(seed);
    let n = rows * len;
    Batch {
        rows,
        len,
        inputs: (0..n).map(|_| rng.below(64) as u32).collect(),
        targets: (0..n).map(|_| rng.below(64) as u32).collect(),
        weights: vec![1.0 / n as f32; n],
        positions: (0..rows).flat_map(|_| 0..len as u32).collect(),
        segments: vec![0; n],
    }
}

#[test]
fn a_tiny_dataset_is_overfitted() {
    let out = tmp("overfit");
    let model = new_model(tiny_config("llama", false), 1);
    let mut sp = spec(&out, 200, 1e-2);
    sp.accum = 1;
    sp.optim.weight_decay = 0.0;
    sp.eval_every = 0;
    let s = train(
        &model,
        &Fixed(random_batch(2, 16, 5)),
        &sp,
        None,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    let loss = s.val_loss.unwrap();
    assert!(loss < 0.05, "random tokens memorised to loss {loss}");
}

#[test]
fn every_trainable_tensor_receives_a_nonzero_gradient() {
    let batch = random_batch(2, 12, 8);
    for (kind, tied) in [
        ("llama", true),
        ("llama", false),
        ("qwen2", true),
        ("mistral", false),
    ] {
        let model = new_model(tiny_config(kind, tied), 4);
        let (_, grads) = gradients(&model, &batch, None).unwrap();
        assert!(!grads.is_empty());
        for (name, g) in grads {
            let g = g.unwrap_or_else(|| panic!("{kind}: {name} received no gradient"));
            assert!(
                g.iter().any(|x| *x != 0.0),
                "{kind}: {name} has a zero gradient"
            );
            assert!(
                g.iter().all(|x| x.is_finite()),
                "{kind}: {name} is not finite"
            );
        }
    }
    // LoRA after one step (B is zero at the start, so A's first gradient is zero).
    let out = tmp("lora-grad");
    let base = repo().join("crates/lw-train/tests/fixtures/oracle/model");
    let lora = LoraSpec {
        rank: 2,
        alpha: 4.0,
        dropout: 0.1,
        targets: vec!["q_proj".into(), "gate_proj".into()],
    };
    let model = TrainModel::load(&base, Some(lora), 0).unwrap();
    let mut sp = spec(&out, 1, 1e-2);
    sp.accum = 1;
    sp.kind = "sft".into();
    train(
        &model,
        &Fixed(random_batch(2, 12, 9)),
        &sp,
        None,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    let (_, grads) = gradients(&model, &random_batch(2, 12, 10), Some(Rng::new(1))).unwrap();
    assert_eq!(grads.len(), 8);
    for (name, g) in grads {
        assert!(
            g.unwrap().iter().any(|x| *x != 0.0),
            "{name} has a zero gradient"
        );
    }
}

fn qwen_tokenizer() -> lw_engine::Tokenizer {
    lw_engine::Tokenizer::from_dir(&repo().join("models/tiny-random-qwen2")).unwrap()
}

#[test]
fn only_assistant_tokens_are_supervised() {
    let tok = qwen_tokenizer();
    let msgs = vec![
        Message::new(Role::User, "Write a poem."),
        Message::new(Role::Assistant, "Rivers run."),
        Message::new(Role::User, "Longer."),
        Message::new(Role::Assistant, "Rivers run to the sea."),
    ];
    let t = tokenize_conversation(&tok, &msgs).unwrap();
    assert_eq!(t.tokens.len(), t.supervised.len());
    // The supervised spans decode to the answers and their end-of-turn marker.
    let mut spans = Vec::new();
    let mut cur = Vec::new();
    for (&id, &s) in t.tokens.iter().zip(&t.supervised) {
        if s {
            cur.push(id);
        } else if !cur.is_empty() {
            spans.push(tok.decode(&std::mem::take(&mut cur)).unwrap());
        }
    }
    if !cur.is_empty() {
        spans.push(tok.decode(&cur).unwrap());
    }
    // (decoding drops the special tokens; the end-of-turn marker is supervised too)
    assert_eq!(spans, vec!["Rivers run.\n", "Rivers run to the sea.\n"]);
    let end = tok.token_id("<|im_end|>").unwrap();
    let sup_ends = t
        .tokens
        .iter()
        .zip(&t.supervised)
        .filter(|(&id, &s)| s && id == end)
        .count();
    assert_eq!(sup_ends, 2);
    // All of it is the template's rendering of the whole conversation.
    let full = tok.chat_template().unwrap().render(&msgs, false).unwrap();
    assert_eq!(t.tokens, tok.encode(&full, false).unwrap());
    let none = tokenize_conversation(&tok, &msgs[..1]).unwrap_err();
    assert!(none.contains("no assistant turn"), "{none}");
}

#[test]
fn bad_chat_lines_are_reported_with_their_numbers() {
    let dir = tmp("bad-lines");
    let f = dir.join("data.jsonl");
    let good = json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "he\u{200B}llo\u{FEFF}"}]});
    let text = [
        good.to_string(),
        "{not json".to_string(),
        json!({"messages": [{"role": "user", "content": "no answer"}]}).to_string(),
        json!({"messages": [{"role": "robot", "content": "x"}]}).to_string(),
        json!({"text": "no messages"}).to_string(),
        good.to_string(),
    ]
    .join("\n");
    std::fs::write(&f, text).unwrap();
    let e = read_conversations(&f, false).unwrap_err().to_string();
    assert!(e.contains("line 2") && e.contains("data.jsonl"), "{e}");
    let (convs, bad) = read_conversations(&f, true).unwrap();
    assert_eq!(convs.len(), 2);
    assert_eq!(
        bad.iter().map(|b| b.line).collect::<Vec<_>>(),
        vec![2, 3, 4, 5]
    );
    assert!(bad[1].reason.contains("no assistant turn"), "{:?}", bad[1]);
    assert!(bad[2].reason.contains("robot"), "{:?}", bad[2]);
    // Zero-width characters are gone from the answer.
    assert_eq!(convs[0][1].content, "hello");
    assert_eq!(strip_zero_width("a\u{200C}b\u{200D}c\u{2060}"), "abc");
}

fn seq(n: usize, sup_from: usize) -> lw_train::Tokenized {
    lw_train::Tokenized {
        tokens: (0..n as u32).map(|i| 4 + i % 50).collect(),
        supervised: (0..n).map(|i| i >= sup_from).collect(),
    }
}

#[test]
fn packing_skips_long_sequences_and_weights_each_sequence_equally() {
    let seqs = vec![seq(9, 3), seq(5, 1), seq(40, 2), seq(18, 16), seq(7, 2)];
    let data = SftData::pack(seqs, 16, 2, LossMode::SequenceMean, 0).unwrap();
    assert_eq!(
        data.stats.too_long, 2,
        "the 40- and 18-token sequences do not fit in 16"
    );
    assert_eq!(data.stats.sequences, 3);
    let b = data.batch(0, 0, 1);
    assert_eq!(b.inputs.len(), b.rows * 16);
    // Per (row, segment): supervised weights sum to 1/S; all sum to 1.
    let total: f32 = b.weights.iter().sum();
    assert!((total - 1.0).abs() < 1e-5, "weights sum to {total}");
    let mut per_seq = std::collections::HashMap::new();
    for (i, (&w, &s)) in b.weights.iter().zip(&b.segments).enumerate() {
        if w > 0.0 {
            assert_ne!(s, PAD_SEGMENT);
            *per_seq.entry((i / 16, s)).or_insert(0.0f32) += w;
        }
        if s == PAD_SEGMENT {
            assert_eq!(w, 0.0);
        }
    }
    let count = per_seq.len() as f32;
    for (k, v) in &per_seq {
        assert!((v - 1.0 / count).abs() < 1e-6, "{k:?}: {v}");
    }
    // Positions restart at each sequence.
    for r in 0..b.rows {
        let row = &b.positions[r * 16..(r + 1) * 16];
        let segs = &b.segments[r * 16..(r + 1) * 16];
        for j in 1..16 {
            if segs[j] != PAD_SEGMENT && segs[j] != segs[j - 1] {
                assert_eq!(row[j], 0);
            }
        }
    }
    let tm = SftData::pack(vec![seq(9, 3), seq(5, 1)], 16, 1, LossMode::TokenMean, 0).unwrap();
    let b = tm.batch(0, 0, 1);
    let ws: Vec<f32> = b.weights.iter().copied().filter(|w| *w > 0.0).collect();
    assert!(
        ws.iter().all(|w| (w - ws[0]).abs() < 1e-9),
        "token mean weighs tokens equally"
    );
    let none = SftData::pack(vec![seq(40, 1)], 16, 1, LossMode::TokenMean, 0);
    assert!(none.is_err());
}

#[test]
fn merged_lora_equals_the_adapted_model() {
    let fixture = repo().join("crates/lw-train/tests/fixtures/oracle");
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
    };
    let adapted = TrainModel::load(&fixture.join("model"), Some(spec), 0).unwrap();
    adapted
        .load_trainable(&fixture.join("lora/adapter_model.safetensors"))
        .unwrap();
    let out = tmp("merged");
    let s = lw_train::lora::merge(&fixture.join("model"), &fixture.join("lora"), &out).unwrap();
    assert_eq!(s.merged_modules, 6);
    let merged = TrainModel::load(&out, None, 0).unwrap();
    let base = TrainModel::load(&fixture.join("model"), None, 0).unwrap();
    let batch = random_batch(2, 12, 3);
    let batch = Batch {
        inputs: batch.inputs.iter().map(|t| t + 20).collect(),
        ..batch
    };
    let l = |m: &TrainModel| m.loss(&batch, None).unwrap().to_scalar::<f32>().unwrap();
    let (a, m, b) = (l(&adapted), l(&merged), l(&base));
    assert!((a - m).abs() < 1e-5 * a.abs(), "adapted {a} vs merged {m}");
    assert!(
        (a - b).abs() > 1e-4,
        "the adapters must change the model ({a} vs base {b})"
    );
    let bad = tmp("merge-bad");
    std::fs::write(bad.join("adapter_config.json"), r#"{"r": 4}"#).unwrap();
    let e = lw_train::lora::merge(&fixture.join("model"), &bad, &tmp("merge-bad-out")).unwrap_err();
    assert!(e.to_string().contains("lora_alpha"), "{e}");
}

/// Largest difference between two gradient lists, relative to the largest
/// gradient value, and asserts both name the same tensors.
fn gradient_gap(a: &lw_train::train::Gradients, b: &lw_train::train::Gradients) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut gap = 0.0f32;
    let mut scale = 0.0f32;
    for ((na, ga), (nb, gb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        let (ga, gb) = (ga.as_ref().unwrap(), gb.as_ref().unwrap());
        for (x, y) in ga.iter().zip(gb) {
            gap = gap.max((x - y).abs());
            scale = scale.max(x.abs());
        }
    }
    gap / scale
}

#[test]
fn checkpointing_gives_the_loss_and_gradients_of_the_whole_graph() {
    // Two packed sequences per row, positions reset at the second.
    let mut batch = random_batch(2, 16, 21);
    batch.positions = (0..2).flat_map(|_| (0..10).chain(0..6)).collect();
    batch.segments = (0..2)
        .flat_map(|_| std::iter::repeat_n(0, 10).chain(std::iter::repeat_n(1, 6)))
        .collect();
    // 1,400 positions: the output head runs in two slices of rows.
    let long = random_batch(2, 700, 23);
    for (kind, tied, batch) in [
        ("llama", true, &batch),
        ("qwen2", false, &batch),
        ("llama", true, &long),
        ("mistral", false, &long),
    ] {
        let mut model = new_model(tiny_config(kind, tied), 6);
        let (loss, whole) = gradients(&model, batch, None).unwrap();
        model.set_checkpointing(true);
        let (loss_c, recomputed) = gradients(&model, batch, None).unwrap();
        assert!(
            (loss - loss_c).abs() <= 1e-6 * loss,
            "{kind}: loss {loss} against {loss_c}"
        );
        let gap = gradient_gap(&whole, &recomputed);
        assert!(gap < 1e-5, "{kind}: gradients differ by {gap} (relative)");
    }
    // LoRA with dropout, after one step so that both A and B have gradients:
    // each layer's masks are drawn again as in the forward pass.
    let lora = LoraSpec {
        rank: 2,
        alpha: 4.0,
        dropout: 0.2,
        targets: vec!["q_proj".into(), "v_proj".into(), "up_proj".into()],
    };
    let base = repo().join("crates/lw-train/tests/fixtures/oracle/model");
    let mut model = TrainModel::load(&base, Some(lora), 0).unwrap();
    let mut sp = spec(&tmp("lora-checkpointing"), 1, 1e-2);
    sp.accum = 1;
    sp.kind = "sft".into();
    let fixed = Fixed(random_batch(2, 16, 22));
    train(
        &model,
        &fixed,
        &sp,
        None,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    let (loss, whole) = gradients(&model, &batch, Some(Rng::new(3))).unwrap();
    model.set_checkpointing(true);
    let (loss_c, recomputed) = gradients(&model, &batch, Some(Rng::new(3))).unwrap();
    assert_eq!(loss, loss_c);
    let gap = gradient_gap(&whole, &recomputed);
    assert!(gap < 1e-5, "LoRA: gradients differ by {gap} (relative)");
    // Other masks give other gradients: the comparison can tell.
    let (_, other) = gradients(&model, &batch, Some(Rng::new(4))).unwrap();
    assert!(gradient_gap(&whole, &other) > 1e-3);
}
