//! Structured decoding: a [`Constraint`] (JSON Schema, regular expression,
//! GBNF or Lark grammar) compiled by llguidance against the model's
//! vocabulary into a per-token mask, applied to the logits before every
//! sampled token.
//!
//! The vocabulary goes to llguidance as each token's bytes (special tokens
//! marked, so a grammar never produces them); it is built once per model.
//! A generation holds one [`Guide`]: it masks a row of logits, takes the
//! chosen token and says when the grammar is complete.
//!
//! The next mask is computed off the decoding path: as soon as a token is
//! taken, the grammar state goes to the guide's own thread, which computes
//! the mask while the model computes the next logits; the mask is picked up
//! when those logits are ready.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{self, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use lw_core::Constraint;

use crate::error::EngineError;

/// A vocabulary's bytes, for llguidance.
struct Env {
    trie: TokTrie,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<toktrie::TokenId> {
        self.trie.greedy_tokenize(s)
    }
}

/// What a token stands for, for the grammar.
pub enum TokenText {
    /// Bytes of text.
    Bytes(Vec<u8>),
    /// A special token (its text): never produced by a grammar.
    Special(String),
}

/// The grammar compiler of one model's vocabulary.
pub struct Grammars {
    factory: ParserFactory,
    vocab: usize,
    eos: u32,
}

impl Grammars {
    /// Builds the compiler over `tokens` (one entry per id); `eos` is the
    /// id the grammar allows where it may end.
    pub fn new(tokens: Vec<TokenText>, eos: u32) -> Result<Self, EngineError> {
        let vocab = tokens.len();
        let words: Vec<Vec<u8>> = tokens
            .into_iter()
            .map(|t| match t {
                TokenText::Bytes(b) => b,
                TokenText::Special(s) => {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(s.as_bytes());
                    w
                }
            })
            .collect();
        let info = TokRxInfo::new(vocab as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(Env { trie });
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| EngineError::Grammar(format!("vocabulary: {e}")))?;
        factory.quiet();
        Ok(Grammars {
            factory,
            vocab,
            eos,
        })
    }

    /// Compiles `constraint` for one generation.
    pub fn guide(&self, constraint: &Constraint) -> Result<Guide, EngineError> {
        let grammar = top_level(constraint)?;
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| EngineError::Grammar(format!("{}: {e}", constraint.kind())))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(EngineError::Grammar(format!("{}: {e}", constraint.kind())));
        }
        let mut guide = Guide {
            state: State::Home(Box::new(matcher)),
            worker: None,
            vocab: self.vocab,
            eos: self.eos,
            seconds: 0.0,
            compute_seconds: 0.0,
        };
        // The first mask is computed while the prompt is.
        guide.send_ahead();
        Ok(guide)
    }

    /// Checks that `constraint` compiles (for a request's early 400).
    pub fn check(&self, constraint: &Constraint) -> Result<(), EngineError> {
        self.guide(constraint).map(|_| ())
    }
}

/// llguidance's grammar for a constraint.
fn top_level(constraint: &Constraint) -> Result<TopLevelGrammar, EngineError> {
    let bad = |e: String| EngineError::Grammar(format!("{}: {e}", constraint.kind()));
    Ok(match constraint {
        Constraint::JsonSchema(text) => {
            let schema: serde_json::Value =
                serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
            TopLevelGrammar::from_json_schema(compact(schema))
        }
        Constraint::JsonObject => {
            TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"})))
        }
        Constraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
        Constraint::Gbnf(src) => {
            TopLevelGrammar::from_lark(crate::gbnf::to_lark(src).map_err(|e| bad(e.to_string()))?)
        }
        Constraint::Lark(src) => TopLevelGrammar::from_lark(src.clone()),
    })
}

/// JSON with single spaces after `,` and `:` and no other whitespace
/// (unless the schema says otherwise in `x-guidance`): a small model given
/// free whitespace can spend its tokens on newlines.
fn compact(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(obj) = schema.as_object_mut() {
        obj.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            })
        });
    }
    schema
}

/// One generation's grammar state.
pub struct Guide {
    state: State,
    /// The thread computing masks ahead, started with the first one.
    worker: Option<Worker>,
    vocab: usize,
    eos: u32,
    /// Time the decoding path spent on masks: waiting for one computed
    /// ahead (or computing it, where none was) and applying it.
    pub seconds: f64,
    /// Time spent computing masks, on the decoding path or off it.
    pub compute_seconds: f64,
}

/// Where the grammar state is.
enum State {
    /// Here: no mask computed ahead.
    Home(Box<Matcher>),
    /// With the worker, computing the mask for the next token.
    Away,
    /// Between the two (only while a call that failed unwinds).
    Lost,
}

