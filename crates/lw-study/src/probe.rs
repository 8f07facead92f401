//! Linear probes: multinomial logistic regression on feature vectors
//! (hidden states), fitted by full-batch gradient descent with L2
//! regularisation on standardised features. Deterministic: the same data
//! gives the same probe.

/// A fitted probe.
#[derive(Debug, Clone)]
pub struct Probe {
    classes: usize,
    dim: usize,
    mean: Vec<f64>,
    scale: Vec<f64>,
    /// `[class][dim]`, then one bias per class.
    weights: Vec<f64>,
    bias: Vec<f64>,
}

/// How a probe is fitted.
#[derive(Debug, Clone, Copy)]
pub struct ProbeOptions {
    pub epochs: usize,
    pub learning_rate: f64,
    /// L2 strength on the weights (not the biases).
    pub l2: f64,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            epochs: 300,
            learning_rate: 0.5,
            l2: 1e-3,
        }
    }
}

/// What is wrong with a probe's data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("no examples")]
    Empty,
    #[error("{features} feature vectors for {labels} labels")]
    Count { features: usize, labels: usize },
    #[error("example {index} has {got} features, the first has {want}")]
    Ragged {
        index: usize,
        got: usize,
        want: usize,
    },
    #[error("example {index} has label {label}, outside 0..{classes}")]
    Label {
        index: usize,
        label: usize,
        classes: usize,
    },
}

fn softmax_in_place(z: &mut [f64]) {
    let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for v in z.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in z.iter_mut() {
        *v /= sum;
    }
}

impl Probe {
    /// Fits a probe of `classes` classes to `xs` (one feature vector each)
    /// and their `labels`.
    pub fn fit(
        xs: &[Vec<f32>],
        labels: &[usize],
        classes: usize,
        o: &ProbeOptions,
    ) -> Result<Probe, ProbeError> {
        let n = xs.len();
        if n == 0 {
            return Err(ProbeError::Empty);
        }
        if labels.len() != n {
            return Err(ProbeError::Count {
                features: n,
                labels: labels.len(),
            });
        }
        let dim = xs[0].len();
        for (index, x) in xs.iter().enumerate() {
            if x.len() != dim {
                return Err(ProbeError::Ragged {
                    index,
                    got: x.len(),
                    want: dim,
                });
            }
        }
        for (index, &label) in labels.iter().enumerate() {
            if label >= classes {
                return Err(ProbeError::Label {
                    index,
                    label,
                    classes,
                });
            }
        }
        let mut mean = vec![0.0; dim];
        for x in xs {
            for (m, &v) in mean.iter_mut().zip(x) {
                *m += v as f64 / n as f64;
            }
        }
        let mut scale = vec![0.0; dim];
        for x in xs {
            for ((s, &v), m) in scale.iter_mut().zip(x).zip(&mean) {
                *s += (v as f64 - m).powi(2) / n as f64;
            }
        }
        for s in scale.iter_mut() {
            *s = if *s > 1e-12 { 1.0 / s.sqrt() } else { 0.0 };
        }
        let mut probe = Probe {
            classes,
            dim,
            mean,
            scale,
            weights: vec![0.0; classes * dim],
            bias: vec![0.0; classes],
        };
        let standard: Vec<Vec<f64>> = xs.iter().map(|x| probe.standardise(x)).collect();
        let mut p = vec![0.0; classes];
        for _ in 0..o.epochs {
            let mut gw = vec![0.0; classes * dim];
            let mut gb = vec![0.0; classes];
            for (x, &y) in standard.iter().zip(labels) {
                probe.logits_into(x, &mut p);
                softmax_in_place(&mut p);
                for c in 0..classes {
                    let err = p[c] - f64::from(c == y);
                    gb[c] += err;
                    for (g, &v) in gw[c * dim..(c + 1) * dim].iter_mut().zip(x) {
                        *g += err * v;
                    }
                }
            }
            for (w, g) in probe.weights.iter_mut().zip(&gw) {
                *w -= o.learning_rate * (g / n as f64 + o.l2 * *w);
            }
            for (b, g) in probe.bias.iter_mut().zip(&gb) {
                *b -= o.learning_rate * g / n as f64;
            }
        }
        Ok(probe)
    }

