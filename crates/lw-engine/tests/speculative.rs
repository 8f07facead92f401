//! Speculative decoding: greedy output identical to plain decoding, with a
//! draft model or prompt lookup, on the fixture models (dense, quantized,
//! GLM-4); sampled tokens distributed as without speculation.

use lw_core::{GenerationParams, SamplingParams};
use lw_engine::gguf::{convert, Target};
use lw_engine::{Engine, EngineError, Generation, LoadOptions, Speculation};
use lw_model::QType;

mod common;
use common::{fixture, fixtures, ids, receive};

fn load(name: &str) -> Engine {
    Engine::load(
        &fixtures().join("models").join(name),
        &LoadOptions::default(),
    )
    .unwrap()
}

fn params(sampling: SamplingParams, n: usize) -> GenerationParams {
    GenerationParams {
        sampling,
        max_tokens: Some(n),
        ignore_eos: true,
        ..Default::default()
    }
}

fn run(engine: &mut Engine, prompt: &[u32], p: &GenerationParams) -> Generation {
    engine.reset();
    engine.generate(prompt, p, |_| true).unwrap()
}

/// How often each token came up.
type Counts = std::collections::HashMap<u32, usize>;

/// Tokens generated per run in the distribution tests (the last is counted).
const SAMPLED: usize = 3;

/// Seeded sampling for the distribution tests.
fn sampled(seed: u64) -> GenerationParams {
    let sampling = SamplingParams {
        temperature: 0.8,
        top_k: 4,
        seed,
        ..Default::default()
    };
    params(sampling, SAMPLED)
}

/// Total variation distance between two empirical distributions of `runs`
/// draws each.
fn total_variation(a: &Counts, b: &Counts, runs: usize) -> f64 {
    let keys: std::collections::HashSet<u32> = a.keys().chain(b.keys()).copied().collect();
    let share = |m: &Counts, k| *m.get(k).unwrap_or(&0) as f64 / runs as f64;
    keys.iter()
        .map(|k| (share(a, k) - share(b, k)).abs())
        .sum::<f64>()
        / 2.0
}

/// A prompt that repeats itself, so prompt lookup finds matches.
fn repetitive_prompt(engine: &Engine) -> Vec<u32> {
    let fx_prompt = "The river runs to the sea. The river runs to the sea. The river";
    engine.encode_raw(fx_prompt).unwrap()
}

#[test]
fn greedy_output_is_identical_with_a_draft_model() {
    let greedy = params(SamplingParams::greedy(), 48);
    let fx = fixture("llama3-untied");
    let prompt = ids(&fx["prompt_ids"]);
    let mut plain = load("llama3-untied");
    let want = run(&mut plain, &prompt, &greedy);
    assert_eq!(want.tokens.len(), 48);
    // The same weights rounded to bf16 (a close draft), another model with
    // the same tokenizer (a poor one), and the model itself (a perfect one).
    let mut rates = Vec::new();
    for draft in [
        "llama3-untied-bf16",
        "llama31-tied-rope-scaling",
        "llama3-untied",
    ] {
        for k in [1, 3, 8] {
            let mut engine = load("llama3-untied");
            let spec = Speculation::draft_model(load(draft), &engine, k).unwrap();
            engine.set_speculation(Some(spec));
            let got = run(&mut engine, &prompt, &greedy);
            assert_eq!(got.tokens, want.tokens, "draft {draft}, k {k}");
            assert_eq!(got.text, want.text);
            assert!(got.stats.draft_tokens > 0, "draft {draft}: nothing drafted");
            rates.push((draft, k, got.stats.acceptance_rate().unwrap()));
            // A second prompt reuses both caches' prefixes and still agrees.
            let more: Vec<u32> = prompt.iter().chain(&want.tokens[..10]).copied().collect();
            let again = run(&mut plain, &more, &greedy);
            let got = engine.generate(&more, &greedy, |_| true).unwrap();
            assert_eq!(
                got.tokens, again.tokens,
                "draft {draft}, k {k}, second prompt"
            );
        }
    }
    let rate = |d: &str, k: usize| rates.iter().find(|r| r.0 == d && r.1 == k).unwrap().2;
    assert_eq!(rate("llama3-untied", 8), 1.0, "{rates:?}");
    assert!(
        rate("llama3-untied-bf16", 3) > rate("llama31-tied-rope-scaling", 3),
        "{rates:?}"
    );
}

