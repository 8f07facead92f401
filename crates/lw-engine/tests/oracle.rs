//! The engine against Hugging Face `transformers`: the fixtures were written
//! by `scripts/make_fixtures.py` from the same model directories.

use lw_core::{GenerationParams, SamplingParams};
use lw_engine::{Engine, LoadOptions, StreamDecoder};
use lw_model::DType;

mod common;
use common::{fixture, fixtures, floats, ids, max_abs_diff, messages, worst_logit_diff, MODELS};

fn load(name: &str, opts: LoadOptions) -> Engine {
    Engine::load(&fixtures().join("models").join(name), &opts).unwrap()
}

fn greedy(n: usize) -> GenerationParams {
    GenerationParams {
        sampling: SamplingParams::greedy(),
        max_tokens: Some(n),
        ignore_eos: true,
        ..Default::default()
    }
}

#[test]
fn logits_match_transformers_for_every_architecture() {
    for &name in MODELS {
        let fx = fixture(name);
        let mut engine = load(name, LoadOptions::default());
        let prompt = engine.encode_raw(fx["prompt"].as_str().unwrap()).unwrap();
        assert_eq!(prompt, ids(&fx["prompt_ids"]), "{name}: prompt token ids");
        let rows = engine.score(&prompt).unwrap();
        let worst = worst_logit_diff(&rows, &fx);
        assert!(worst < 1e-4, "{name}: logits differ by {worst}");
    }
}

#[test]
fn greedy_tokens_match_transformers_with_and_without_chunked_prefill() {
    for &name in MODELS {
        let fx = fixture(name);
        let want = ids(&fx["greedy_tokens"]);
        for chunk in [512, 5] {
            let mut engine = load(
                name,
                LoadOptions {
                    prefill_chunk: chunk,
                    ..Default::default()
                },
            );
            let prompt = ids(&fx["prompt_ids"]);
            let out = engine.generate(&prompt, &greedy(32), |_| true).unwrap();
            assert_eq!(out.tokens, want, "{name}, prefill chunk {chunk}");
            assert_eq!(
                out.text,
                fx["greedy_text"].as_str().unwrap(),
                "{name}: text"
            );
        }
    }
}

#[test]
fn half_precision_checkpoints_match_their_rounded_weights() {
    let fx = fixture("llama3-untied");
    let prompt = ids(&fx["prompt_ids"]);
    for (dir, key) in [("llama3-untied-bf16", "bf16"), ("llama3-untied-f16", "f16")] {
        let want = floats(&fx["half_precision_last_logits"][key]);
        // Weights held in their own half dtype (the default) and widened to f32.
        for dtype in [None, Some(DType::F32)] {
            let mut engine = load(
                dir,
                LoadOptions {
                    dtype,
                    ..Default::default()
                },
            );
            let rows = engine.score(&prompt).unwrap();
            let d = max_abs_diff(rows.last().unwrap(), &want);
            assert!(d < 1e-4, "{dir} held as {dtype:?}: {d}");
            // The decode path (one row through the streaming kernel) agrees too.
            let out = engine.generate(&prompt, &greedy(8), |_| true).unwrap();
            // Rounded weights may change the argmax, so the reference is our own
            // f32 path over the same rounded weights.
            let mut f32_engine = load(
                dir,
                LoadOptions {
                    dtype: Some(DType::F32),
                    ..Default::default()
                },
            );
            let reference = f32_engine.generate(&prompt, &greedy(8), |_| true).unwrap();
            assert_eq!(out.tokens, reference.tokens, "{dir} held as {dtype:?}");
        }
    }
}

#[test]
fn kv_cache_reuse_gives_the_same_tokens_as_a_fresh_start() {
    let fx = fixture("qwen2");
    let prompt = ids(&fx["prompt_ids"]);
    let mut engine = load("qwen2", LoadOptions::default());
    let first = engine.generate(&prompt, &greedy(10), |_| true).unwrap();
    // Continue from prompt + generated text: the cached prefix is reused.
    let mut longer = prompt.clone();
    longer.extend(&first.tokens[..6]);
    let reused = engine.generate(&longer, &greedy(10), |_| true).unwrap();
    assert!(
        reused.stats.cached_prompt_tokens >= prompt.len(),
        "{:?}",
        reused.stats
    );
    let mut fresh_engine = load("qwen2", LoadOptions::default());
    let fresh = fresh_engine
        .generate(&longer, &greedy(10), |_| true)
        .unwrap();
    assert_eq!(fresh.stats.cached_prompt_tokens, 0);
    assert_eq!(reused.tokens, fresh.tokens);
    // A prompt that diverges early truncates the cache and still agrees.
    let mut other = prompt[..5].to_vec();
    other.extend(&prompt[10..20]);
    let a = engine.generate(&other, &greedy(6), |_| true).unwrap();
    assert_eq!(a.stats.cached_prompt_tokens, 5);
    let b = fresh_engine.generate(&other, &greedy(6), |_| true).unwrap();
    assert_eq!(a.tokens, b.tokens);
}