/// A mask computed ahead: the grammar state back, the mask (or llguidance's
/// error) and the seconds it took.
type Computed = (Box<Matcher>, Result<SimpleVob, String>, f64);

struct Worker {
    to: Sender<Box<Matcher>>,
    from: Receiver<Computed>,
}

impl Worker {
    fn start() -> Option<Worker> {
        let (to, inbox) = channel::<Box<Matcher>>();
        let (outbox, from) = channel::<Computed>();
        std::thread::Builder::new()
            .name("grammar-mask".into())
            .spawn(move || {
                // Ends when the guide (the sender) is dropped.
                while let Ok(mut matcher) = inbox.recv() {
                    let start = Instant::now();
                    let mask = matcher.compute_mask().map_err(|e| e.to_string());
                    let took = start.elapsed().as_secs_f64();
                    if outbox.send((matcher, mask, took)).is_err() {
                        break;
                    }
                }
            })
            .ok()?;
        Some(Worker { to, from })
    }
}

impl Guide {
    /// Hands the grammar state to the worker, which computes the next mask
    /// while the model runs (computed on the decoding path instead where
    /// no thread could be started).
    fn send_ahead(&mut self) {
        if self.worker.is_none() {
            self.worker = Worker::start();
        }
        let Some(worker) = &self.worker else { return };
        if let State::Home(matcher) = std::mem::replace(&mut self.state, State::Lost) {
            match worker.to.send(matcher) {
                Ok(()) => self.state = State::Away,
                Err(e) => {
                    self.state = State::Home(e.0);
                    self.worker = None;
                }
            }
        }
    }

    /// The grammar state back, with the mask computed ahead, if one was.
    fn bring_home(&mut self) -> Result<(&mut Matcher, Option<SimpleVob>), EngineError> {
        let mut computed = None;
        if let State::Away = self.state {
            let worker = self.worker.as_ref().expect("a state away has a worker");
            let (matcher, mask, took) = worker
                .from
                .recv()
                .map_err(|_| EngineError::Grammar("the grammar's mask thread ended".into()))?;
            self.compute_seconds += took;
            self.state = State::Home(matcher);
            computed = Some(mask.map_err(EngineError::Grammar)?);
        }
        match &mut self.state {
            State::Home(m) => Ok((m, computed)),
            _ => Err(EngineError::Grammar(
                "the grammar state was lost by an earlier error".into(),
            )),
        }
    }

    /// Sets the logits of tokens the grammar does not allow next to −∞.
    /// `eos` are the ids that end the generation: allowed together where
    /// the grammar may end. With `no_end`, they stay masked unless nothing
    /// else is allowed.
    pub fn mask(
        &mut self,
        logits: &mut [f32],
        eos: &[u32],
        no_end: bool,
    ) -> Result<(), EngineError> {
        let start = Instant::now();
        let (matcher, ahead) = self.bring_home()?;
        let mut mask = match ahead {
            Some(mask) => mask,
            None => {
                let computing = Instant::now();
                let mask = matcher
                    .compute_mask()
                    .map_err(|e| EngineError::Grammar(e.to_string()))?;
                self.compute_seconds += computing.elapsed().as_secs_f64();
                mask
            }
        };
        let may_end = mask.is_allowed(self.eos);
        let others = mask.num_set() > usize::from(may_end);
        let end_open = may_end && !(no_end && others);
        // The grammar's own end id is a marker, never a token; the model's
        // end ids follow the decision above.
        let known = mask.len().min(self.vocab);
        if (self.eos as usize) < known {
            mask.set(self.eos as usize, false);
        }
        for &e in eos {
            if (e as usize) < known {
                mask.set(e as usize, end_open);
            }
        }
        mask.iter_unset_entries(|id| {
            if let Some(l) = logits.get_mut(id) {
                *l = f32::NEG_INFINITY;
            }
        });
        for (id, l) in logits.iter_mut().enumerate().skip(known) {
            if !(end_open && eos.contains(&(id as u32))) {
                *l = f32::NEG_INFINITY;
            }
        }
        self.seconds += start.elapsed().as_secs_f64();
        Ok(())
    }

    /// Takes `token` (not an end-of-sequence id); `true` when the grammar
    /// is complete and nothing more may follow.
    pub fn take(&mut self, token: u32) -> Result<bool, EngineError> {
        // A mask computed ahead and not used (a speculative step's guess
        // was taken without one) is dropped.
        let (matcher, _) = self.bring_home()?;
        matcher
            .consume_token(token)
            .map_err(|e| EngineError::Grammar(format!("token {token}: {e}")))?;
        let stopped = matcher.is_stopped();
        if !stopped {
            self.send_ahead();
        }
        Ok(stopped)
    }
}
