//! Training files out: the accepted items as `{"messages": [user,
//! assistant]}` lines (LongWriter-6k's format), optionally mixed with general
//! SFT data and shuffled with a seed.

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::instructions::jsonl;
use crate::store::{DataStore, Status};
use crate::DataError;

/// How `export` writes its file.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub output: PathBuf,
    /// General SFT data (`{"messages": …}` lines) to mix in.
    pub mix: Option<PathBuf>,
    /// General examples per long-output example (capped by the file's size).
    pub mix_ratio: f64,
    /// Shuffle seed (lines are shuffled whenever a seed is given or data is mixed).
    pub seed: Option<u64>,
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Exported {
    pub long: usize,
    pub general: usize,
}

/// SplitMix64: small, seedable, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// Writes the accepted items (and mixed-in general data) as chat JSONL.
pub fn export(store: &DataStore, opts: &ExportOptions) -> Result<Exported, DataError> {
    let mut lines: Vec<String> = Vec::new();
    for item in store.items(Some(Status::Accepted))? {
        let document = item.document.clone().unwrap_or_default();
        lines.push(
            json!({"messages": [
                {"role": "user", "content": item.prompt},
                {"role": "assistant", "content": document},
            ]})
            .to_string(),
        );
    }
    let long = lines.len();
    let mut rng = Rng(opts.seed.unwrap_or(0));
    let mut general = 0;
    if let Some(path) = &opts.mix {
        if !(opts.mix_ratio >= 0.0 && opts.mix_ratio.is_finite()) {
            return Err(DataError::Invalid(format!(
                "--mix-ratio must be a number ≥ 0, not {}",
                opts.mix_ratio
            )));
        }
        let mut pool = Vec::new();
        for (line, v) in jsonl(path)? {
            if !v.get("messages").is_some_and(Value::is_array) {
                return Err(DataError::Input {
                    path: path.clone(),
                    line,
                    reason: "no \"messages\" array (general data must be chat JSONL)".into(),
                });
            }
            pool.push(v.to_string());
        }
        rng.shuffle(&mut pool);
        let want = ((long as f64 * opts.mix_ratio).round() as usize).min(pool.len());
        pool.truncate(want);
        general = pool.len();
        lines.extend(pool);
    }
    if opts.seed.is_some() || opts.mix.is_some() {
        rng.shuffle(&mut lines);
    }
    let mut text = lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    lw_core::write_atomic(&opts.output, text.as_bytes())?;
    Ok(Exported { long, general })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seeded_shuffle_is_a_permutation_and_repeatable() {
        let mut a: Vec<u32> = (0..50).collect();
        let mut b = a.clone();
        Rng(9).shuffle(&mut a);
        Rng(9).shuffle(&mut b);
        assert_eq!(a, b);
        assert_ne!(a, (0..50).collect::<Vec<_>>());
        a.sort();
        assert_eq!(a, (0..50).collect::<Vec<_>>());
    }
}
