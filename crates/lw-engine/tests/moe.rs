//! A mixture of experts reads only the experts that run: a decoded token
//! reads the dense parts and its active experts' bytes, and a batch reads
//! each chosen expert once, however many of its rows chose it. Counted by
//! the products' own tally of weight bytes read (one test in this binary,
//! so no other test's products are counted).

use lw_model::linear::weight_bytes_read;
use lw_model::{DType, Llama, Logits};

mod common;
use common::fixtures;

#[test]
fn decoding_reads_only_the_experts_that_run() {
    let model = Llama::load_dir(&fixtures().join("models/qwen3-moe"), DType::F32).unwrap();
    let cfg = model.config().clone();
    let moe = cfg.moe.clone().expect("a mixture of experts");
    let layers = moe.layers.iter().filter(|&&m| m).count();
    // One expert: gate, up and down, f32.
    let expert = (3 * cfg.hidden_size * moe.intermediate * 4) as u64;
    let active = (layers * moe.active) as u64 * expert;
    let dense = model.weight_bytes_per_token() as u64 - active;
    let prompt: Vec<u32> = (1..20).collect();
    let mut caches: Vec<_> = (0..3).map(|_| model.new_cache()).collect();
    let mut logits = Vec::new();
    for (i, cache) in caches.iter_mut().enumerate() {
        model
            .forward_into(&prompt[i..], cache, Logits::Last, &mut logits)
            .unwrap();
    }
    // One token: the dense parts and exactly its active experts.
    let before = weight_bytes_read();
    model
        .forward_into(&[7], &mut caches[0], Logits::Last, &mut logits)
        .unwrap();
    assert_eq!(weight_bytes_read() - before, dense + active);
    // Three tokens in one step: six choices of five experts per layer, so
    // some expert serves two rows and is read once for both.
    let before = weight_bytes_read();
    let mut refs: Vec<_> = caches.iter_mut().collect();
    model.forward_batch(&[9, 11, 13], &mut refs).unwrap();
    let read = weight_bytes_read() - before;
    let experts_read = read - dense;
    assert_eq!(experts_read % expert, 0, "whole experts are read");
    let runs = experts_read / expert;
    assert!(
        runs >= (layers * moe.active) as u64 && runs <= (layers * moe.experts) as u64,
        "{runs} expert runs"
    );
    assert!(
        runs < (3 * layers * moe.active) as u64,
        "{runs} expert runs for three rows: a shared expert was read twice"
    );
}
