//! Model sizes for pretraining from scratch, as `config.json` values of the
//! Llama architecture (tied embeddings, grouped-query attention, SwiGLU).

use serde_json::{json, Value};

/// (name, hidden, layers, heads, kv heads, intermediate).
pub const PRESETS: &[(&str, usize, usize, usize, usize, usize)] = &[
    ("1m", 128, 2, 4, 2, 384),
    ("3m", 192, 4, 6, 2, 512),
    ("5m", 256, 4, 4, 2, 768),
    ("10m", 320, 6, 5, 5, 864),
    ("25m", 512, 8, 8, 4, 1408),
    ("50m", 640, 10, 10, 5, 1792),
    ("100m", 768, 14, 12, 4, 2304),
];

/// The names of the presets, for help texts.
pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.0).collect()
}

/// `config.json` of preset `name` for a vocabulary of `vocab_size`
/// (rounded up to a multiple of 64) and a context of `max_positions`.
pub fn preset_config(
    name: &str,
    vocab_size: usize,
    max_positions: usize,
    bos: Option<u32>,
    eos: Option<u32>,
) -> Option<Value> {
    let &(_, hidden, layers, heads, kv, inter) = PRESETS.iter().find(|p| p.0 == name)?;
    Some(json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size.div_ceil(64) * 64,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hidden / heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": true,
        "attention_bias": false,
        "mlp_bias": false,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lw_model::ModelConfig;

    #[test]
    fn presets_parse_and_grow() {
        let mut last = 0;
        for name in preset_names() {
            let v = preset_config(name, 8000, 4096, None, Some(0)).unwrap();
            let cfg = ModelConfig::from_json(&v.to_string()).unwrap();
            assert_eq!(cfg.vocab_size, 8000usize.div_ceil(64) * 64);
            let n = cfg.parameter_count();
            assert!(n > last, "{name}: {n} parameters");
            last = n;
        }
        assert!(preset_config("7b", 8000, 4096, None, None).is_none());
    }
}