#[test]
fn chat_templates_render_like_transformers() {
    for &name in MODELS {
        let fx = fixture(name);
        let engine = load(name, LoadOptions::default());
        for case in fx["chat"].as_array().unwrap() {
            let messages = messages(case);
            let agp = case["add_generation_prompt"].as_bool().unwrap();
            // A reasoning model's thinking switch, set as a load option.
            let got = match case["enable_thinking"].as_bool() {
                Some(thinking) => load(
                    name,
                    LoadOptions {
                        thinking: Some(thinking),
                        ..Default::default()
                    },
                )
                .chat_prompt(&messages, agp),
                None => engine.chat_prompt(&messages, agp),
            };
            match case["text"].as_str() {
                Some(want) => assert_eq!(got.unwrap(), want, "{name}: {messages:?}"),
                None => {
                    let err = got
                        .expect_err("transformers raised, so must we")
                        .to_string();
                    let want = case["error"].as_str().unwrap();
                    assert!(err.contains(want), "{name}: {err} vs {want}");
                }
            }
        }
    }
}

#[test]
fn tokenizer_round_trips_and_streams_like_transformers() {
    for &name in MODELS {
        let fx = fixture(name);
        let engine = load(name, LoadOptions::default());
        let tok = engine.tokenizer();
        for e in fx["encodings"].as_array().unwrap() {
            let text = e["text"].as_str().unwrap();
            assert_eq!(
                tok.encode(text, true).unwrap(),
                ids(&e["ids"]),
                "{name}: {text:?}"
            );
            let plain = ids(&e["ids_no_special"]);
            assert_eq!(tok.encode(text, false).unwrap(), plain, "{name}: {text:?}");
            assert_eq!(tok.decode(&plain).unwrap(), text, "{name}: round trip");
            let mut stream = StreamDecoder::new();
            let mut joined = String::new();
            for &id in &plain {
                let mut d = String::new();
                if stream.push(tok, id, &mut d).unwrap() {
                    assert!(
                        !d.contains('\u{FFFD}'),
                        "{name}: a delta split a character: {d:?}"
                    );
                    joined.push_str(&d);
                }
            }
            assert_eq!(joined, text, "{name}: streamed deltas");
        }
    }
}

#[test]
fn sampling_with_a_seed_repeats_and_stop_strings_cut_the_text() {
    let fx = fixture("llama3-untied");
    let prompt = ids(&fx["prompt_ids"]);
    let mut engine = load("llama3-untied", LoadOptions::default());
    let params = |seed| GenerationParams {
        sampling: SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            top_k: 50,
            min_p: 0.01,
            repetition_penalty: 1.1,
            seed,
            ..Default::default()
        },
        max_tokens: Some(24),
        ignore_eos: true,
        ..Default::default()
    };
    let a = engine.generate(&prompt, &params(11), |_| true).unwrap();
    let b = engine.generate(&prompt, &params(11), |_| true).unwrap();
    let c = engine.generate(&prompt, &params(12), |_| true).unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert_ne!(a.tokens, c.tokens);

    // Stop at a string taken from the middle of the greedy text.
    let full = engine.generate(&prompt, &greedy(32), |_| true).unwrap();
    let chars: Vec<char> = full.text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let mut streamed = String::new();
    let cut = engine
        .generate(
            &prompt,
            &GenerationParams {
                stop: vec![stop.clone()],
                ..greedy(32)
            },
            |d| {
                streamed.push_str(d);
                true
            },
        )
        .unwrap();
    assert_eq!(cut.finish_reason, lw_core::FinishReason::Stop);
    assert_eq!(cut.text, full.text[..full.text.find(&stop).unwrap()]);
    assert_eq!(streamed, cut.text);

    // The callback can cancel.
    let mut n = 0;
    let cancelled = engine
        .generate(&prompt, &greedy(32), |_| {
            n += 1;
            n < 3
        })
        .unwrap();
    assert_eq!(cancelled.finish_reason, lw_core::FinishReason::Cancelled);
    assert!(cancelled.tokens.len() < 32);
}

