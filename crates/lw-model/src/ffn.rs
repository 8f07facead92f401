//! The feed-forward half of a layer: one SwiGLU MLP, or a mixture of
//! experts (a router picks a few SwiGLU MLPs per token and sums their
//! outputs, weighted).
//!
//! In a step with several rows, each chosen expert runs once over all the
//! rows that chose it, so its weights are read once per step. A row's
//! result does not depend on the rows beside it: the products give the same
//! bits for any number of rows, and a row adds its experts' outputs in
//! ascending expert order (as transformers does).

use crate::activation::{gate_mul_into, Gate};
use crate::error::ModelError;
use crate::linear::Linear;

/// gate and up projections stacked into one matrix.
pub(crate) struct Mlp {
    pub(crate) gate_up: Linear,
    pub(crate) down: Linear,
    /// Hidden units (the rows of `down`'s input).
    pub(crate) intermediate: usize,
    pub(crate) gate: Gate,
}

impl Mlp {
    /// `out = down(silu(gate(x)) · up(x))` over `n` rows of `x`.
    fn forward(
        &self,
        x: &[f32],
        n: usize,
        out: &mut Vec<f32>,
        s: &mut Buffers,
    ) -> Result<(), ModelError> {
        self.gate_up.forward_into(x, n, &mut s.gate_up)?;
        s.gated.resize(n * self.intermediate, 0.0);
        gate_mul_into(self.gate, &s.gate_up, self.intermediate, &mut s.gated);
        self.down.forward_into(&s.gated, n, out)
    }
}

/// Router and experts.
pub(crate) struct Moe {
    /// Expert scores, `[experts, hidden]`.
    pub(crate) router: Linear,
    pub(crate) experts: Vec<Mlp>,
    pub(crate) active: usize,
    pub(crate) normalize: bool,
}

pub(crate) enum Ffn {
    Dense(Mlp),
    Experts(Moe),
}

/// Buffers of the feed-forward step, kept from step to step.
#[derive(Default)]
pub(crate) struct Buffers {
    gate_up: Vec<f32>,
    gated: Vec<f32>,
    /// Router scores, `[rows, experts]`.
    scores: Vec<f32>,
    /// Each row's chosen experts and weights, `[rows, active]`.
    chosen: Vec<(usize, f32)>,
    /// The rows routed to one expert, their inputs and its outputs.
    routed: Vec<(usize, f32)>,
    input: Vec<f32>,
    output: Vec<f32>,
}

impl Ffn {
    /// Its weight matrices (every expert's).
    pub(crate) fn linears(&self) -> Box<dyn Iterator<Item = &Linear> + '_> {
        match self {
            Ffn::Dense(m) => Box::new([&m.gate_up, &m.down].into_iter()),
            Ffn::Experts(moe) => Box::new(
                std::iter::once(&moe.router)
                    .chain(moe.experts.iter().flat_map(|m| [&m.gate_up, &m.down])),
            ),
        }
    }

    /// Weight bytes one token reads: the MLP, or the router and the active
    /// experts (the experts are the same size).
    pub(crate) fn bytes_per_token(&self) -> usize {
        match self {
            Ffn::Dense(m) => m.gate_up.size_bytes() + m.down.size_bytes(),
            Ffn::Experts(moe) => {
                let expert = moe.experts[0].gate_up.size_bytes() + moe.experts[0].down.size_bytes();
                moe.router.size_bytes() + moe.active * expert
            }
        }
    }

    /// The feed-forward of `n` rows of `x` (`[n, hidden]`) into `out`.
    pub(crate) fn forward(
        &self,
        x: &[f32],
        n: usize,
        out: &mut Vec<f32>,
        s: &mut Buffers,
    ) -> Result<(), ModelError> {
        match self {
            Ffn::Dense(mlp) => mlp.forward(x, n, out, s),
            Ffn::Experts(moe) => moe.forward(x, n, out, s),
        }
    }
}

impl Moe {
    fn forward(
        &self,
        x: &[f32],
        n: usize,
        out: &mut Vec<f32>,
        s: &mut Buffers,
    ) -> Result<(), ModelError> {
        let hidden = x.len() / n;
        self.router.forward_into(x, n, &mut s.scores)?;
        let experts = s.scores.len() / n;
        s.chosen.clear();
        for row in s.scores.chunks_exact(experts) {
            choose(row, self.active, self.normalize, &mut s.chosen);
        }
        out.clear();
        out.resize(n * hidden, 0.0);
        for (e, expert) in self.experts.iter().enumerate() {
            s.routed.clear();
            s.routed.extend(
                s.chosen
                    .chunks_exact(self.active)
                    .enumerate()
                    .filter_map(|(r, c)| c.iter().find(|&&(i, _)| i == e).map(|&(_, w)| (r, w))),
            );
            if s.routed.is_empty() {
                continue;
            }
            let m = s.routed.len();
            s.input.clear();
            for &(r, _) in &s.routed {
                s.input.extend_from_slice(&x[r * hidden..(r + 1) * hidden]);
            }
            let mut output = std::mem::take(&mut s.output);
            let input = std::mem::take(&mut s.input);
            let done = expert.forward(&input, m, &mut output, s);
            s.input = input;
            s.output = output;
            done?;
            for (&(r, w), y) in s.routed.iter().zip(s.output.chunks_exact(hidden)) {
                for (o, &v) in out[r * hidden..(r + 1) * hidden].iter_mut().zip(y) {
                    *o += v * w;
                }
            }
        }
        Ok(())
    }
}

/// The `active` best experts of one row of router scores, with their
/// weights: the softmax over all experts, renormalised over the chosen
/// ones when `normalize`. Appended to `chosen` best first; ties go to the
/// lower index.
fn choose(scores: &[f32], active: usize, normalize: bool, chosen: &mut Vec<(usize, f32)>) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f32 = scores.iter().map(|&v| (v - max).exp()).sum();
    let start = chosen.len();
    for _ in 0..active {
        let best = (0..scores.len())
            .filter(|i| !chosen[start..].iter().any(|&(c, _)| c == *i))
            .fold(None, |best: Option<usize>, i| match best {
                Some(b) if scores[b] >= scores[i] => Some(b),
                _ => Some(i),
            })
            .expect("active ≤ experts");
        chosen.push((best, (scores[best] - max).exp() / total));
    }
    if normalize {
        let sum: f32 = chosen[start..].iter().map(|&(_, w)| w).sum();
        for c in &mut chosen[start..] {
            c.1 /= sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_experts_are_chosen_and_weighted_by_the_softmax() {
        let scores = [1.0, 3.0, 2.0, 3.0];
        let mut chosen = Vec::new();
        choose(&scores, 2, false, &mut chosen);
        // Ties go to the lower index.
        assert_eq!(chosen.iter().map(|c| c.0).collect::<Vec<_>>(), [1, 3]);
        let total: f32 = scores.iter().map(|&v| (v - 3.0f32).exp()).sum();
        assert!((chosen[0].1 - 1.0 / total).abs() < 1e-7);
        chosen.clear();
        choose(&scores, 3, true, &mut chosen);
        assert_eq!(chosen.iter().map(|c| c.0).collect::<Vec<_>>(), [1, 3, 2]);
        let sum: f32 = chosen.iter().map(|c| c.1).sum();
        assert!((sum - 1.0).abs() < 1e-6);
        assert!((chosen[2].1 / chosen[0].1 - (-1.0f32).exp()).abs() < 1e-6);
    }
}
