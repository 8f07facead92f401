//! The AgentWrite loop: plan (re-asked until it parses and fits the asked
//! length), then one call per paragraph, each seeing all the text so far.
//! Every finished section is saved before the next starts, so a run resumes
//! where it stopped and never repeats a finished section.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use lw_core::{Counter, FinishReason, Message, SamplingParams};

use crate::length::Language;
use crate::model::{ChatRequest, LanguageModel, ModelCallError, Traffic, Usage};
use crate::plan::{parse_plan, Plan, PlanError};
use crate::prompts;
use crate::run::{Mode, RunDirError, RunStore, SectionRecord};
use crate::thinking::split_thinking;

/// Knobs of a run.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Plans asked for before giving up.
    pub plan_tries: usize,
    /// Attempts per section when the text degenerates into a loop.
    pub section_attempts: usize,
    /// Counter for budgets and delivered lengths.
    pub counter: Counter,
    /// Keep a reasoning model's thinking (split off every section) in the
    /// run's `thinking/` folder; it never enters the document.
    pub keep_thinking: bool,
    /// Constrained AgentWrite: the plan decodes under a grammar of the
    /// asked shape (its budgets then scaled to the asked total), and each
    /// section under length control from its budget: no end before 90% of
    /// it, an end at the next sentence past 110%, a hard cap at 140% (in
    /// tokens, from the tokenizer's tokens per word moved towards what the
    /// run's sections spent: see [`calibrated`]).
    /// Backends without structured decoding get the plain requests.
    pub constrain: bool,
    /// When every attempt at a section falls into a loop, keep the last
    /// attempt without its loop (cut at a sentence end) instead of stopping
    /// the run. Data builds turn it off: such text is no training data.
    pub salvage_loops: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            plan_tries: 3,
            section_attempts: 3,
            counter: Counter::Unicode,
            keep_thinking: false,
            constrain: true,
            salvage_loops: true,
        }
    }
}

/// DRY's strength for AgentWrite's sections, twice llama.cpp's usual 0.8:
/// on SmolLM2-135M-Instruct (8 English prompts of 800–3,500 words) it
/// took the documents' repeated 4-grams from 0.29 to 0.14 and their
/// length score from 88 to 96.
pub const SECTION_DRY_MULTIPLIER: f32 = 1.6;

/// Share of a section's budget before which it may not end, after which
/// it ends at the next sentence, and at which it is cut.
const LENGTH_FLOOR: f64 = 0.9;
const LENGTH_SOFT_END: f64 = 1.1;
const LENGTH_CAP: f64 = 1.4;

/// The characters a section may use, as GBNF grammars (llama.cpp's
/// escapes, so HTTP backends read them too). A small model whose prose
/// degenerates falls into characters no writer of the language uses
/// (SmolLM2-135M, 9,000 tokens into a long English or Chinese piece: runs
/// of ＃（ＨＨＩ０６ — fullwidth letters, digits and symbols — and bytes that
/// make no character, which no reader takes for text and LongBench-Write
/// does not count); a model that writes the language never meets the
/// fence.
///
/// English: ASCII, Latin-1 and Latin Extended-A/B (names and loanwords),
/// Greek (science), general punctuation, currency, letterlike symbols,
/// number forms, arrows and mathematical operators.
pub const ENGLISH_SECTION_GRAMMAR: &str = "root ::= [\\t\\n\\r -~\\u00a0-\\u024f\\u0370-\\u03ff\\u2000-\\u206f\\u20a0-\\u20cf\\u2100-\\u22ff]*\n";

/// Chinese: the English set less Latin Extended and Greek, plus circled
/// numbers, CJK symbols and punctuation, the unified ideographs, and the
/// fullwidth forms Chinese prose writes (！（），．：；？～); no fullwidth
/// letters, digits or other symbols (＃＄＆＠Ｈ０…), kana, Hangul or rare
/// ideograph blocks.
pub const CHINESE_SECTION_GRAMMAR: &str = "root ::= [\\t\\n\\r -~\\u00a0-\\u00ff\\u2000-\\u206f\\u2100-\\u21ff\\u2460-\\u24ff\\u3000-\\u303f\\u4e00-\\u9fff\\uff01\\uff08\\uff09\\uff0c\\uff0e\\uff1a\\uff1b\\uff1f\\uff5e]*\n";

