//! AgentWrite: plan a long piece as paragraphs with word budgets, then write
//! them one by one, each step seeing all the text so far.
//!
//! This crate owns the method (plans, prompts, runs); it knows nothing of
//! tensors, and reaches models only through a language-model interface.

pub mod http;
pub mod length;
pub mod model;
pub mod plan;
pub mod prompts;
pub mod run;
pub mod synth;
pub mod thinking;
pub mod window;
pub mod writer;

pub use http::{HttpModel, HttpOptions};
pub use length::{requested_length, Language};
pub use model::{
    BatchedModel, ChatRequest, ChatResponse, LanguageModel, LocalModel, ModelCallError, Traffic,
    Usage,
};
pub use plan::{parse_plan, Paragraph, Plan, PlanError};
pub use run::{Mode, Request, RunDir, RunDirError, RunStore, SectionRecord, State};
pub use writer::{
    make_plan, write, write_with_planner, Event, Summary, WriteError, WriteOptions,
    SECTION_DRY_MULTIPLIER,
};
