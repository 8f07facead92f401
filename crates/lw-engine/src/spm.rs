//! SentencePiece tokenization as llama.cpp runs it for a GGUF vocabulary of
//! type `llama`: spaces become `▁` (with one in front when asked), the text
//! starts as one symbol per UTF-8 character, and the adjacent pair whose
//! concatenation is a token with the highest score is merged, again and
//! again (ties go to the leftmost pair). A symbol left that is not a token
//! becomes byte tokens `<0xXX>`.
//!
//! It sees one stretch of plain text: special tokens, BOS and EOS are the
//! vocabulary's business (`vocab`).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// The scores and byte tokens of a SentencePiece vocabulary.
pub struct Spm {
    scores: Vec<f32>,
    /// The token of each byte: `<0xXX>`, else the byte as a one-byte token,
    /// else the unknown token.
    byte_tokens: Vec<Option<u32>>,
}

/// One symbol of the text being merged: a byte range, linked to its
/// neighbours (merged-away symbols keep `len` 0).
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A pair of adjacent symbols whose concatenation is a token.
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    /// Bytes of the two symbols together when the pair was found; a
    /// different sum later means one of them has changed since.
    len: usize,
}

impl Ord for Candidate {
    /// The best candidate is the greatest: the highest score, then the
    /// leftmost.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.left.cmp(&self.left))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

impl Spm {
    /// `scores[i]` is token `i`'s; `ids` maps every token to its id.
    pub fn new(scores: Vec<f32>, ids: &HashMap<String, u32>, unknown: Option<u32>) -> Spm {
        let byte_tokens = (0..=255u8)
            .map(|b| {
                ids.get(&format!("<0x{b:02X}>"))
                    .or_else(|| std::str::from_utf8(&[b]).ok().and_then(|s| ids.get(s)))
                    .copied()
                    .or(unknown)
            })
            .collect();
        Spm {
            scores,
            byte_tokens,
        }
    }

    /// Appends the tokens of `text` to `out`; `space_prefix` puts a space in
    /// front first.
    pub fn encode(
        &self,
        ids: &HashMap<String, u32>,
        text: &str,
        space_prefix: bool,
        out: &mut Vec<u32>,
    ) {
        let mut escaped = String::with_capacity(text.len() + 3);
        if space_prefix {
            escaped.push(' ');
        }
        escaped.push_str(text);
        let text = escaped.replace(' ', "▁");
        if text.is_empty() {
            return;
        }
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (start, c) in text.char_indices() {
            let i = symbols.len();
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
            });
        }
        if let Some(last) = symbols.last_mut() {
            last.next = None;
        }
        let mut queue = BinaryHeap::new();
        let candidate = |symbols: &[Symbol], left: Option<usize>, right: Option<usize>| {
            let (left, right) = (left?, right?);
            let start = symbols[left].start;
            let len = symbols[left].len + symbols[right].len;
            let id = *ids.get(&text[start..start + len])?;
            let score = *self.scores.get(id as usize)?;
            Some(Candidate {
                score,
                left,
                right,
                len,
            })
        };
        for i in 1..symbols.len() {
            queue.extend(candidate(&symbols, Some(i - 1), Some(i)));
        }
        while let Some(best) = queue.pop() {
            let (l, r) = (symbols[best.left], symbols[best.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != best.len {
                continue; // a stale pair: one side was merged since
            }
            symbols[best.left].len += r.len;
            symbols[best.right].len = 0;
            symbols[best.left].next = r.next;
            if let Some(n) = r.next {
                symbols[n].prev = Some(best.left);
            }
            queue.extend(candidate(&symbols, l.prev, Some(best.left)));
            queue.extend(candidate(&symbols, Some(best.left), r.next));
        }
        let mut at = Some(0);
        while let Some(i) = at {
            let s = symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match ids.get(piece) {
                Some(&id) => out.push(id),
                None => out.extend(piece.bytes().filter_map(|b| self.byte_tokens[b as usize])),
            }
            at = s.next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(tokens: &[(&str, f32)]) -> (Spm, HashMap<String, u32>) {
        let ids: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, (t, _))| (t.to_string(), i as u32))
            .collect();
        let scores = tokens.iter().map(|t| t.1).collect();
        (Spm::new(scores, &ids, Some(0)), ids)
    }

    fn encode(spm: &Spm, ids: &HashMap<String, u32>, text: &str, prefix: bool) -> Vec<u32> {
        let mut out = Vec::new();
        spm.encode(ids, text, prefix, &mut out);
        out
    }

    #[test]
    fn the_best_scoring_pair_merges_first() {
        // "abc": "ab" (-1) beats "bc" (-2), then "abc" is not reachable from
        // "ab"+"c" unless it is a token.
        let (spm, ids) = vocab(&[
            ("<unk>", 0.0),
            ("a", -5.0),
            ("b", -5.0),
            ("c", -5.0),
            ("ab", -1.0),
            ("bc", -2.0),
        ]);
        assert_eq!(encode(&spm, &ids, "abc", false), [4, 3]);
        let (spm, ids) = vocab(&[
            ("<unk>", 0.0),
            ("a", -5.0),
            ("b", -5.0),
            ("c", -5.0),
            ("ab", -3.0),
            ("bc", -2.0),
        ]);
        assert_eq!(encode(&spm, &ids, "abc", false), [1, 5]);
    }

    #[test]
    fn ties_go_to_the_leftmost_pair() {
        let (spm, ids) = vocab(&[("<unk>", 0.0), ("a", -5.0), ("aa", -1.0)]);
        assert_eq!(encode(&spm, &ids, "aaa", false), [2, 1]);
    }

    #[test]
    fn spaces_become_the_marker_and_unknown_characters_bytes() {
        let mut tokens = vec![("<unk>".to_string(), 0.0)];
        tokens.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0)));
        tokens.extend([("▁".into(), -1.0), ("▁a".into(), -0.5), ("a".into(), -2.0)]);
        let refs: Vec<(&str, f32)> = tokens.iter().map(|(t, s)| (t.as_str(), *s)).collect();
        let (spm, ids) = vocab(&refs);
        let (space, space_a) = (ids["▁"], ids["▁a"]);
        assert_eq!(encode(&spm, &ids, "a a", true), [space_a, space_a]);
        // "é" is not a token: its two UTF-8 bytes are.
        assert_eq!(encode(&spm, &ids, " é", false), [space, 1 + 0xC3, 1 + 0xA9]);
        assert!(encode(&spm, &ids, "", false).is_empty());
    }
}
