//! Repetition in one response: seq-rep-n (1 − unique n-grams / n-grams),
//! distinct-n (unique / all), and the longest span that occurs twice, over
//! units that are words in space-separated scripts and characters in
//! Chinese and Japanese. Degenerate outputs (a model stuck in a loop) score
//! high on all three.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

/// seq-rep-4 above this, or a repeated span this long, marks a response degenerate.
pub const DEGENERATE_SEQ_REP_4: f64 = 0.3;
pub const DEGENERATE_SPAN: usize = 60;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Repetition {
    pub units: usize,
    pub seq_rep_4: f64,
    pub distinct_1: f64,
    pub distinct_2: f64,
    /// Units in the longest span that occurs at least twice.
    pub longest_repeat: usize,
    pub degenerate: bool,
}

/// The text as unit ids (equal units, equal ids; case folded).
pub fn units(text: &str) -> Vec<u32> {
    let mut ids: HashMap<String, u32> = HashMap::new();
    let mut out = Vec::new();
    let mut word = String::new();
    let mut push = |w: &str, out: &mut Vec<u32>| {
        let next = ids.len() as u32;
        out.push(*ids.entry(w.to_string()).or_insert(next));
    };
    for c in text.chars() {
        if lw_core::words::is_unspaced_script(c) {
            if !word.is_empty() {
                push(&word, &mut out);
                word.clear();
            }
            push(c.encode_utf8(&mut [0; 4]), &mut out);
        } else if c.is_alphanumeric() || c == '\'' || c == '’' {
            word.extend(c.to_lowercase());
        } else if !word.is_empty() {
            push(&word, &mut out);
            word.clear();
        }
    }
    if !word.is_empty() {
        push(&word, &mut out);
    }
    out
}

/// Fraction of n-grams that are repeats of an earlier one (0 when too short).
pub fn seq_rep(u: &[u32], n: usize) -> f64 {
    if n == 0 || u.len() < n {
        return 0.0;
    }
    let total = u.len() - n + 1;
    let unique: HashSet<&[u32]> = u.windows(n).collect();
    1.0 - unique.len() as f64 / total as f64
}

/// Fraction of n-grams that are distinct (1 when too short).
pub fn distinct(u: &[u32], n: usize) -> f64 {
    1.0 - seq_rep(u, n)
}

/// Whether some span of `len` units occurs twice.
fn repeats(u: &[u32], len: usize) -> bool {
    if len == 0 {
        return true;
    }
    if len >= u.len() {
        return false;
    }
    const B: u64 = 1_000_003;
    let mut pow = 1u64;
    for _ in 1..len {
        pow = pow.wrapping_mul(B);
    }
    let mut h = 0u64;
    for &x in &u[..len] {
        h = h.wrapping_mul(B).wrapping_add(x as u64 + 1);
    }
    let mut seen: HashMap<u64, Vec<usize>> = HashMap::new();
    for start in 0..=u.len() - len {
        if start > 0 {
            let out = u[start - 1] as u64 + 1;
            h = h.wrapping_sub(out.wrapping_mul(pow));
            h = h
                .wrapping_mul(B)
                .wrapping_add(u[start + len - 1] as u64 + 1);
        }
        let at = seen.entry(h).or_default();
        // Equal hashes are checked unit by unit.
        if at.iter().any(|&p| u[p..p + len] == u[start..start + len]) {
            return true;
        }
        at.push(start);
    }
    false
}

/// Length of the longest span that occurs at least twice (binary search:
/// a repeated span of length L contains repeated spans of every shorter length).
pub fn longest_repeat(u: &[u32]) -> usize {
    let (mut lo, mut hi) = (0usize, u.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if repeats(u, mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

impl Repetition {
    pub fn of(text: &str) -> Self {
        let u = units(text);
        let seq_rep_4 = seq_rep(&u, 4);
        let longest = longest_repeat(&u);
        Repetition {
            units: u.len(),
            seq_rep_4,
            distinct_1: distinct(&u, 1),
            distinct_2: distinct(&u, 2),
            longest_repeat: longest,
            degenerate: seq_rep_4 > DEGENERATE_SEQ_REP_4 || longest >= DEGENERATE_SPAN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_on_known_texts() {
        let u = units("the cat sat on the mat");
        assert_eq!(u.len(), 6);
        assert_eq!(seq_rep(&u, 4), 0.0);
        assert!((distinct(&u, 1) - 5.0 / 6.0).abs() < 1e-12);
        assert_eq!(longest_repeat(&u), 1);
        // "a b c d" four times: 13 four-grams, 4 distinct.
        let looped = "a b c d ".repeat(4);
        let u = units(&looped);
        assert!((seq_rep(&u, 4) - (1.0 - 4.0 / 13.0)).abs() < 1e-12);
        assert_eq!(longest_repeat(&u), 12);
        // Chinese counts characters; case is folded.
        assert_eq!(units("河流River river").len(), 4);
        assert_eq!(units("河流River river")[2], units("河流River river")[3]);
    }

    #[test]
    fn a_loop_is_degenerate_and_varied_text_is_not() {
        let varied: String = (0..400).map(|i| format!("w{} ", i * 7919 % 1013)).collect();
        let r = Repetition::of(&varied);
        assert!(!r.degenerate, "{r:?}");
        let stuck = format!("{varied}{}", "and then the river ran on ".repeat(30));
        let r = Repetition::of(&stuck);
        assert!(r.degenerate, "{r:?}");
        assert!(r.longest_repeat >= 6 * 29);
        assert_eq!(Repetition::of("").units, 0);
        assert!(!Repetition::of("").degenerate);
    }

    #[test]
    fn longest_repeat_matches_brute_force() {
        let mut x = 12345u64;
        for len in [0usize, 1, 5, 30, 90] {
            let u: Vec<u32> = (0..len)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((x >> 33) % 4) as u32
                })
                .collect();
            let brute = (0..=len)
                .rev()
                .find(|&l| {
                    l == 0
                        || (0..=len - l)
                            .any(|i| (i + 1..=len - l).any(|j| u[i..i + l] == u[j..j + l]))
                })
                .unwrap();
            assert_eq!(longest_repeat(&u), brute, "len {len}");
        }
    }
}