/// The constraint a section decodes under: its language's characters
/// ([`ENGLISH_SECTION_GRAMMAR`], [`CHINESE_SECTION_GRAMMAR`]).
fn section_constraint(language: Language) -> lw_core::Constraint {
    lw_core::Constraint::Gbnf(
        match language {
            Language::English => ENGLISH_SECTION_GRAMMAR,
            Language::Chinese => CHINESE_SECTION_GRAMMAR,
        }
        .into(),
    )
}

/// What happens during a run, for progress displays and event streams.
#[derive(Debug)]
pub enum Event<'a> {
    PlanReady {
        plan: &'a Plan,
        reused: bool,
    },
    SectionStart {
        index: usize,
        total: usize,
        asked_words: u32,
    },
    Delta {
        index: usize,
        text: &'a str,
    },
    /// The text so far outgrew the model's context: the step sees it from
    /// byte `shown_from` of `written` on.
    TextCut {
        index: usize,
        shown_from: usize,
        written: usize,
    },
    SectionRetry {
        index: usize,
        attempt: usize,
        reason: &'a str,
    },
    SectionDone {
        record: &'a SectionRecord,
        resumed: bool,
    },
    Finished {
        words: usize,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("no usable plan after {tries} tries; last problem: {last}")]
    Plan { tries: usize, last: PlanError },
    #[error("{step}: {source}")]
    Model {
        step: String,
        #[source]
        source: ModelCallError,
    },
    #[error("paragraph {index}: the text fell into a repeating loop in all {attempts} attempts")]
    Degenerate { index: usize, attempts: usize },
    #[error(
        "stopped; the finished sections are saved (document.md holds them), resume with --resume"
    )]
    Cancelled,
    #[error(transparent)]
    RunDir(#[from] RunDirError),
}

/// What a finished run produced.
#[derive(Debug, Clone)]
pub struct Summary {
    pub document: String,
    pub asked_words: Option<u32>,
    pub planned_words: u32,
    pub delivered_words: usize,
    /// Tokens of every call of the run, the plan's included…
    pub usage: Usage,
    /// …and of the plan's calls alone (what the run's total holds beyond
    /// its sections' records).
    pub plan_usage: Usage,
    /// Bytes the plan's calls and the sections' calls moved over the
    /// network in this invocation (see [`LanguageModel::traffic`]).
    pub plan_traffic: Traffic,
    pub write_traffic: Traffic,
    pub seconds: f64,
}

fn seed_for(base: u64, index: usize, attempt: usize) -> u64 {
    base.wrapping_add((index as u64) << 8)
        .wrapping_add(attempt as u64 * 7919)
}

/// Asks `model` for a plan until one parses and fits the asked length.
pub fn make_plan(
    model: &mut dyn LanguageModel,
    instruction: &str,
    asked: Option<u32>,
    lang: Language,
    sampling: &SamplingParams,
    opts: &WriteOptions,
    usage: &mut Usage,
) -> Result<Plan, WriteError> {
    let tries = opts.plan_tries;
    let constraint = opts
        .constrain
        .then(|| lw_core::Constraint::Gbnf(crate::plan::plan_grammar(asked, lang)));
    let mut problem: Option<PlanError> = None;
    for attempt in 0..tries.max(1) {
        let prompt = prompts::plan_prompt(
            instruction,
            asked,
            lang,
            problem.as_ref().map(|p| p.to_string()).as_deref(),
        );
        let request = ChatRequest {
            messages: vec![Message::user(prompt)],
            max_tokens: match constraint {
                Some(_) => crate::plan::plan_max_tokens(asked).max(2048),
                None => 2048,
            },
            sampling: SamplingParams {
                seed: sampling
                    .seed
                    .wrapping_add(0x706c_616e)
                    .wrapping_add(attempt as u64 * 7919),
                ..sampling.clone()
            },
            constraint: constraint.clone(),
            ..Default::default()
        };
        let response =
            model
                .complete(&request, &mut |_| true)
                .map_err(|source| WriteError::Model {
                    step: format!("plan (try {})", attempt + 1),
                    source,
                })?;
        usage.add(&response.usage);
        let (text, _thinking) = split_thinking(&response.text);
        let strict = constraint
            .as_ref()
            .and_then(|_| crate::plan::parse_strict(&text));
        let parsed = strict
            .map_or_else(|| parse_plan(&text, asked), Ok)
            .map(|mut p| {
                if let (Some(n), Some(_)) = (asked, &constraint) {
                    p.normalise(n);
                }
                p
            });
        match parsed.and_then(|p| p.check_length(asked).map(|_| p)) {
            Ok(plan) => return Ok(plan),
            Err(e) => problem = Some(e),
        }
    }
    Err(WriteError::Plan {
        tries: tries.max(1),
        last: problem.expect("at least one try"),
    })
}