#[test]
fn greedy_output_is_identical_with_prompt_lookup() {
    let greedy = params(SamplingParams::greedy(), 40);
    let dir = std::env::temp_dir().join(format!("lw-spec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let q8 = dir.join("llama3-q8_0.gguf");
    convert(
        &fixtures().join("models").join("llama3-untied"),
        &q8,
        Target::Uniform(QType::Q8_0),
        |_, _, _| {},
    )
    .unwrap();
    let mut drafted = 0;
    for name in ["llama3-untied", "qwen2", "glm4", "mistral", "q8_0 gguf"] {
        let open = || {
            if name == "q8_0 gguf" {
                Engine::load(&q8, &LoadOptions::default()).unwrap()
            } else {
                load(name)
            }
        };
        let mut plain = open();
        let prompt = repetitive_prompt(&plain);
        let want = run(&mut plain, &prompt, &greedy);
        for k in [1, 4, 10] {
            let mut engine = open();
            engine.set_speculation(Some(Speculation::prompt_lookup(k)));
            let got = run(&mut engine, &prompt, &greedy);
            assert_eq!(got.tokens, want.tokens, "{name}, k {k}");
            drafted += got.stats.draft_tokens;
        }
    }
    assert!(drafted > 0);
    std::fs::remove_dir_all(&dir).ok();
}

/// Under sampling, the first generated tokens have the same distribution
/// with and without speculation: compared over many seeds.
#[test]
fn sampled_tokens_keep_their_distribution() {
    let mut plain = load("llama3-untied");
    let prompt = repetitive_prompt(&plain);
    let runs = 2000;
    let count = |engine: &mut Engine, offset: u64| {
        let mut freq = Counts::new();
        for seed in 0..runs {
            let out = run(engine, &prompt, &sampled(seed + offset));
            *freq.entry(out.tokens[SAMPLED - 1]).or_default() += 1;
        }
        freq
    };
    let a = count(&mut plain, 0);
    assert!(
        a.len() > 3,
        "the distribution should not be degenerate: {a:?}"
    );
    // The model drafting for itself (its guess is always its own argmax,
    // which a biased rule would keep every time), and another model with
    // the same tokenizer (often wrong: the redraw path).
    for draft in ["llama3-untied", "llama31-tied-rope-scaling"] {
        let mut with = load("llama3-untied");
        let spec = Speculation::draft_model(load(draft), &with, 2).unwrap();
        with.set_speculation(Some(spec));
        let b = count(&mut with, 10_000);
        // Total variation distance between the two empirical distributions
        // of the third token: two samples of one distribution differ by
        // about 0.07 at this size; keeping every draft gives about 0.45.
        let tv = total_variation(&a, &b, runs as usize);
        eprintln!("draft {draft}: total variation {tv:.3}");
        assert!(
            tv < 0.15,
            "draft {draft}: total variation {tv}: {a:?} vs {b:?}"
        );
    }
}

#[test]
fn a_draft_with_another_tokenizer_is_refused() {
    let target = load("llama3-untied");
    let err = Speculation::draft_model(load("qwen2"), &target, 4)
        .err()
        .unwrap();
    assert!(matches!(err, EngineError::DraftTokenizer { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("qwen2") && msg.contains("tokenizer"), "{msg}");
}

/// Speculation inside the batching scheduler: several sequences at once,
/// each drafting on its own (a draft model, prompt lookup), some opting out,
/// get exactly the tokens of plain one-at-a-time decoding under greedy
/// sampling, and drafts are taken.
#[test]
fn the_scheduler_speculates_per_sequence_with_identical_greedy_output() {
    use lw_engine::{BatchOptions, Batcher};
    let fx = fixture("llama3-untied");
    let base = ids(&fx["prompt_ids"]);
    let mut plain = load("llama3-untied");
    let repetitive = repetitive_prompt(&plain);
    // Prompts of several lengths that share prefixes (prefix reuse in the
    // slots' sequences and in the drafters').
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| {
            let mut p = if i % 2 == 0 {
                base.clone()
            } else {
                repetitive.clone()
            };
            p.extend(repetitive.iter().take(i));
            p
        })
        .collect();
    let request = |i: usize| GenerationParams {
        no_speculation: i == 3,
        ..params(SamplingParams::greedy(), 20 + 5 * i)
    };
    let want: Vec<Generation> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| run(&mut plain, p, &request(i)))
        .collect();
    for name in ["draft model", "prompt lookup"] {
        let mut engine = load("llama3-untied");
        let spec = if name == "draft model" {
            Speculation::draft_model(load("llama3-untied-bf16"), &engine, 4).unwrap()
        } else {
            Speculation::prompt_lookup(5)
        };
        engine.set_speculation(Some(spec));
        let batcher = Batcher::start(
            engine,
            BatchOptions {
                max_batch: 4,
                max_queue: 16,
                idle_caches: 2,
            },
        );
        assert!(batcher.speculates());
        let receivers: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| batcher.submit(p.clone(), request(i)).unwrap())
            .collect();
        let mut drafted = 0;
        for (i, mut rx) in receivers.into_iter().enumerate() {
            let (got, streamed) = receive(&mut rx);
            assert_eq!(got.tokens, want[i].tokens, "{name}, request {i}");
            assert_eq!(got.text, want[i].text, "{name}, request {i}");
            assert_eq!(streamed, got.text, "{name}, request {i}");
            if i == 3 {
                assert_eq!(got.stats.draft_tokens, 0, "{name}: request 3 opted out");
            }
            drafted += got.stats.draft_tokens;
        }
        assert!(drafted > 0, "{name}: nothing drafted");
    }
}

/// Sampled output through the scheduler keeps its distribution: the third
/// token over many seeds, with the model drafting for itself, against the
/// engine without speculation.
#[test]
fn the_scheduler_keeps_the_sampled_distribution() {
    use lw_engine::{BatchOptions, Batcher};
    let mut plain = load("llama3-untied");
    let prompt = repetitive_prompt(&plain);
    let runs = 1200u64;
    let mut a = Counts::new();
    for seed in 0..runs {
        let out = run(&mut plain, &prompt, &sampled(seed));
        *a.entry(out.tokens[SAMPLED - 1]).or_default() += 1;
    }
    let mut engine = load("llama3-untied");
    let spec = Speculation::draft_model(load("llama3-untied"), &engine, 2).unwrap();
    engine.set_speculation(Some(spec));
    let batcher = Batcher::start(
        engine,
        BatchOptions {
            max_batch: 8,
            max_queue: runs as usize,
            idle_caches: 8,
        },
    );
    let receivers: Vec<_> = (0..runs)
        .map(|seed| {
            batcher
                .submit(prompt.clone(), sampled(50_000 + seed))
                .unwrap()
        })
        .collect();
    let mut b = Counts::new();
    let mut drafted = 0;
    for mut rx in receivers {
        let (got, _) = receive(&mut rx);
        drafted += got.stats.draft_tokens;
        *b.entry(got.tokens[SAMPLED - 1]).or_default() += 1;
    }
    assert!(drafted > 0);
    let tv = total_variation(&a, &b, runs as usize);
    eprintln!("scheduler with a draft model: total variation {tv:.3}");
    // Two samples of one distribution at this size differ by about 0.09;
    // keeping every draft gives about 0.45.
    assert!(a.len() > 3, "{a:?}");
    assert!(tv < 0.18, "total variation {tv}: {a:?} vs {b:?}");
}

#[test]
fn a_grammar_holds_under_speculation_with_drafts_checked_against_its_mask() {
    let mut greedy = params(SamplingParams::greedy(), 40);
    greedy.constraint = Some(lw_core::Constraint::Regex("[a-z ]{12,80}[.]".into()));
    let fx = fixture("llama3-untied");
    let prompt = ids(&fx["prompt_ids"]);
    let mut plain = load("llama3-untied");
    let want = run(&mut plain, &prompt, &greedy);
    let body = want.text.trim_end_matches('.');
    assert!(
        body.len() >= 12 && body.chars().all(|c| c.is_ascii_lowercase() || c == ' '),
        "{:?}",
        want.text
    );
    assert!(want.stats.mask_seconds > 0.0);
    // The model itself as its draft: its guesses are the unconstrained
    // choices, which the grammar's mask often refuses.
    for draft in ["llama3-untied", "llama3-untied-bf16"] {
        let mut engine = load("llama3-untied");
        let spec = Speculation::draft_model(load(draft), &engine, 4).unwrap();
        engine.set_speculation(Some(spec));
        let got = run(&mut engine, &prompt, &greedy);
        assert_eq!(got.tokens, want.tokens, "draft {draft}");
        assert_eq!(got.text, want.text, "draft {draft}");
        assert!(got.stats.draft_tokens > 0, "draft {draft}: nothing drafted");
    }
}
