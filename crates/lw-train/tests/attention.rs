//! Tiled attention against PyTorch's eager attention on an explicit mask
//! (`scripts/attention_oracle.py`): packed rows with sequence resets and
//! padding, grouped-query heads, tiles of several sizes.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor, Var};
use lw_train::attention::{Dims, FlashAttention};
use serde_json::Value;

fn fixture() -> (HashMap<String, Tensor>, Value) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/attention");
    let tensors = candle_core::safetensors::load(dir.join("case.safetensors"), &Device::Cpu)
        .expect("the attention fixture loads");
    let meta = std::fs::read_to_string(dir.join("case.json")).unwrap();
    (tensors, serde_json::from_str(&meta).unwrap())
}

fn dims(meta: &Value) -> Dims {
    let n = |k: &str| meta[k].as_u64().unwrap() as usize;
    Dims {
        rows: n("rows"),
        heads: n("heads"),
        kv_heads: n("kv_heads"),
        len: n("len"),
        head_dim: n("head_dim"),
    }
}

fn segments(meta: &Value) -> Vec<u32> {
    meta["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Largest difference relative to the largest magnitude of `want`.
fn rel_diff(got: &Tensor, want: &Tensor) -> f32 {
    let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(g.len(), w.len());
    let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = g
        .iter()
        .zip(&w)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

#[test]
fn tiled_attention_gives_pytorchs_output_and_gradients_for_every_tile_size() {
    let (t, meta) = fixture();
    let d = dims(&meta);
    let seg = segments(&meta);
    let scale = meta["scale"].as_f64().unwrap() as f32;
    // 150 positions: tiles of 1, 7 and 16 cross many sequence starts and
    // tile edges; 64 is the default; 512 is one tile for the whole row.
    // (tile, plain build, two-pass backward)
    let builds = [
        (1, false, false),
        (7, false, false),
        (16, false, false),
        (64, false, false),
        (512, false, false),
        (64, true, false),
        (7, false, true),
        (64, true, true),
    ];
    for (block, portable, two) in builds {
        let q = Var::from_tensor(&t["q"]).unwrap();
        let k = Var::from_tensor(&t["k"]).unwrap();
        let v = Var::from_tensor(&t["v"]).unwrap();
        let mut op = FlashAttention::new(d, &seg, scale)
            .unwrap()
            .with_block(block);
        if portable {
            // The plain build, where the CPU would take the AVX2/FMA one.
            op = op.portable();
        }
        if two {
            op = op.two_passes();
        }
        let out = op
            .apply(q.as_tensor(), k.as_tensor(), v.as_tensor())
            .unwrap();
        let e = rel_diff(&out, &t["out"]);
        assert!(
            e < 1e-5,
            "tile {block} (portable {portable}, two passes {two}): output differs by {e:e}"
        );
        let loss = (&out * &t["dout"]).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in [("dq", &q), ("dk", &k), ("dv", &v)] {
            let g = grads
                .get(var.as_tensor())
                .expect("a gradient for each input");
            let e = rel_diff(g, &t[name]);
            assert!(
                e < 1e-4,
                "tile {block} (portable {portable}, two passes {two}): {name} differs by {e:e}"
            );
        }
    }
}

#[test]
fn a_sequence_must_be_one_run_and_shapes_must_match() {
    let d = Dims {
        rows: 1,
        heads: 2,
        kv_heads: 1,
        len: 5,
        head_dim: 4,
    };
    let err = FlashAttention::new(d, &[0, 0, 1, 0, 0], 0.5)
        .err()
        .expect("a sequence that comes back is refused")
        .to_string();
    assert!(
        err.contains("row 0 returns to sequence 0 at position 3"),
        "{err}"
    );

    let err = FlashAttention::new(Dims { kv_heads: 3, ..d }, &[0; 5], 0.5)
        .err()
        .expect("heads that do not group are refused")
        .to_string();
    assert!(err.contains("2 query heads cannot share 3"), "{err}");

    let q = Tensor::zeros((1, 2, 5, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    let k = Tensor::zeros((1, 2, 5, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = FlashAttention::new(d, &[0; 5], 0.5)
        .unwrap()
        .apply(&q, &k, &k)
        .expect_err("keys with the wrong head count are refused")
        .to_string();
    assert!(
        err.contains("k has shape [1, 2, 5, 4], expected [1, 1, 5, 4]"),
        "{err}"
    );
}
