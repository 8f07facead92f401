//! A 16,384-token packed row trains in memory linear in its length: one
//! forward and backward pass of a tiny model, with the process's peak
//! resident memory held under a bound computed from the shapes.
//!
//! The bound counts every tensor the pass keeps alive, per position, times
//! two for the allocator and for tensors that briefly overlap. The old
//! attention needed a `[len × len]` mask and score matrices per head: 1 GiB
//! for the mask alone at this length, and several GiB of scores per layer.
//!
//! This file holds one test so that the process's peak is this pass's.

mod common;

use common::{model, packed_row, peak_rss, Shape};

const LEN: usize = 16_384;
const HIDDEN: usize = 32;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 8;
const INTER: usize = 64;
const VOCAB: usize = 256;

#[test]
fn a_16k_token_row_trains_in_memory_linear_in_its_length() {
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
    let model = model(&shape);
    let batch = packed_row(&shape, LEN / 2);
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

    // Floats kept per position: per layer the residual input, two norms'
    // inputs, outputs and inverse scales, q/k/v before and after rope (with
    // the rope's halves and products), the attention output and its
    // transposed copy, the gate, up, activation and product of the MLP,
    // the two projections' outputs and the residual sums; then the final
    // norm and the logits with their softmax in the backward pass; and the
    // gradients of all of these, which are the same shapes again.
    let qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM;
    let per_layer = 8 * HIDDEN + 5 * qkv + 3 * HEADS * HEAD_DIM + 5 * INTER + HEADS;
    let per_position = LAYERS * per_layer + 4 * HIDDEN + 3 * VOCAB + 4 * HEAD_DIM;
    let activations = LEN * per_position * 4 * 2;
    let bound = before + 2 * activations;
    eprintln!(
        "peak RSS {:.1} MiB (before the pass {:.1} MiB), bound {:.1} MiB",
        peak as f64 / 1048576.0,
        before as f64 / 1048576.0,
        bound as f64 / 1048576.0
    );
    assert!(
        peak <= bound,
        "peak RSS {} MiB over the bound {} MiB",
        peak >> 20,
        bound >> 20
    );
}