    fn standardise(&self, x: &[f32]) -> Vec<f64> {
        x.iter()
            .zip(&self.mean)
            .zip(&self.scale)
            .map(|((&v, m), s)| (v as f64 - m) * s)
            .collect()
    }

    fn logits_into(&self, x: &[f64], out: &mut [f64]) {
        for (c, o) in out.iter_mut().enumerate() {
            *o = self.bias[c]
                + self.weights[c * self.dim..(c + 1) * self.dim]
                    .iter()
                    .zip(x)
                    .map(|(w, v)| w * v)
                    .sum::<f64>();
        }
    }

    /// The most likely class of `x`.
    pub fn predict(&self, x: &[f32]) -> usize {
        let mut z = vec![0.0; self.classes];
        self.logits_into(&self.standardise(x), &mut z);
        (0..self.classes).fold(0, |best, c| if z[c] > z[best] { c } else { best })
    }

    /// The share of `xs` whose predicted class is their label.
    pub fn accuracy(&self, xs: &[Vec<f32>], labels: &[usize]) -> f64 {
        let hits = xs
            .iter()
            .zip(labels)
            .filter(|(x, &y)| self.predict(x) == y)
            .count();
        hits as f64 / xs.len().max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lw_core::rng::Rng;

    /// `n` points in `dim` dimensions around one of `classes` centres
    /// (Gaussian-ish noise from sums of uniforms).
    fn clusters(
        rng: &mut Rng,
        n: usize,
        dim: usize,
        classes: usize,
        spread: f64,
    ) -> (Vec<Vec<f32>>, Vec<usize>) {
        let centres: Vec<Vec<f64>> = (0..classes)
            .map(|_| (0..dim).map(|_| rng.next_f64() * 8.0 - 4.0).collect())
            .collect();
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for i in 0..n {
            let c = i % classes;
            let noise = |rng: &mut Rng| (0..4).map(|_| rng.next_f64() - 0.5).sum::<f64>() * spread;
            xs.push(centres[c].iter().map(|m| (m + noise(rng)) as f32).collect());
            ys.push(c);
        }
        (xs, ys)
    }

    #[test]
    fn separable_classes_are_learnt_and_shuffled_labels_stay_at_chance() {
        let mut rng = Rng::new(11);
        let (xs, ys) = clusters(&mut rng, 800, 16, 4, 0.8);
        let (train, test) = xs.split_at(600);
        let (ytrain, ytest) = ys.split_at(600);
        let probe = Probe::fit(train, ytrain, 4, &ProbeOptions::default()).unwrap();
        let acc = probe.accuracy(test, ytest);
        assert!(acc >= 0.98, "{acc}");
        // Labels shuffled against the features: held-out accuracy near
        // chance (1/4), whatever the probe memorised.
        let mut shuffled = ytrain.to_vec();
        for i in (1..shuffled.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            shuffled.swap(i, j);
        }
        let mut ytest_shuffled = ytest.to_vec();
        for i in (1..ytest_shuffled.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            ytest_shuffled.swap(i, j);
        }
        let probe = Probe::fit(train, &shuffled, 4, &ProbeOptions::default()).unwrap();
        let acc = probe.accuracy(test, &ytest_shuffled);
        assert!((acc - 0.25).abs() < 0.1, "{acc}");
    }

    #[test]
    fn bad_data_is_named() {
        let o = ProbeOptions::default();
        assert_eq!(Probe::fit(&[], &[], 2, &o).unwrap_err(), ProbeError::Empty);
        assert_eq!(
            Probe::fit(&[vec![1.0], vec![2.0]], &[0], 2, &o).unwrap_err(),
            ProbeError::Count {
                features: 2,
                labels: 1
            }
        );
        assert_eq!(
            Probe::fit(&[vec![1.0, 2.0], vec![1.0]], &[0, 1], 2, &o).unwrap_err(),
            ProbeError::Ragged {
                index: 1,
                got: 1,
                want: 2
            }
        );
        assert_eq!(
            Probe::fit(&[vec![1.0], vec![2.0]], &[0, 2], 2, &o).unwrap_err(),
            ProbeError::Label {
                index: 1,
                label: 2,
                classes: 2
            }
        );
    }
}
