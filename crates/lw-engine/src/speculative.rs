//! Speculative decoding: a cheap drafter guesses the next few tokens, the
//! model checks all of them in one forward pass (one read of the weights for
//! several tokens), and the tokens it agrees with are kept.
//!
//! Two drafters: prompt lookup (the longest recent n-gram of the text so far
//! that occurred before; what followed it then is the guess; free, and good
//! when the answer quotes its input), and a small draft model with the same
//! tokenizer, decoding greedily with its own KV cache.
//!
//! The verification rule ([`crate::sampler::Sampler::choose`]) keeps greedy
//! output identical to plain decoding and sampled output identically
//! distributed.

use std::sync::Arc;

use crate::error::EngineError;
use crate::model::Model;
use crate::sampler::argmax;
use crate::sequence::Sequence;

/// Which drafter proposes tokens, and how many at most per step: a setting
/// shared by every sequence (each drafts with a [`Drafter`] of its own).
#[derive(Clone)]
pub struct Speculation {
    kind: Kind,
    max_draft: usize,
}

#[derive(Clone)]
enum Kind {
    PromptLookup { max_ngram: usize },
    Model(Arc<DraftModel>),
}

struct DraftModel {
    model: Arc<Model>,
    id_bound: usize,
    prefill_chunk: usize,
}

/// Longest n-gram prompt lookup matches (a suffix of this many tokens).
const LOOKUP_NGRAM: usize = 3;

impl Speculation {
    /// Prompt-lookup drafting, up to `max_draft` tokens per step.
    pub fn prompt_lookup(max_draft: usize) -> Self {
        Speculation {
            kind: Kind::PromptLookup {
                max_ngram: LOOKUP_NGRAM,
            },
            max_draft: max_draft.max(1),
        }
    }

    /// Drafting with a small model that must share `target`'s tokenizer.
    pub fn draft_model(
        draft: impl Into<Arc<Model>>,
        target: &Model,
        max_draft: usize,
    ) -> Result<Self, EngineError> {
        let draft: Arc<Model> = draft.into();
        if !draft.tokenizer().same_vocabulary(target.tokenizer()) {
            return Err(EngineError::DraftTokenizer {
                draft: draft.model_dir().to_path_buf(),
                target: target.model_dir().to_path_buf(),
            });
        }
        let id_bound = draft.id_bound().min(target.id_bound());
        let prefill_chunk = draft.prefill_chunk();
        let model = draft;
        Ok(Speculation {
            kind: Kind::Model(Arc::new(DraftModel {
                model,
                id_bound,
                prefill_chunk,
            })),
            max_draft: max_draft.max(1),
        })
    }

    /// The drafter of a sequence that runs `params`: the one it kept from
    /// its last generation (a draft model's cache reuses its prefix) or a
    /// new one; none when the request opts out.
    pub(crate) fn drafter_for(
        spec: Option<&Speculation>,
        params: &lw_core::GenerationParams,
        kept: Option<Drafter>,
    ) -> Option<Drafter> {
        let spec = spec.filter(|_| !params.no_speculation)?;
        Some(kept.unwrap_or_else(|| Drafter {
            spec: spec.clone(),
            seq: None,
        }))
    }
}

/// One sequence's drafter: the setting, and a draft model's own sequence
/// (made at the first guess; its KV cache follows the text, reusing its
/// prefix from step to step).
pub(crate) struct Drafter {
    spec: Speculation,
    seq: Option<Sequence>,
}

impl Drafter {
    /// Guesses up to `limit` tokens that follow `history`.
    pub(crate) fn propose(
        &mut self,
        history: &[u32],
        limit: usize,
    ) -> Result<Vec<u32>, EngineError> {
        let limit = limit.min(self.spec.max_draft);
        if limit == 0 || history.is_empty() {
            return Ok(Vec::new());
        }
        match &self.spec.kind {
            Kind::PromptLookup { max_ngram } => Ok(lookup(history, *max_ngram, limit)),
            Kind::Model(m) => {
                let seq = self.seq.get_or_insert_with(|| m.model.new_sequence());
                m.propose(seq, history, limit)
            }
        }
    }
}

impl DraftModel {
    fn propose(
        &self,
        seq: &mut Sequence,
        history: &[u32],
        limit: usize,
    ) -> Result<Vec<u32>, EngineError> {
        // The draft cannot see beyond its own context.
        let room = self
            .model
            .context_length()
            .saturating_sub(history.len() + 1);
        let limit = limit.min(room);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (mut logits, _) = seq.prefill(self.model.model(), history, self.prefill_chunk)?;
        let mut drafts = Vec::with_capacity(limit);
        loop {
            let bound = self.id_bound.min(logits.len());
            let next = argmax(&logits[..bound]);
            drafts.push(next);
            if drafts.len() == limit {
                return Ok(drafts);
            }
            logits = seq.feed_last(self.model.model(), &[next])?;
        }
    }
}

/// Prompt lookup: for n from `max_ngram` down to 1, the last n tokens of
/// `history` are searched for earlier in it (latest occurrence first); the
/// tokens that followed the first match found, up to `limit`, are the guess.
pub fn lookup(history: &[u32], max_ngram: usize, limit: usize) -> Vec<u32> {
    let len = history.len();
    for n in (1..=max_ngram.min(len.saturating_sub(1))).rev() {
        let suffix = &history[len - n..];
        // Start positions of earlier occurrences, latest first; the match
        // must end before the suffix itself begins to follow it.
        for start in (0..len - n).rev() {
            if &history[start..start + n] == suffix {
                let from = start + n;
                let to = (from + limit).min(len);
                return history[from..to].to_vec();
            }
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_continues_the_latest_earlier_match_of_the_longest_suffix() {
        // "1 2 3 4 5 … 1 2 3" → 4 5 follow the earlier "1 2 3".
        let h = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3];
        assert_eq!(lookup(&h, 3, 2), vec![4, 5]);
        // The latest earlier occurrence wins: "7 8" then "7 6" → after "7": 6.
        let h = [7, 8, 0, 7, 6, 0, 7];
        assert_eq!(lookup(&h, 3, 1), vec![6]);
        // Longer n-grams are preferred over the latest single token.
        let h = [5, 1, 2, 3, 0, 2, 9, 0, 1, 2];
        assert_eq!(lookup(&h, 3, 1), vec![3]);
        // The guess stops at the end of the history.
        let h = [4, 4];
        assert_eq!(lookup(&h, 3, 5), vec![4]);
        assert!(lookup(&[1, 2, 3], 3, 4).is_empty());
        assert!(lookup(&[], 3, 4).is_empty());
    }
}
