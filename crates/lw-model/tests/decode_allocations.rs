//! A decoded token allocates nothing in the forward pass once its buffers
//! have grown, its logits included (written into the caller's buffer by
//! `forward_into`). Counted with a global allocator that counts every
//! allocation of the process (the kernel threads' too), on the shipped tiny
//! model held in f32 and quantized to Q8_0, Q4_K and Q4_0 (each product
//! family).

use std::path::Path;

use candle_core::DType;
use lw_model::config::ModelConfig;
use lw_model::loader::SafetensorsSource;
use lw_model::{Llama, Logits, QType, Weights};

#[path = "support/counting.rs"]
mod counting;
use counting::allocations_during;

#[test]
fn a_decoded_token_allocates_nothing() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/longwriter-tiny");
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::for_config(&dir, &cfg).unwrap();
    for quantize in [None, Some(QType::Q8_0), Some(QType::Q4K), Some(QType::Q4_0)] {
        let src = SafetensorsSource {
            weights: &weights,
            dtype: DType::F32,
            quantize,
        };
        let model = Llama::load_from(cfg.clone(), &src, DType::F32).unwrap();
        let mut cache = model.new_cache();
        cache.reserve_exact(256);
        let prompt: Vec<u32> = (1..40).collect();
        let mut logits = Vec::new();
        model
            .forward_into(&prompt, &mut cache, Logits::Last, &mut logits)
            .unwrap();
        let steps = 64;
        let decode = |cache: &mut lw_model::KvCache, logits: &mut Vec<f32>| {
            for t in 0..steps {
                let rows = model
                    .forward_into(&[t + 11], cache, Logits::Last, logits)
                    .unwrap();
                assert_eq!(rows, 1);
            }
        };
        // On a thread of the pool, as a server's or a writer's loop runs its
        // steps there (a step started from outside it is also a job in
        // rayon's queue, which takes a block of 63 jobs at a time). The
        // buffers first grow to the size of these positions (the attention
        // scores' buffer grows with the context), then the same positions
        // are decoded again, counted.
        // The work-stealing queues of the kernel threads grow (and shrink
        // back) when threads are slow to take jobs, as on a loaded machine:
        // allocations that are the scheduler's, not the forward pass's. The
        // fewest of three passes is counted; an allocation of the pass
        // itself shows in every one (at least one per token).
        let total = rayon::scope(|_| {
            decode(&mut cache, &mut logits);
            (0..3)
                .map(|_| {
                    cache.truncate(prompt.len());
                    allocations_during(|| decode(&mut cache, &mut logits))
                })
                .min()
                .expect("three passes")
        });
        let name = quantize.map_or("F32", |q| q.name());
        eprintln!("{name}: {total} allocations in {steps} decoded tokens");
        assert_eq!(total, 0, "{name}: {total} allocations in {steps} tokens");
        assert_eq!(logits.len(), cfg.vocab_size);
        assert!(logits.iter().all(|v| v.is_finite()), "{name}");
    }
}
