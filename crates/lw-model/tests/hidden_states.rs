//! `Llama::hidden_states`: the residual stream a probe reads, layer by
//! layer, from the same forward pass that computes logits.

use std::path::Path;

use candle_core::DType;
use lw_model::config::ModelConfig;
use lw_model::loader::SafetensorsSource;
use lw_model::{Llama, Logits, Weights};

fn tiny() -> (Llama, ModelConfig) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/longwriter-tiny");
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::for_config(&dir, &cfg).unwrap();
    let src = SafetensorsSource {
        weights: &weights,
        dtype: DType::F32,
        quantize: None,
    };
    (
        Llama::load_from(cfg.clone(), &src, DType::F32).unwrap(),
        cfg,
    )
}

#[test]
fn hidden_states_are_the_forward_passes_stream_and_keep_the_cache_going() {
    let (model, cfg) = tiny();
    let h = cfg.hidden_size;
    let tokens: Vec<u32> = (5..37).collect();
    let mut cache = model.new_cache();
    let states = model.hidden_states(&tokens, &mut cache).unwrap();
    // The embeddings, then one entry per layer, each [tokens, hidden].
    assert_eq!(states.len(), cfg.num_layers + 1);
    assert!(states.iter().all(|s| s.len() == tokens.len() * h));
    // Layer 0 is the embedding of each token: the same rows whatever
    // comes before them.
    let mut other = model.new_cache();
    let alone = model.hidden_states(&tokens[7..9], &mut other).unwrap();
    assert_eq!(&alone[0][..2 * h], &states[0][7 * h..9 * h]);
    // Causal: a prefix's states are the prefix of the whole's.
    let mut prefix_cache = model.new_cache();
    let prefix = model
        .hidden_states(&tokens[..20], &mut prefix_cache)
        .unwrap();
    for (p, w) in prefix.iter().zip(&states) {
        let diff = p
            .iter()
            .zip(&w[..20 * h])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "{diff}");
    }
    // The cache now holds the prefix: the rest continues it as a forward
    // pass over everything would, and each layer changed the stream.
    let mut rest = Vec::new();
    model
        .forward_into(&tokens[20..], &mut prefix_cache, Logits::Last, &mut rest)
        .unwrap();
    let mut whole_cache = model.new_cache();
    let mut whole = Vec::new();
    model
        .forward_into(&tokens, &mut whole_cache, Logits::Last, &mut whole)
        .unwrap();
    let diff = rest
        .iter()
        .zip(&whole)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-3, "{diff}");
    for l in 1..states.len() {
        assert_ne!(states[l], states[l - 1], "layer {l}");
    }
}
