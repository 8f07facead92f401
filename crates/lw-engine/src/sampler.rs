//! The one sampler: logit bias, presence and frequency penalties,
//! repetition penalty, temperature, top-k, top-p, min-p, then a draw from a
//! seeded generator (same seed, same tokens).

use lw_core::SamplingParams;

pub use lw_core::Rng;

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Only ids below this bound may be chosen (the tokenizer's vocabulary,
    /// when the embedding matrix is padded beyond it).
    id_bound: usize,
    /// Candidate ids, their probabilities and the penalty's marks: room
    /// kept from token to token, so sampling allocates nothing.
    scratch: Scratch,
    /// How often each generated token was taken (for the presence and
    /// frequency penalties; kept only when one is on).
    counts: std::collections::HashMap<u32, u32>,
    /// Tokens a DRY repeat cannot run across.
    breakers: std::sync::Arc<std::collections::HashSet<u32>>,
}

#[derive(Default)]
struct Scratch {
    order: Vec<u32>,
    probs: Vec<f64>,
    done: Vec<bool>,
    /// DRY: each candidate token and its longest repeat.
    repeats: Vec<(u32, usize)>,
}

/// DRY over `history` (the prompt and the tokens taken): for every earlier
/// place where the history's last tokens occurred before (a match that
/// ends at position `i`, runs back no further than the history's start
/// and crosses no breaker), the token that followed it, `history[i + 1]`,
/// would extend the repeat; its logit loses `multiplier ·
/// base^(length − allowed_length)` for its longest such match of at least
/// `allowed_length` tokens.
fn dry(
    logits: &mut [f32],
    history: &[u32],
    p: &lw_core::SamplingParams,
    breakers: &std::collections::HashSet<u32>,
    repeats: &mut Vec<(u32, usize)>,
) {
    let from = match p.dry_penalty_last_n {
        0 => 0,
        n => history.len().saturating_sub(n),
    };
    let h = &history[from..];
    let n = h.len();
    if n < 2 {
        return;
    }
    repeats.clear();
    for i in 0..n - 1 {
        let mut k = 0;
        while k <= i && h[i - k] == h[n - 1 - k] && !breakers.contains(&h[i - k]) {
            k += 1;
        }
        if k >= p.dry_allowed_length.max(1) {
            let next = h[i + 1];
            match repeats.iter_mut().find(|(t, _)| *t == next) {
                Some(r) => r.1 = r.1.max(k),
                None => repeats.push((next, k)),
            }
        }
    }
    // The largest exponent that keeps the penalty finite.
    let most = (f32::MAX.ln() / p.dry_base.max(1.0 + f32::EPSILON).ln()).floor();
    for &(t, k) in repeats.iter() {
        if let Some(l) = logits.get_mut(t as usize) {
            let exponent = ((k - p.dry_allowed_length.max(1)) as f32).min(most);
            *l -= p.dry_multiplier * p.dry_base.powf(exponent);
        }
    }
}

impl Sampler {
    pub fn new(params: SamplingParams, id_bound: usize) -> Self {
        Sampler {
            rng: Rng::new(params.seed),
            params,
            id_bound,
            scratch: Scratch::default(),
            counts: std::collections::HashMap::new(),
            breakers: Default::default(),
        }
    }

    /// The tokens DRY's sequence breakers stand in.
    pub fn set_breakers(&mut self, breakers: std::sync::Arc<std::collections::HashSet<u32>>) {
        self.breakers = breakers;
    }

    /// Records a generated token (for the presence and frequency
    /// penalties).
    pub fn observe(&mut self, token: u32) {
        if self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0 {
            *self.counts.entry(token).or_insert(0) += 1;
        }
    }

    /// Chooses the next token from `logits`; `seen` are the ids the repetition
    /// penalty applies to.
    pub fn sample(&mut self, logits: &mut [f32], seen: &[u32]) -> u32 {
        self.choose(logits, seen, None).0
    }

