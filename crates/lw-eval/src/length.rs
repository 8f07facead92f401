//! The length score S_l: per item, by length bucket, by type, overall.

use std::collections::BTreeMap;

use lw_core::words::length_score;
use lw_core::Counter;
use serde::Serialize;

use crate::items::Prediction;

/// LongBench-Write's buckets of required length, plus one for the ruler's
/// lengths beyond 20,000.
pub const BUCKETS: [&str; 5] = ["[0,500)", "[500,2k)", "[2k,4k)", "[4k,20k]", "(20k,+)"];

pub fn bucket_of(required: u64) -> &'static str {
    match required {
        0..500 => BUCKETS[0],
        500..2000 => BUCKETS[1],
        2000..4000 => BUCKETS[2],
        4000..=20000 => BUCKETS[3],
        _ => BUCKETS[4],
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ItemScore {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub bucket: &'static str,
    pub required: u64,
    pub produced: u64,
    pub score: f64,
    /// Generation failed: scored 0, and counted here.
    pub failed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Group {
    pub items: usize,
    pub score: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LengthReport {
    pub counter: &'static str,
    pub overall: f64,
    pub items_scored: usize,
    pub failed: usize,
    pub by_bucket: BTreeMap<&'static str, Group>,
    pub by_type: BTreeMap<String, Group>,
    pub items: Vec<ItemScore>,
}

fn groups<'a, K: Ord + Clone + 'a>(it: impl Iterator<Item = (K, f64)>) -> BTreeMap<K, Group> {
    let mut sums: BTreeMap<K, (usize, f64)> = BTreeMap::new();
    for (k, s) in it {
        let e = sums.entry(k).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += s;
    }
    sums.into_iter()
        .map(|(k, (n, s))| {
            (
                k,
                Group {
                    items: n,
                    score: s / n as f64,
                },
            )
        })
        .collect()
}

impl LengthReport {
    /// Scores every prediction, recounting each response with `counter`.
    pub fn new(preds: &[Prediction], counter: Counter) -> Self {
        let items: Vec<ItemScore> = preds
            .iter()
            .map(|p| {
                let produced = counter.count(&p.response) as u64;
                ItemScore {
                    id: p.id.clone(),
                    kind: p.kind.clone(),
                    bucket: bucket_of(p.length),
                    required: p.length,
                    produced,
                    score: length_score(p.length as f64, produced as f64),
                    failed: p.error.is_some(),
                }
            })
            .collect();
        let overall = if items.is_empty() {
            0.0
        } else {
            items.iter().map(|i| i.score).sum::<f64>() / items.len() as f64
        };
        LengthReport {
            counter: counter.name(),
            overall,
            items_scored: items.len(),
            failed: items.iter().filter(|i| i.failed).count(),
            by_bucket: groups(items.iter().map(|i| (i.bucket, i.score))),
            by_type: groups(items.iter().map(|i| (i.kind.clone(), i.score))),
            items,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pred(id: &str, kind: &str, length: u64, words: usize) -> Prediction {
        Prediction {
            id: id.into(),
            prompt: String::new(),
            kind: kind.into(),
            length,
            response: vec!["word"; words].join(" "),
            response_length: 0,
            counter: String::new(),
            mode: String::new(),
            prompt_tokens: 0,
            completion_tokens: 0,
            seconds: 0.0,
            error: None,
            extra: Default::default(),
        }
    }

    /// S_l stays in [0, 100] and peaks exactly where produced = required.
    #[test]
    fn the_length_score_is_bounded_and_maximal_at_the_required_length() {
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let required = (next() % 30_000 + 1) as f64;
            let produced = (next() % 120_000) as f64;
            let s = length_score(required, produced);
            assert!((0.0..=100.0).contains(&s), "{required} {produced}: {s}");
            assert!(s <= length_score(required, required));
            assert_eq!(length_score(required, required), 100.0);
            // Moving toward the required length never lowers the score.
            if produced == required {
                continue;
            }
            let closer = produced + (required - produced).signum();
            assert!(length_score(required, closer) >= s, "{required} {produced}");
        }
        assert_eq!(length_score(1000.0, 0.0), 0.0);
    }

    #[test]
    fn buckets_types_and_overall_are_means_of_item_scores() {
        let preds = vec![
            pred("a", "story", 1000, 2000), // 66.67
            pred("b", "story", 1000, 500),  // 50
            pred("c", "essay", 300, 300),   // 100
            pred("d", "essay", 5000, 0),    // 0
        ];
        let r = LengthReport::new(&preds, Counter::LongBench);
        assert!((r.overall - (200.0 / 3.0 + 50.0 + 100.0) / 4.0).abs() < 1e-9);
        assert_eq!(r.by_bucket["[500,2k)"].items, 2);
        assert!((r.by_bucket["[500,2k)"].score - (200.0 / 3.0 + 50.0) / 2.0).abs() < 1e-9);
        assert_eq!(r.by_bucket["[0,500)"].score, 100.0);
        assert_eq!(r.by_bucket["[4k,20k]"].score, 0.0);
        assert_eq!(r.by_type["essay"].score, 50.0);
        assert_eq!(r.items[3].produced, 0);
        assert_eq!(bucket_of(499), "[0,500)");
        assert_eq!(bucket_of(500), "[500,2k)");
        assert_eq!(bucket_of(20000), "[4k,20k]");
        assert_eq!(bucket_of(30000), "(20k,+)");
    }
}
