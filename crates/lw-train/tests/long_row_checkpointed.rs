//! With activation checkpointing a 16,384-token row through many layers
//! keeps each layer's input and one layer's activations at a time: the
//! process's peak resident memory stays under a bound computed from the
//! shapes that the same pass keeping every layer's activations exceeds
//! (`long_row.rs` holds the pass without checkpointing, on fewer layers).
//!
//! This file holds one test so that the process's peak is this pass's.

mod common;

use common::{model, packed_row, peak_rss, Shape};

const LEN: usize = 16_384;
const HIDDEN: usize = 32;
const LAYERS: usize = 16;
/// Tokens per packed sequence: short ones keep attention's quadratic work
/// small; memory depends on the row's length alone.
const SEQUENCE: usize = 1024;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 8;
const INTER: usize = 64;
const VOCAB: usize = 256;

#[test]
fn a_16k_token_row_through_16_layers_keeps_one_layers_activations() {
    let shape = Shape {
        len: LEN,
        hidden: HIDDEN,
        layers: LAYERS,
        heads: HEADS,
        kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
        inter: INTER,
        vocab: VOCAB,
    };
    let mut model = model(&shape);
    model.set_checkpointing(true);
    let batch = packed_row(&shape, SEQUENCE);
    let before = peak_rss();
    let (loss, grads) = lw_train::gradients(&model, &batch, None).unwrap();
    let peak = peak_rss();
    assert!(
        loss.is_finite() && (loss - (VOCAB as f32).ln()).abs() < 0.5,
        "loss {loss}"
    );
    assert!(
        grads.iter().all(|(_, g)| g.is_some()),
        "every parameter has a gradient"
    );

    // Floats per position of one layer's activations and the head's, as
    // counted in `long_row.rs` (tensors and their gradients); with
    // checkpointing, every layer adds only its input (and the gradient
    // flowing down, one at a time); ×2 for the allocator and overlaps.
    // Keeping every layer's activations peaks at 558 MiB here, over it.
    let qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM;
    let per_layer = 8 * HIDDEN + 5 * qkv + 3 * HEADS * HEAD_DIM + 5 * INTER + HEADS;
    let head = 4 * HIDDEN + 3 * VOCAB + 4 * HEAD_DIM;
    let kept = LAYERS * HIDDEN + 2 * HIDDEN + per_layer + head;
    let bound = before + LEN * kept * 4 * 2;
    // Every layer's activations, once, without the allocator's factor.
    let whole_graph = LEN * (LAYERS * per_layer + head) * 4;
    assert!(
        bound < before + whole_graph,
        "the bound must tell the two apart"
    );
    eprintln!(
        "peak RSS {:.1} MiB (before the pass {:.1} MiB), bound {:.1} MiB; every layer's activations once: {:.1} MiB",
        peak as f64 / 1048576.0,
        before as f64 / 1048576.0,
        bound as f64 / 1048576.0,
        whole_graph as f64 / 1048576.0
    );
    assert!(
        peak <= bound,
        "peak RSS {} MiB over the bound {} MiB",
        peak >> 20,
        bound >> 20
    );
}