    /// Chooses the next token, given a drafted guess for it (speculative
    /// decoding). Returns the token and whether it is the draft.
    ///
    /// Greedy: the draft is kept when it is the argmax. Sampling: the draft
    /// is kept with probability p(draft) under the final distribution
    /// (penalty, temperature, top-k/p, min-p); otherwise a token is drawn
    /// from that distribution with the draft left out. Each token then has
    /// exactly its probability p, as without a draft: p(d) for the draft,
    /// (1 − p(d)) · p(y) / (1 − p(d)) for any other y.
    pub fn choose(&mut self, logits: &mut [f32], seen: &[u32], draft: Option<u32>) -> (u32, bool) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let chosen = self.choose_in(logits, seen, draft, &mut scratch);
        self.scratch = scratch;
        chosen
    }

    /// [`Sampler::choose`] with its lists in `s`.
    fn choose_in(
        &mut self,
        logits: &mut [f32],
        seen: &[u32],
        draft: Option<u32>,
        s: &mut Scratch,
    ) -> (u32, bool) {
        let bound = self.id_bound.min(logits.len());
        let logits = &mut logits[..bound];
        let p = &self.params;
        for &(id, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        for (&id, &n) in &self.counts {
            if let Some(l) = logits.get_mut(id as usize) {
                *l -= p.presence_penalty + p.frequency_penalty * n as f32;
            }
        }
        if p.dry_multiplier > 0.0 {
            dry(logits, seen, p, &self.breakers, &mut s.repeats);
        }
        if p.repetition_penalty != 1.0 {
            let done = &mut s.done;
            done.clear();
            done.resize(logits.len(), false);
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
        let plain = |t: u32| (t, draft == Some(t));
        if p.is_greedy() {
            return plain(argmax(logits));
        }
        // Candidates sorted by logit, most likely first.
        let order = &mut s.order;
        order.clear();
        order.extend((0..logits.len() as u32).filter(|&i| logits[i as usize].is_finite()));
        if order.is_empty() {
            return plain(argmax(logits));
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
        let probs = &mut s.probs;
        probs.clear();
        probs.extend(
            order
                .iter()
                .map(|&i| ((logits[i as usize] as f64 - top) / t).exp()),
        );
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
        let (order, probs) = (&order[..keep], &mut probs[..keep]);
        let mut mass: f64 = probs.iter().sum();
        if let Some(d) = draft {
            if let Some(i) = order.iter().position(|&o| o == d) {
                let p_draft = probs[i] / mass;
                if self.rng.next_f64() < p_draft || p_draft >= 1.0 {
                    return (d, true);
                }
                mass -= probs[i];
                probs[i] = 0.0;
            }
        }
        let mut r = self.rng.next_f64() * mass;
        let mut last = order[0];
        for (i, &x) in probs.iter().enumerate() {
            if x == 0.0 {
                continue;
            }
            last = order[i];
            r -= x;
            if r < 0.0 {
                return (order[i], false);
            }
        }
        (last, false)
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

    /// DRY, by its definition: the token that would extend a repeat of
    /// three tokens (allowed two) loses multiplier · base¹; a breaker inside
    /// the repeat shortens it below the allowed length; the window of the
    /// last tokens limits the search.
    #[test]
    fn dry_penalises_the_token_that_extends_a_repeat() {
        let p = SamplingParams {
            dry_multiplier: 1.0,
            dry_base: 2.0,
            dry_allowed_length: 2,
            ..params(0.0)
        };
        let history = [1, 2, 3, 4, 1, 2, 3];
        let mut s = Sampler::new(p.clone(), 6);
        let mut logits = [0.0f32; 6];
        s.sample(&mut logits, &history);
        assert_eq!(logits, [0.0, 0.0, 0.0, 0.0, -2.0, 0.0]);
        // A longer repeat: 1 2 3 4 5 1 2 3 4 → 5 repeats four tokens: 2².
        let mut logits = [0.0f32; 6];
        s.sample(&mut logits, &[1, 2, 3, 4, 5, 1, 2, 3, 4]);
        assert_eq!(logits, [0.0, 0.0, 0.0, 0.0, 0.0, -4.0]);
        // Token 2 breaks sequences: the repeat is "3" alone, below two.
        s.set_breakers(std::sync::Arc::new([2].into()));
        let mut logits = [0.0f32; 6];
        s.sample(&mut logits, &history);
        assert_eq!(logits, [0.0; 6]);
        // Only the last three tokens are searched: no earlier occurrence.
        let mut s = Sampler::new(
            SamplingParams {
                dry_penalty_last_n: 3,
                ..p
            },
            6,
        );
        let mut logits = [0.0f32; 6];
        s.sample(&mut logits, &history);
        assert_eq!(logits, [0.0; 6]);
    }

    /// Bias, then presence and frequency penalties from the generated
    /// tokens, exactly as defined, before the choice.
    #[test]
    fn bias_and_penalties_shift_the_logits_exactly() {
        let mut s = Sampler::new(
            SamplingParams {
                logit_bias: vec![(2, -5.0), (9, 1.0)],
                presence_penalty: 0.5,
                frequency_penalty: 0.25,
                ..params(0.0)
            },
            4,
        );
        let mut logits = [2.0, 1.9, 3.0, 1.0];
        // Nothing generated yet: only the bias (id 9 is out of range).
        assert_eq!(s.sample(&mut logits, &[]), 0);
        assert_eq!(logits, [2.0, 1.9, -2.0, 1.0]);
        s.observe(0);
        s.observe(0);
        s.observe(3);
        let mut logits = [2.0, 1.9, 3.0, 1.0];
        // Token 0: 2 − 0.5 − 2 · 0.25; token 3: 1 − 0.5 − 0.25.
        assert_eq!(s.sample(&mut logits, &[]), 1);
        assert_eq!(logits, [1.0, 1.9, -2.0, 0.25]);
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

    /// Verifying a draft leaves each token's probability as it was: with
    /// the draft kept at p(d) and otherwise a draw without it.
    #[test]
    fn a_checked_draft_keeps_the_distribution() {
        let logits = [2.0f32, 1.5, 1.0, 0.2, -1.0, -3.0];
        for (p, draft) in [
            (params(1.0), 0u32),
            (params(1.0), 3),
            (params(0.7), 5),
            (
                SamplingParams {
                    top_k: 4,
                    top_p: 0.9,
                    ..params(1.3)
                },
                2,
            ),
        ] {
            let n = 60_000;
            let mut plain = Sampler::new(p.clone(), 6);
            let mut checked = Sampler::new(
                SamplingParams {
                    seed: 99,
                    ..p.clone()
                },
                6,
            );
            let (mut a, mut b) = ([0usize; 6], [0usize; 6]);
            let mut kept = 0;
            for _ in 0..n {
                a[plain.sample(&mut logits.clone(), &[]) as usize] += 1;
                let (t, is_draft) = checked.choose(&mut logits.clone(), &[], Some(draft));
                assert_eq!(is_draft, t == draft);
                kept += is_draft as usize;
                b[t as usize] += 1;
            }
            for i in 0..6 {
                let (fa, fb) = (a[i] as f64 / n as f64, b[i] as f64 / n as f64);
                assert!(
                    (fa - fb).abs() < 0.01,
                    "{p:?} draft {draft}: token {i}: {fa} vs {fb}"
                );
            }
            assert_eq!(kept, b[draft as usize]);
        }
        // Greedy: the draft is kept exactly when it is the argmax.
        let mut g = Sampler::new(params(0.0), 6);
        assert_eq!(g.choose(&mut logits.clone(), &[], Some(0)), (0, true));
        assert_eq!(g.choose(&mut logits.clone(), &[], Some(1)), (0, false));
    }
}
