//! The batching scheduler against the engine's own one-at-a-time loop.

use std::path::PathBuf;

use lw_core::{FinishReason, GenerationParams, SamplingParams};
use lw_engine::{BatchEvent, BatchOptions, Batcher, Engine, EngineError, LoadOptions};

mod common;
use common::receive;

fn model_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn params(i: usize) -> GenerationParams {
    GenerationParams {
        sampling: SamplingParams {
            temperature: if i.is_multiple_of(2) { 0.0 } else { 0.9 },
            top_p: 0.95,
            seed: 1000 + i as u64,
            ..Default::default()
        },
        max_tokens: Some(12 + 7 * i),
        stop: vec![],
        ignore_eos: true,
        no_speculation: false,
        ..Default::default()
    }
}

#[test]
fn concurrent_requests_get_exactly_their_solo_outputs() {
    let opts = LoadOptions {
        prefill_chunk: 7,
        ..Default::default()
    };
    let dir = model_dir("qwen2");
    let mut solo = Engine::load(&dir, &opts).unwrap();
    // Prompts that share prefixes, so cached prefixes are reused in both runs.
    let prompts: Vec<Vec<u32>> = (0..10)
        .map(|i| {
            let mut p: Vec<u32> = (0..20).map(|t| (t * 13 + 5) % 150).collect();
            p.extend((0..(3 + i * 4)).map(|t| ((t * 7 + i * 31) % 150) as u32));
            p
        })
        .collect();
    let want: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            solo.reset();
            solo.generate(p, &params(i), |_| true).unwrap()
        })
        .collect();
    let batcher = Batcher::start(
        Engine::load(&dir, &opts).unwrap(),
        BatchOptions {
            max_batch: 4,
            max_queue: 64,
            idle_caches: 3,
        },
    );
    let receivers: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| batcher.submit(p.clone(), params(i)).unwrap())
        .collect();
    for (i, mut rx) in receivers.into_iter().enumerate() {
        let (got, streamed) = receive(&mut rx);
        assert_eq!(got.tokens, want[i].tokens, "request {i}");
        assert_eq!(got.text, want[i].text, "request {i}");
        assert_eq!(
            streamed, got.text,
            "request {i}: deltas concatenate to the text"
        );
        assert_eq!(got.finish_reason, FinishReason::Length);
    }
}

#[test]
fn a_full_queue_is_refused_and_a_dropped_receiver_frees_its_slot() {
    // A 32k context: the first request runs until its client leaves.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-random-qwen2");
    let engine = Engine::load(&dir, &LoadOptions::default()).unwrap();
    let batcher = Batcher::start(
        engine,
        BatchOptions {
            max_batch: 1,
            max_queue: 2,
            idle_caches: 1,
        },
    );
    let long = GenerationParams {
        max_tokens: Some(100_000),
        ignore_eos: true,
        ..params(0)
    };
    // The first runs (context-bound), the next two wait, the fourth is refused.
    let first = batcher.submit(vec![1, 2, 3], long.clone()).unwrap();
    let waiting = std::time::Instant::now();
    while batcher
        .load()
        .running
        .load(std::sync::atomic::Ordering::SeqCst)
        == 0
    {
        assert!(
            waiting.elapsed() < std::time::Duration::from_secs(120),
            "the first sequence never started running"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let second = batcher.submit(vec![4, 5], params(1)).unwrap();
    let _third = batcher.submit(vec![6, 7], params(2)).unwrap();
    let busy = batcher.submit(vec![8], params(3)).unwrap_err();
    assert_eq!(busy.limit, 2);
    assert!(busy.to_string().contains("busy"), "{busy}");
    // The client of the first goes away: its slot frees and the others run.
    drop(first);
    let mut second = second;
    let result = loop {
        if let BatchEvent::Done(r) = second.blocking_recv().unwrap() {
            break r;
        }
    };
    assert_eq!(result.unwrap().tokens.len(), params(1).max_tokens.unwrap());
    // An over-long prompt is an error event, not a panic.
    let too_long = vec![1u32; 40_000];
    let err = batcher
        .generate_blocking(too_long, params(0), |_| true)
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, EngineError::PromptTooLong { .. }), "{err}");
}
