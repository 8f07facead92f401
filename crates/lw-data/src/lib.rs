//! Long-output SFT data at scale (LongWriter-6k style): instructions in,
//! AgentWrite runs against one or more model endpoints, each item checked by
//! quality gates, everything kept in one SQLite job store so a killed build
//! reruns without redoing a finished section or duplicating an item.

pub mod build;
pub mod export;
pub mod gates;
pub mod instructions;
pub mod store;

pub use build::{build, BuildEvent, BuildOptions, BuildSummary, Endpoint, Limits, Planner};
pub use export::{export, ExportOptions};
pub use gates::{Gates, Rejection};
pub use instructions::{read_instructions, select, Instruction};
pub use store::{DataStore, ItemRow, Stats, Status};

/// Errors of the data commands, naming the file, line or item concerned.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Sqlite {
        path: std::path::PathBuf,
        source: rusqlite::Error,
    },
    #[error("{}:{line}: {reason}", path.display())]
    Input {
        path: std::path::PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{}: item {id}: stored {field} is not valid: {reason}", path.display())]
    Corrupt {
        path: std::path::PathBuf,
        id: String,
        field: &'static str,
        reason: String,
    },
    #[error(transparent)]
    Write(#[from] lw_write::RunDirError),
    #[error(transparent)]
    File(#[from] lw_core::WriteError),
    #[error("{0}")]
    Invalid(String),
}