/// Runs (or resumes) the writing run in `dir`. `stop` set by another thread
/// (Ctrl-C) ends the run after saving what is finished.
pub fn write(
    model: &mut dyn LanguageModel,
    dir: &dyn RunStore,
    opts: &WriteOptions,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(Event),
) -> Result<Summary, WriteError> {
    write_with_planner(model, None, dir, opts, stop, on_event)
}

/// [`write`] with the plan asked of `planner` where one is given (a strong
/// model, often far away, plans; `model` writes the sections, often
/// locally). A resumed run keeps the plan it has.
pub fn write_with_planner(
    model: &mut dyn LanguageModel,
    planner: Option<&mut dyn LanguageModel>,
    dir: &dyn RunStore,
    opts: &WriteOptions,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(Event),
) -> Result<Summary, WriteError> {
    let started = Instant::now();
    let request = dir.request()?;
    let mut state = dir.state()?;
    let mut plan_traffic = Traffic::default();
    let plan = match (request.mode, dir.plan()?) {
        (_, Some(plan)) => {
            on_event(Event::PlanReady {
                plan: &plan,
                reused: true,
            });
            plan
        }
        (Mode::Direct, None) => {
            let plan = Plan {
                paragraphs: vec![crate::plan::Paragraph {
                    main_point: "The whole piece in one pass".into(),
                    words: request.asked_words.unwrap_or(2000),
                }],
            };
            dir.save_plan(&plan)?;
            on_event(Event::PlanReady {
                plan: &plan,
                reused: false,
            });
            plan
        }
        (Mode::AgentWrite, None) => {
            let planner: &mut dyn LanguageModel = match planner {
                Some(p) => p,
                None => &mut *model,
            };
            let before = planner.traffic();
            let plan = make_plan(
                planner,
                &request.instruction,
                request.asked_words,
                request.language,
                &request.sampling,
                opts,
                &mut state.usage,
            )?;
            plan_traffic = planner.traffic().since(before);
            dir.save_plan(&plan)?;
            dir.save_state(&state)?;
            on_event(Event::PlanReady {
                plan: &plan,
                reused: false,
            });
            plan
        }
    };
    let total = plan.paragraphs.len();
    let write_from = model.traffic();
    // Length control's tokens per word: measured once per run.
    let per_word = match (request.mode, opts.constrain) {
        (Mode::AgentWrite, true) => model.tokens_per_word(request.language),
        _ => None,
    };
    let mut sections: Vec<String> = Vec::with_capacity(total);
    // Where the text so far shown to the model starts (see `window`).
    let mut window_start = 0;
    // On a stop, what is finished is assembled into document.md (the run
    // stays unfinished; a resume rewrites it at the end).
    let stopped = |sections: &[String]| -> WriteError {
        match dir.save_document(&sections.join("\n\n")) {
            Ok(()) => WriteError::Cancelled,
            Err(e) => WriteError::RunDir(e),
        }
    };
    for index in 0..total {
        if stop.load(Ordering::SeqCst) {
            return Err(stopped(&sections));
        }
        if let Some(text) = dir.section(index)? {
            if !state.sections.iter().any(|r| r.index == index) {
                // A section without its record (runs saved text first
                // before records did): the record is rebuilt from the
                // text (its usage and time are lost with the process that
                // spent them).
                state.sections.push(SectionRecord {
                    index,
                    asked_words: plan.paragraphs[index].words,
                    delivered_words: opts.counter.count(&text),
                    usage: Usage::default(),
                    seconds: 0.0,
                    attempts: 1,
                    finish_reason: "recovered".into(),
                    shown_from: window_start,
                });
                state.sections.sort_by_key(|r| r.index);
                dir.save_state(&state)?;
            }
            if let Some(record) = state.sections.iter().find(|r| r.index == index) {
                window_start = window_start.max(record.shown_from);
                on_event(Event::SectionDone {
                    record,
                    resumed: true,
                });
            }
            sections.push(text);
            continue;
        }
        // Records of sections whose text never landed (see below) are
        // dropped: this section is written again.
        state.sections.retain(|r| r.index < index);
        let asked_words = plan.paragraphs[index].words;
        on_event(Event::SectionStart {
            index,
            total,
            asked_words,
        });
        let written = sections.join("\n\n");
        let control = per_word.map(|t| asked_words as f64 * calibrated(t, &state.sections));
        let section_guard = (opts.constrain && request.mode == Mode::AgentWrite)
            .then(|| section_constraint(request.language));
        let answer = match (request.mode, control) {
            (Mode::Direct, _) => prompts::max_tokens_for(asked_words, request.language).max(4096),
            (Mode::AgentWrite, Some(tokens)) => (tokens * LENGTH_CAP).ceil() as usize + 16,
            (Mode::AgentWrite, None) => prompts::max_tokens_for(asked_words, request.language),
        };
        let build = |shown: &str| match request.mode {
            Mode::Direct => prompts::direct_prompt(&request.instruction),
            Mode::AgentWrite => {
                prompts::write_prompt(&request.instruction, &plan, shown, index, request.language)
            }
        };
        // Direct mode's budget is headroom and may shrink to what the context
        // leaves; a section keeps at least its push-to-end point.
        let min_answer = match (request.mode, control) {
            (Mode::Direct, _) => 1,
            (Mode::AgentWrite, Some(tokens)) => (tokens * LENGTH_SOFT_END).ceil() as usize,
            (Mode::AgentWrite, None) => answer,
        };
        let fitted =
            crate::window::fit_written(model, &build, &written, window_start, answer, min_answer);
        if fitted.start > window_start {
            on_event(Event::TextCut {
                index,
                shown_from: fitted.start,
                written: written.len(),
            });
        }
        window_start = fitted.start;
        let (prompt, max_tokens) = (fitted.prompt, fitted.max_tokens);
        let section_started = Instant::now();
        let mut usage = Usage::default();
        let mut attempt = 0;
        let (text, finish) = loop {
            attempt += 1;
            let req = ChatRequest {
                messages: vec![Message::user(prompt.clone())],
                max_tokens,
                sampling: SamplingParams {
                    seed: seed_for(request.sampling.seed, index, attempt - 1),
                    // A retry after a loop pushes harder against repeats:
                    // DRY doubled each time (from 0.4 if it was off).
                    dry_multiplier: match (attempt, request.sampling.dry_multiplier) {
                        (1, m) => m,
                        (_, m) => {
                            let base = if m > 0.0 { m } else { 0.4 };
                            base * 2f32.powi(attempt as i32 - 1)
                        }
                    },
                    ..request.sampling.clone()
                },
                min_tokens: control.map_or(0, |t| (t * LENGTH_FLOOR) as usize),
                end_after: control.map(|t| (t * LENGTH_SOFT_END) as usize),
                constraint: section_guard.clone(),
                ..Default::default()
            };
            let mut streamed = String::new();
            let mut looped = false;
            let result = model.complete(&req, &mut |delta| {
                streamed.push_str(delta);
                on_event(Event::Delta { index, text: delta });
                if is_degenerate(&streamed) {
                    looped = true;
                    return false;
                }
                !stop.load(Ordering::SeqCst)
            });
            match result {
                Ok(r) => {
                    usage.add(&r.usage);
                    break (r.text, r.finish_reason);
                }
                Err(ModelCallError::Cancelled) if looped => {
                    if attempt >= opts.section_attempts {
                        // The last attempt without its loop, where there is
                        // prose before it; else the run stops here.
                        match without_loop(&streamed).map(str::trim) {
                            Some(kept) if opts.salvage_loops && !kept.is_empty() => {
                                on_event(Event::SectionRetry {
                                    index,
                                    attempt,
                                    reason: "repeating loop cut off (no attempt left)",
                                });
                                break (kept.to_string(), FinishReason::Length);
                            }
                            _ => {
                                return Err(WriteError::Degenerate {
                                    index: index + 1,
                                    attempts: attempt,
                                })
                            }
                        }
                    }
                    on_event(Event::SectionRetry {
                        index,
                        attempt,
                        reason: "repeating loop",
                    });
                }
                Err(ModelCallError::Cancelled) => return Err(stopped(&sections)),
                Err(source) => {
                    return Err(WriteError::Model {
                        step: format!("paragraph {} of {total}", index + 1),
                        source,
                    })
                }
            }
        };
        let (text, thinking) = split_thinking(&text);
        let text = prompts::without_prompt_marks(&text);
        if opts.keep_thinking && !thinking.is_empty() {
            dir.save_thinking(index, &thinking)?;
        }
        let record = SectionRecord {
            index,
            asked_words,
            delivered_words: opts.counter.count(&text),
            usage: usage.clone(),
            seconds: section_started.elapsed().as_secs_f64(),
            attempts: attempt,
            finish_reason: finish_name(finish).to_string(),
            shown_from: window_start,
        };
        state.usage.add(&usage);
        state.sections.retain(|r| r.index != index);
        state.sections.push(record.clone());
        // The record goes first and the text commits it: a process killed
        // between the two leaves a record without text, which the resume
        // drops and writes again, so the tokens per word that length
        // control learns from the records are the same as in a run never
        // interrupted.
        dir.save_state(&state)?;
        dir.save_section(index, &text)?;
        on_event(Event::SectionDone {
            record: &record,
            resumed: false,
        });
        sections.push(text);
    }
    let document = sections.join("\n\n");
    dir.save_document(&document)?;
    state.finished = true;
    dir.save_state(&state)?;
    let delivered = opts.counter.count(&document);
    on_event(Event::Finished { words: delivered });
    let sections_usage = state.sections.iter().fold(Usage::default(), |mut u, r| {
        u.add(&r.usage);
        u
    });
    Ok(Summary {
        plan_usage: state.usage.since(&sections_usage),
        plan_traffic,
        write_traffic: model.traffic().since(write_from),
        document,
        asked_words: request.asked_words,
        planned_words: plan.total_words(),
        delivered_words: delivered,
        usage: state.usage,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn finish_name(f: FinishReason) -> &'static str {
    f.as_str()
}

/// Words the sample-prose figure counts for in [`calibrated`].
const PRIOR_WORDS: f64 = 100.0;

/// Tokens per word for a section's length control: the tokenizer's figure
/// on sample prose (`prior`), moved towards what this run's sections
/// spent (completion tokens over delivered words, for sections written in
/// one attempt), the sample counting as [`PRIOR_WORDS`] words. A small
/// model's prose (odd words, markup) takes more tokens a word than clean
/// sample text, and a floor in tokens set from the sample alone delivers
/// too few words. Kept within half and three times the prior.
pub fn calibrated(prior: f64, records: &[SectionRecord]) -> f64 {
    let (tokens, words) = records
        .iter()
        .filter(|r| r.attempts == 1 && r.usage.completion_tokens > 0 && r.delivered_words > 0)
        .fold((0.0, 0.0), |(t, w), r| {
            (
                t + r.usage.completion_tokens as f64,
                w + r.delivered_words as f64,
            )
        });
    ((prior * PRIOR_WORDS + tokens) / (PRIOR_WORDS + words)).clamp(prior * 0.5, prior * 3.0)
}

/// True when the text ends in a loop: its last units (words, or characters
/// for CJK) are one short sequence repeated at least four times; or in a
/// long run with no letter at all (a small model counting `1.2.3.4.5.…`,
/// which repeats no sequence).
pub fn is_degenerate(text: &str) -> bool {
    loop_period(&units(text)).is_some() || letterless_run(text).is_some()
}

/// Non-space characters a run without letters or ideographs must reach to
/// count as degenerate: longer than any number or formula prose holds.
const LETTERLESS_RUN: usize = 80;

/// Where the text's closing run without letters (or ideographs) starts,
/// when that run holds at least [`LETTERLESS_RUN`] non-space characters.
fn letterless_run(text: &str) -> Option<usize> {
    let mut seen = 0;
    for (i, c) in text.char_indices().rev() {
        if c.is_alphabetic() {
            return (seen >= LETTERLESS_RUN).then_some(i + c.len_utf8());
        }
        if !c.is_whitespace() {
            seen += 1;
        }
    }
    (seen >= LETTERLESS_RUN).then_some(0)
}

/// Words, or non-space characters for CJK text: the units loops are seen in.
fn units(text: &str) -> Vec<&str> {
    if Language::detect(text) == Language::Chinese {
        text.char_indices()
            .filter(|(_, c)| !c.is_whitespace())
            .map(|(i, c)| &text[i..i + c.len_utf8()])
            .collect()
    } else {
        text.split_whitespace().collect()
    }
}

/// The period of the loop the units end in, if they end in one.
fn loop_period(units: &[&str]) -> Option<usize> {
    const REPEATS: usize = 4;
    let max_period = 30.min(units.len() / REPEATS);
    (1..=max_period).find(|&p| {
        // Short periods must repeat longer before they count as a loop.
        let repeats = if p < 4 {
            12 / p.max(1) + REPEATS
        } else {
            REPEATS
        };
        if units.len() < p * repeats {
            return false;
        }
        let tail = &units[units.len() - p * repeats..];
        tail.chunks(p).all(|c| c == &tail[..p])
    })
}

/// A looping text without its loop: cut after the first copy of the
/// repeated sequence, then back to the last sentence end before that (the
/// whole cut text when it has none). `None` when the text does not loop.
pub fn without_loop(text: &str) -> Option<&str> {
    let units = units(text);
    let Some(p) = loop_period(&units) else {
        // A run without letters goes whole, back to the last sentence end
        // before it.
        return letterless_run(text).map(|start| at_sentence_end(text[..start].trim_end()));
    };
    // Where the repeats start: walk back while a unit equals the one a
    // period later.
    let mut start = units.len() - p;
    while start > 0 && units[start - 1] == units[start - 1 + p] {
        start -= 1;
    }
    let offset = |u: &str| u.as_ptr() as usize - text.as_ptr() as usize;
    let cut = match units.get(start + p) {
        Some(u) => offset(u),
        None => text.len(),
    };
    Some(at_sentence_end(text[..cut].trim_end()))
}

/// `kept` up to its last sentence end (all of it where it has none).
fn at_sentence_end(kept: &str) -> &str {
    let sentence = kept
        .char_indices()
        .rev()
        .find(|&(_, c)| matches!(c, '.' | '!' | '?' | '。' | '！' | '？'))
        .map(|(i, c)| i + c.len_utf8());
    match sentence {
        Some(end) => &kept[..end],
        None => kept,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_fences_keep_prose_and_refuse_what_degeneration_writes() {
        use crate::plan::tests::accepts;
        let g = CHINESE_SECTION_GRAMMAR;
        let prose = "## 第一章 河流\n\n春天来了，河水（很清）。“你好！”他说：\
                     AI 与 2024 年……《长江》、①～\t— café · 3.5%？";
        assert!(accepts(g, prose));
        assert!(accepts(g, ""));
        for garbage in [
            "＃",
            "ＨＨＩ",
            "２０２２",
            "＆",
            "カタ",
            "한국",
            "\u{3400}",
            "\u{20000}",
        ] {
            assert!(!accepts(g, &format!("烧烤{garbage}")), "{garbage}");
        }
        let g = ENGLISH_SECTION_GRAMMAR;
        assert!(accepts(
            g,
            "## The River\n\n“Café,” she said — 3.5% of €20 → α ≤ β…\t'ok'"
        ));
        for garbage in ["＃", "ＨＨＩ", "２０２２", "河", "カタ", "\u{FFFD}"] {
            assert!(!accepts(g, &format!("The river{garbage}")), "{garbage}");
        }
    }

    /// Records every request's constraint and answers plans and sections.
    struct Recorder(Vec<Option<lw_core::Constraint>>);

    impl LanguageModel for Recorder {
        fn name(&self) -> String {
            "recorder".into()
        }
        fn complete(
            &mut self,
            request: &ChatRequest,
            _on_text: &mut dyn FnMut(&str) -> bool,
        ) -> Result<crate::model::ChatResponse, ModelCallError> {
            self.0.push(request.constraint.clone());
            let text = if self.0.len() == 1 {
                "段落1 - 主要内容：河流的春天。 - 字数要求：300字\n".to_string()
            } else {
                "河".repeat(300)
            };
            Ok(crate::model::ChatResponse {
                text,
                finish_reason: FinishReason::Stop,
                usage: Usage::default(),
            })
        }
    }

    #[test]
    fn constrained_chinese_sections_decode_inside_the_fence() {
        for constrain in [true, false] {
            let dir =
                std::env::temp_dir().join(format!("lw-fence-{}-{constrain}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let request = crate::run::Request {
                instruction: "写一篇300字的关于河流的文章。".into(),
                asked_words: Some(300),
                language: Language::Chinese,
                mode: Mode::AgentWrite,
                sampling: SamplingParams::greedy(),
                model: "recorder".into(),
            };
            let run = crate::run::RunDir::create(&dir, &request).unwrap();
            let opts = WriteOptions {
                constrain,
                ..Default::default()
            };
            let mut model = Recorder(Vec::new());
            write(
                &mut model,
                &run,
                &opts,
                &AtomicBool::new(false),
                &mut |_| {},
            )
            .unwrap();
            assert_eq!(model.0.len(), 2);
            let section = model.0[1].clone();
            if constrain {
                assert_eq!(
                    section,
                    Some(lw_core::Constraint::Gbnf(CHINESE_SECTION_GRAMMAR.into()))
                );
            } else {
                assert_eq!(section, None);
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn tokens_per_word_move_towards_what_the_run_spent() {
        let record = |tokens: usize, words: usize, attempts: usize| SectionRecord {
            index: 0,
            asked_words: 400,
            delivered_words: words,
            usage: Usage {
                completion_tokens: tokens,
                ..Usage::default()
            },
            seconds: 1.0,
            attempts,
            finish_reason: "stop".into(),
            shown_from: 0,
        };
        // Nothing written yet: the sample's figure.
        assert_eq!(calibrated(1.3, &[]), 1.3);
        // 400 words for 700 tokens: (1.3 · 100 + 700) / (100 + 400) = 1.66.
        let one = calibrated(1.3, &[record(700, 400, 1)]);
        assert!((one - 1.66).abs() < 1e-9, "{one}");
        // A retried section (its tokens cover several attempts) and a
        // recovered one (no usage) do not count.
        assert_eq!(
            calibrated(
                1.3,
                &[record(700, 400, 1), record(5000, 100, 3), record(0, 300, 1)]
            ),
            one
        );
        // Kept within half and three times the prior.
        assert_eq!(calibrated(1.3, &[record(40_000, 400, 1)]), 1.3 * 3.0);
        assert_eq!(calibrated(1.3, &[record(10, 4000, 1)]), 1.3 * 0.5);
    }

    #[test]
    fn a_loop_is_cut_after_its_first_copy_at_a_sentence_end() {
        let text = format!(
            "The river rose in spring. The farmers watched. {}",
            "and then the river rose again ".repeat(6)
        );
        assert_eq!(
            without_loop(&text),
            Some("The river rose in spring. The farmers watched.")
        );
        let text = format!("It began. {}", "The water came back. ".repeat(8));
        assert_eq!(without_loop(&text), Some("It began. The water came back."));
        assert_eq!(without_loop("The river rose in spring."), None);
        let zh = format!("河水上涨了。{}", "我们一起走吧，".repeat(6));
        assert_eq!(without_loop(&zh), Some("河水上涨了。"));
    }

    #[test]
    fn loops_are_detected_and_prose_is_not() {
        let looped = format!(
            "The story begins. {}",
            "and then the river rose again ".repeat(5)
        );
        assert!(is_degenerate(&looped));
        assert!(is_degenerate(&format!(
            "开始。{}",
            "我们一起走吧，".repeat(5)
        )));
        assert!(is_degenerate(&"no ".repeat(20)));
        let prose =
            "The river rose in spring. The farmers watched it from the hills, and in the evening \
                     they went down to the banks to see how far the water had come.";
        assert!(!is_degenerate(prose));
        // A few repeated words are style, not a loop.
        assert!(!is_degenerate("It was very, very, very cold."));
    }

    #[test]
    fn a_long_run_without_letters_is_degenerate_and_cut_whole() {
        // What SmolLM2-135M wrote for a Chinese section behind a server.
        let counting: String = (1..=40).map(|n| format!("{n}.")).collect();
        let text = format!("江南的清晨下着小雨。现在说明，1. {counting}");
        assert!(is_degenerate(&text));
        assert_eq!(without_loop(&text), Some("江南的清晨下着小雨。"));
        let en = format!("The rain began at dawn. Then {counting}");
        assert!(is_degenerate(&en));
        assert_eq!(without_loop(&en), Some("The rain began at dawn."));
        // Figures inside prose are not a run: letters come back soon.
        let figures = "In 1998, 2003, 2007 and 2011 the river rose by 1.2, 3.4, 2.2 and 0.8 m; \
                       in 2015 by 4.1 m, and in 2019 (the worst year) by 5.6 m.";
        assert!(!is_degenerate(figures));
        let table = "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29";
        assert!(!is_degenerate(table), "under the run length");
    }
}
