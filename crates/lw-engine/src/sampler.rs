//! The one sampler: repetition penalty, temperature, top-k, top-p, min-p,
//! then a draw from a seeded generator (same seed, same tokens).

use lw_core::SamplingParams;

/// A small, fast, seedable generator (SplitMix64), so runs repeat exactly on
/// every platform and version.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Only ids below this bound may be chosen (the tokenizer's vocabulary,
    /// when the embedding matrix is padded beyond it).
    id_bound: usize,
}

impl Sampler {
    pub fn new(params: SamplingParams, id_bound: usize) -> Self {
        Sampler {
            rng: Rng::new(params.seed),
            params,
            id_bound,
        }
    }

    /// Chooses the next token from `logits`; `seen` are the ids the repetition
    /// penalty applies to.
    pub fn sample(&mut self, logits: &mut [f32], seen: &[u32]) -> u32 {
        let bound = self.id_bound.min(logits.len());
        let logits = &mut logits[..bound];
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut done = vec![false; logits.len()];
            for &id in seen {
                let i = id as usize;
                if i < logits.len() && !done[i] {
                    done[i] = true;
                    let l = &mut logits[i];
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.is_greedy() {
            return argmax(logits);
        }
        // Candidates sorted by logit, most likely first.
        let mut order: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| logits[i as usize].is_finite())
            .collect();
        if order.is_empty() {
            return argmax(logits);
        }
        order.sort_unstable_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let t = p.temperature as f64;
        let top = logits[order[0] as usize] as f64;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i as usize] as f64 - top) / t).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        let mut keep = probs.len();
        if p.min_p > 0.0 {
            let floor = p.min_p as f64 * probs[0];
            keep = keep.min(probs.iter().take_while(|&&x| x >= floor).count().max(1));
        }
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut n = 0;
            for &x in &probs[..keep] {
                cum += x;
                n += 1;
                if cum >= p.top_p as f64 {
                    break;
                }
            }
            keep = n.max(1);
        }
        let mass: f64 = probs[..keep].iter().sum();
        let mut r = self.rng.next_f64() * mass;
        for (i, &x) in probs[..keep].iter().enumerate() {
            r -= x;
            if r < 0.0 {
                return order[i];
            }
        }
        order[keep - 1]
    }
}

/// Index of the largest value; the first one on ties (like torch's argmax).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: 7,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(params(0.0), 10);
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(
                SamplingParams {
                    seed,
                    ..params(1.0)
                },
                50,
            );
            (0..40)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn top_k_top_p_and_min_p_restrict_the_candidates() {
        let logits = [5.0f32, 4.0, 3.0, 0.0, -2.0];
        let draws = |p: SamplingParams| {
            let mut s = Sampler::new(p, 5);
            let mut seen = [false; 5];
            for _ in 0..500 {
                seen[s.sample(&mut logits.clone(), &[]) as usize] = true;
            }
            seen
        };
        let k2 = draws(SamplingParams {
            top_k: 2,
            ..params(1.0)
        });
        assert_eq!(k2, [true, true, false, false, false]);
        // p(0) ≈ 0.66, p(1) ≈ 0.24: top-p 0.8 keeps exactly two.
        let p8 = draws(SamplingParams {
            top_p: 0.8,
            ..params(1.0)
        });
        assert_eq!(p8, [true, true, false, false, false]);
        // min-p 0.2: token 2 has p ≈ 0.135 · p(0)… below 0.2 · p(0).
        let m = draws(SamplingParams {
            min_p: 0.2,
            ..params(1.0)
        });
        assert_eq!(m, [true, true, false, false, false]);
        let all = draws(params(3.0));
        assert_eq!(all, [true; 5]);
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..params(0.0)
            },
            3,
        );
        assert_eq!(s.sample(&mut [2.0, 1.5, -1.0], &[0, 0]), 1);
        // Negative logits are pushed further down, not up.
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..params(0.0)
            },
            3,
        );
        assert_eq!(s.sample(&mut [-1.0, -1.5, -3.0], &[0]), 1);
    }

    #[test]
    fn ids_beyond_the_tokenizer_are_never_chosen() {
        let mut s = Sampler::new(params(0.0), 2);
        assert_eq!(s.sample(&mut [0.0, 1.0, 9.0], &[]), 1);
    }
}
