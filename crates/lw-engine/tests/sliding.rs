//! Sliding layers keep only their window: Gemma 2's and Gemma 3's fixtures
//! (a window of 8, prompts of 200 positions) computed with caches whose
//! sliding layers drop what no later position reads give the bits of a
//! cache that keeps everything, prefilled whole or in chunks, and decoding
//! on; the sliding layers' buffers stay at their window while the full
//! layers hold every position.

use lw_model::{DType, KvCache, Llama, Logits};

mod common;
use common::fixtures;

fn bits(t: &candle_core::Tensor) -> Vec<Vec<u32>> {
    t.to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(f32::to_bits).collect())
        .collect()
}

/// A cache that keeps every position in every layer.
fn full_cache(model: &Llama) -> KvCache {
    let cfg = model.config();
    KvCache::new(
        cfg.num_layers,
        cfg.num_kv_heads,
        cfg.head_dim,
        model.context_length(),
    )
}

/// The model's own cache (sliding layers hold their window), with `slack`
/// slots beyond it.
fn sliding_cache(model: &Llama, slack: usize) -> KvCache {
    full_cache(model).with_windows(&model.config().sliding_window, slack)
}

#[test]
fn sliding_layers_hold_their_window_and_give_the_full_caches_bits() {
    for name in ["gemma2", "gemma3"] {
        let model = Llama::load_dir(&fixtures().join("models").join(name), DType::F32).unwrap();
        let windows = model.config().sliding_window.clone();
        assert!(windows.iter().any(Option::is_some) && windows.iter().any(Option::is_none));
        let prompt: Vec<u32> = (0..200).map(|i| (i * 37 + 11) % 500).collect();
        let mut reference = full_cache(&model);
        let whole = bits(&model.forward(&prompt, &mut reference, Logits::All).unwrap());
        for (chunk, slack) in [(200, 4), (1, 1), (3, 4), (17, 8), (64, 576)] {
            let mut cache = sliding_cache(&model, slack);
            let mut rows = Vec::new();
            for c in prompt.chunks(chunk) {
                rows.extend(bits(&model.forward(c, &mut cache, Logits::All).unwrap()));
            }
            assert_eq!(rows, whole, "{name}: chunks of {chunk}, slack {slack}");
            for (l, w) in windows.iter().enumerate() {
                let held = cache.layer_capacity(l);
                match w {
                    // The window, the slack, a step's rows and the offset's
                    // alignment (64), at most.
                    Some(w) => assert!(
                        held <= w + slack.max(chunk) + 64,
                        "{name} layer {l}: {held} slots for a window of {w} (chunk {chunk}, slack {slack})"
                    ),
                    None => assert!(held >= 200, "{name} layer {l}: {held} slots"),
                }
            }
            if chunk == 1 && slack == 1 {
                // Well below what a full cache of 200 positions takes.
                let full = full_cache(&model).bytes_for(200);
                assert!(cache.bytes() < full, "{} of {full}", cache.bytes());
            }
        }
        // Decoding on, one token at a time: the same bits as the full cache.
        let mut cache = sliding_cache(&model, 2);
        model.forward(&prompt, &mut cache, Logits::Last).unwrap();
        let mut full = full_cache(&model);
        model.forward(&prompt, &mut full, Logits::Last).unwrap();
        for step in 0..40u32 {
            let tok = [(step * 13 + 7) % 500];
            let a = bits(&model.forward(&tok, &mut cache, Logits::Last).unwrap());
            let b = bits(&model.forward(&tok, &mut full, Logits::Last).unwrap());
            assert_eq!(a, b, "{name}: decode step {step}");
        }
        assert_eq!(cache.len(), 240);
        // A rollback within the last step keeps the positions; a
        // truncation to positions whose window was dropped keeps none.
        cache.truncate(239);
        assert_eq!(cache.len(), 239);
        cache.truncate(100);
        assert_eq!(cache.len(), 0, "{name}: the window of position 100 is gone");
        // And the emptied cache computes from the start again.
        let again = bits(&model.forward(&prompt, &mut cache, Logits::All).unwrap());
        assert_eq!(again, whole, "{name}: after emptying");
    }
}
