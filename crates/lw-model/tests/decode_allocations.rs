//! A decoded token allocates nothing in the forward pass once its buffers
//! have grown: the only allocations of a decode step are the logits it
//! returns (and the attention scores' buffer, when the context outgrows it). Counted with a global allocator that counts every allocation
//! of the process (the kernel threads' too), on the shipped tiny model held
//! in f32 and quantized to Q8_0, Q4_K and Q4_0 (each product family).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lw_model::config::ModelConfig;
use lw_model::loader::SafetensorsSource;
use lw_model::{Llama, Logits, QType, Weights};

#[path = "support/counting.rs"]
mod counting;
use counting::allocations_during;

#[test]
fn a_decoded_token_allocates_only_its_logits() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/longwriter-tiny");
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::for_config(&dir, &cfg).unwrap();
    let vocab = cfg.vocab_size;
    // What returning the logits takes: their values and the tensor.
    let logits_alone = allocations_during(|| {
        let values: Vec<f32> = std::iter::repeat_n(0.0, vocab).collect();
        drop(Tensor::from_vec(values, (1, vocab), &Device::Cpu).unwrap());
    });
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
        model.forward(&prompt, &mut cache, Logits::Last).unwrap();
        let steps = 64;
        // On a thread of the pool, as a server's or a writer's loop runs its
        // steps there (a step started from outside it is also a job in
        // rayon's queue, which takes a block of 63 jobs at a time). First
        // the buffers grow to a decode step's size.
        let total = rayon::scope(|_| {
            for t in 0..4 {
                model.forward(&[t + 7], &mut cache, Logits::Last).unwrap();
            }
            allocations_during(|| {
                for t in 0..steps {
                    let logits = model.forward(&[t + 11], &mut cache, Logits::Last).unwrap();
                    drop(logits);
                }
            })
        });
        let name = quantize.map_or("F32", |q| q.name());
        let beyond = total.saturating_sub(steps as usize * logits_alone);
        eprintln!(
            "{name}: {total} allocations in {steps} decoded tokens, {logits_alone} a token for \
             the returned logits, {beyond} beyond them"
        );
        // Beyond them: the attention scores' buffer, which grows with the
        // context and doubles its room when it does (measured: 2 in these
        // 64 tokens).
        assert!(
            beyond <= 4,
            "{name}: {total} allocations in {steps} tokens, the logits take {logits_alone} a token"
        );
    }
}
