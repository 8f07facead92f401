//! Evaluation of long outputs, on the definitions of LongBench-Write: the
//! length score S_l per item and per bucket, the judge's quality score S_q,
//! the length ruler, and repetition metrics that flag degenerate text.
//!
//! This crate scores text; it does not generate it (`longwriter eval run`
//! does, through the same writing library as `longwriter write`).

pub mod items;
pub mod judge;
pub mod length;
pub mod mc;
pub mod repetition;
pub mod report;
pub mod run;

pub use items::{read_items, read_predictions, EvalError, Item, Prediction};
pub use judge::{
    judge_prompt, parse_judgement, quality_scores, JudgeParseError, Judgement, DIMENSIONS,
};
pub use length::{bucket_of, LengthReport, BUCKETS};
pub use mc::{read_mc_items, summarize, McItem, McResult, McSummary};
pub use repetition::Repetition;
pub use run::{latest_predictions, run, ModelFactory, RunOptions, RunSummary};
