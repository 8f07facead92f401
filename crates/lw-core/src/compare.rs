//! Differences between float vectors for checks against oracles.
//!
//! `f32::max` drops NaN (`0.0f32.max(NaN) == 0.0`), so a fold of
//! differences with it counts a NaN logit or gradient as no difference at
//! all. These return +∞ as soon as either side holds a non-finite value,
//! so every bound checked against them fails instead.

/// max |a − b|; +∞ when a value on either side is NaN or infinite.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared vectors differ in length");
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(b) {
        if !x.is_finite() || !y.is_finite() {
            return f32::INFINITY;
        }
        worst = worst.max((x - y).abs());
    }
    worst
}

/// max |v|; +∞ when a value is NaN or infinite.
pub fn max_abs(v: &[f32]) -> f32 {
    let mut worst = 0f32;
    for x in v {
        if !x.is_finite() {
            return f32::INFINITY;
        }
        worst = worst.max(x.abs());
    }
    worst
}

/// max |a − b| / max |b| (relative to the reference `b`); +∞ when a value
/// on either side is non-finite.
pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let (diff, scale) = (max_abs_diff(a, b), max_abs(b));
    if !diff.is_finite() || !scale.is_finite() {
        return f32::INFINITY;
    }
    diff / scale.max(1e-12)
}

/// The worst of several differences; +∞ when any is NaN or infinite.
pub fn worst(diffs: impl IntoIterator<Item = f32>) -> f32 {
    let mut worst = 0f32;
    for d in diffs {
        if !d.is_finite() {
            return f32::INFINITY;
        }
        worst = worst.max(d);
    }
    worst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_are_never_a_small_difference() {
        assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.5, 2.0]), 0.5);
        assert_eq!(max_abs_diff(&[f32::NAN, 2.0], &[1.0, 2.0]), f32::INFINITY);
        assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.0, f32::NAN]), f32::INFINITY);
        assert_eq!(
            max_abs_diff(&[f32::INFINITY], &[f32::INFINITY]),
            f32::INFINITY
        );
        // What the old fold did: NaN vanished.
        assert_eq!(
            [0.5f32, f32::NAN].iter().fold(0.0, |m: f32, &d| m.max(d)),
            0.5
        );
        assert_eq!(worst([0.5, f32::NAN]), f32::INFINITY);
        assert_eq!(worst([0.5, 0.25]), 0.5);
        assert_eq!(max_rel_diff(&[2.0, 4.0], &[2.0, 5.0]), 0.2);
        assert_eq!(max_rel_diff(&[2.0], &[f32::NAN]), f32::INFINITY);
        assert_eq!(max_abs(&[-3.0, 2.0]), 3.0);
    }
}