/// Logits of every position, bit for bit, however the positions are grouped:
/// one prefill, chunks of several sizes, one token at a time, or decoding in a
/// batch beside other sequences. This is what lets the server batch requests
/// and reuse cached prefixes without changing anyone's output.
#[test]
fn a_positions_result_does_not_depend_on_how_it_was_batched() {
    use lw_model::{KvCache, Llama, Logits};
    let bits = |t: &candle_core::Tensor| -> Vec<Vec<u32>> {
        t.to_vec2::<f32>()
            .unwrap()
            .into_iter()
            .map(|r| r.into_iter().map(f32::to_bits).collect())
            .collect()
    };
    for name in [
        "mistral",
        "qwen2",
        "llama31-tied-rope-scaling",
        "qwen3",
        "qwen3-moe",
        "mixtral",
        "phi3",
        "glm4-0414",
        "gemma2",
        "gemma3",
    ] {
        for dtype in [DType::F32, DType::BF16] {
            let model = Llama::load_dir(&fixtures().join("models").join(name), dtype).unwrap();
            let prompt: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 200).collect();
            let mut cache = model.new_cache();
            let whole = bits(&model.forward(&prompt, &mut cache, Logits::All).unwrap());
            for chunk in [1, 3, 9, 17] {
                let mut cache = model.new_cache();
                let mut rows = Vec::new();
                for c in prompt.chunks(chunk) {
                    rows.extend(bits(&model.forward(c, &mut cache, Logits::All).unwrap()));
                }
                assert_eq!(rows, whole, "{name} {dtype:?}: chunks of {chunk}");
            }
            // Three sequences decoding together: each row equals its solo run.
            let others: Vec<Vec<u32>> = vec![vec![5, 6, 7], vec![9; 25]];
            let mut caches: Vec<KvCache> = others
                .iter()
                .map(|p| {
                    let mut c = model.new_cache();
                    model.forward(p, &mut c, Logits::Last).unwrap();
                    c
                })
                .collect();
            let mut mine = model.new_cache();
            model
                .forward(&prompt[..30], &mut mine, Logits::Last)
                .unwrap();
            for (step, &tok) in prompt[30..].iter().enumerate() {
                let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
                refs.insert(1, &mut mine);
                let toks = [3 + step as u32, tok, 4];
                let out = bits(&model.forward_batch(&toks, &mut refs).unwrap());
                assert_eq!(
                    out[1],
                    whole[30 + step],
                    "{name} {dtype:?}: batched step {step}"
                );
            }
        }
    }
}

/// `min_tokens` masks the end of the answer until it is reached: with the
/// end-of-sequence token biased far above every other, a generation ends
/// right after its minimum, with the reason `Stop`; and a banned token
/// (bias −100) never appears.
#[test]
fn min_tokens_and_logit_bias_steer_the_end_of_an_answer() {
    let fx = fixture("qwen2");
    let mut engine = load("qwen2", LoadOptions::default());
    let eos = engine.eos_ids()[0];
    let prompt = ids(&fx["prompt_ids"]);
    let plain = engine.generate(&prompt, &greedy(12), |_| true).unwrap();
    let banned = plain.tokens[0];
    for min in [0, 1, 5] {
        let params = GenerationParams {
            sampling: SamplingParams {
                logit_bias: vec![(eos, 100.0), (banned, -100.0)],
                ..SamplingParams::greedy()
            },
            max_tokens: Some(20),
            min_tokens: min,
            ..Default::default()
        };
        let out = engine.generate(&prompt, &params, |_| true).unwrap();
        assert_eq!(out.tokens.len(), min, "min_tokens {min}: {:?}", out.tokens);
        assert_eq!(out.finish_reason, lw_core::FinishReason::Stop);
        assert!(!out.tokens.contains(&banned) && !out.tokens.contains(&eos));
    }
}

/// DRY through the engine: the token that would continue a repeat of the
/// prompt loses its lead (its bias of +50 is outweighed), and a repeat
/// interrupted by a sequence breaker is left alone.
#[test]
fn dry_steers_away_from_continuing_a_repeat() {
    let engine = load("qwen2", LoadOptions::default());
    let tok = engine.tokenizer();
    // Three word pieces, and one whose text is a new line (a breaker).
    let words: Vec<u32> = (100..600)
        .filter(|&id| {
            tok.piece(id)
                .is_ok_and(|p| p.chars().all(|c| c.is_ascii_alphabetic()) && p.len() > 1)
        })
        .take(3)
        .collect();
    let newline = tok.encode("\n", false).unwrap()[0];
    let (a, b, c) = (words[0], words[1], words[2]);
    let mut engine = engine;
    let params = |multiplier: f32| GenerationParams {
        sampling: SamplingParams {
            logit_bias: vec![(c, 50.0)],
            dry_multiplier: multiplier,
            dry_base: 1.75,
            dry_allowed_length: 2,
            ..SamplingParams::greedy()
        },
        max_tokens: Some(1),
        ignore_eos: true,
        ..Default::default()
    };
    let first = |engine: &mut Engine, prompt: &[u32], m: f32| {
        engine
            .generate(prompt, &params(m), |_| true)
            .unwrap()
            .tokens[0]
    };
    // "a b c … a b": c would repeat "a b c".
    let repeat = [a, b, c, a, b];
    assert_eq!(first(&mut engine, &repeat, 0.0), c);
    assert_ne!(first(&mut engine, &repeat, 1000.0), c);
    // "a \n c … a \n": the new line breaks the repeat.
    let broken = [a, newline, c, a, newline];
    assert_eq!(first(&mut engine, &broken, 1000.0), c);
}
