//! AgentWrite: plan a long piece as paragraphs with word budgets, then write
//! them one by one, each step seeing all the text so far.
//!
//! This crate owns the method (plans, prompts, runs); it knows nothing of
//! tensors, and reaches models only through a language-model interface.

pub mod length;
pub mod plan;

pub use length::{requested_length, Language};
pub use plan::{parse_plan, Paragraph, Plan, PlanError};
