//! The run directory: everything a writing run needs to resume, written
//! atomically (temporary file + rename), so a kill at any moment loses at
//! most the section in progress.
//!
//! ```text
//! DIR/request.json    what was asked (instruction, length, language, sampling)
//! DIR/plan.json       the plan
//! DIR/sections/NNN.md one file per finished section
//! DIR/state.json      per-section figures and totals
//! DIR/document.md     the sections joined by blank lines, when finished
//! ```

use std::path::{Path, PathBuf};

use lw_core::SamplingParams;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::length::Language;
use crate::model::Usage;
use crate::plan::Plan;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Plan, then write paragraph by paragraph.
    AgentWrite,
    /// One pass (models trained to write long).
    Direct,
}

impl Mode {
    /// The name in files, flags and requests.
    pub fn name(self) -> &'static str {
        match self {
            Mode::AgentWrite => "agentwrite",
            Mode::Direct => "direct",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Mode::AgentWrite, Mode::Direct]
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown mode \"{s}\" (agentwrite or direct)"))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub instruction: String,
    /// Length asked for, in words (characters for Chinese), when stated.
    pub asked_words: Option<u32>,
    pub language: Language,
    pub mode: Mode,
    pub sampling: SamplingParams,
    pub model: String,
}

/// Figures of one finished section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SectionRecord {
    pub index: usize,
    pub asked_words: u32,
    pub delivered_words: usize,
    pub usage: Usage,
    pub seconds: f64,
    pub attempts: usize,
    pub finish_reason: String,
    /// Byte offset in the text so far where the text shown to the model for
    /// this section started (0: all of it); a resume continues the window
    /// from there, as the run never interrupted did.
    #[serde(default)]
    pub shown_from: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub sections: Vec<SectionRecord>,
    /// Tokens of every call, the plan's included.
    pub usage: Usage,
    pub finished: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("{}: a run already exists here; resume it with --resume or choose another --out", path.display())]
    Exists { path: PathBuf },
    #[error("{}: not a run directory (no request.json)", path.display())]
    NotARun { path: PathBuf },
    #[error("job store: {0}")]
    Store(String),
}

/// Where a run keeps its state: a [`RunDir`] for the CLI, a database for
/// the server's jobs. Each save is atomic.
pub trait RunStore {
    fn request(&self) -> Result<Request, RunDirError>;
    fn plan(&self) -> Result<Option<Plan>, RunDirError>;
    fn save_plan(&self, plan: &Plan) -> Result<(), RunDirError>;
    fn state(&self) -> Result<State, RunDirError>;
    fn save_state(&self, state: &State) -> Result<(), RunDirError>;
    /// Text of a finished section, if saved.
    fn section(&self, index: usize) -> Result<Option<String>, RunDirError>;
    fn save_section(&self, index: usize, text: &str) -> Result<(), RunDirError>;
    fn save_document(&self, text: &str) -> Result<(), RunDirError>;
    /// Keeps the thinking of section `index` (a reasoning model's
    /// `<think>` block) beside the run; stores that keep none ignore it.
    fn save_thinking(&self, index: usize, text: &str) -> Result<(), RunDirError> {
        let _ = (index, text);
        Ok(())
    }
}

impl RunStore for RunDir {
    fn request(&self) -> Result<Request, RunDirError> {
        Ok(RunDir::open(&self.path)?.1)
    }
    fn plan(&self) -> Result<Option<Plan>, RunDirError> {
        self.read_json("plan.json")
    }
    fn save_plan(&self, plan: &Plan) -> Result<(), RunDirError> {
        self.write_json("plan.json", plan)
    }
    fn state(&self) -> Result<State, RunDirError> {
        Ok(self.read_json("state.json")?.unwrap_or_default())
    }
    fn save_state(&self, state: &State) -> Result<(), RunDirError> {
        self.write_json("state.json", state)
    }
    fn section(&self, index: usize) -> Result<Option<String>, RunDirError> {
        let p = self.section_path(index);
        match std::fs::read_to_string(&p) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&p, e)),
        }
    }
    fn save_section(&self, index: usize, text: &str) -> Result<(), RunDirError> {
        write_atomic(&self.section_path(index), text.as_bytes())
    }
    fn save_document(&self, text: &str) -> Result<(), RunDirError> {
        write_atomic(&self.document_path(), text.as_bytes())
    }
    fn save_thinking(&self, index: usize, text: &str) -> Result<(), RunDirError> {
        let path = self
            .path
            .join("thinking")
            .join(format!("{:03}.md", index + 1));
        let folder = self.path.join("thinking");
        std::fs::create_dir_all(&folder).map_err(|source| RunDirError::Io {
            path: folder,
            source,
        })?;
        write_atomic(&path, text.as_bytes())
    }
}

pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Starts a new run in `path` (created if missing; refused if it holds a run).
    pub fn create(path: &Path, request: &Request) -> Result<Self, RunDirError> {
        Self::create_with_plan(path, request, None)
    }

    /// Starts a new run with its plan given (`write --plan`). The request
    /// is written last: it marks the directory as a run, so a run killed
    /// while being created either does not exist or has its plan.
    pub fn create_with_plan(
        path: &Path,
        request: &Request,
        plan: Option<&Plan>,
    ) -> Result<Self, RunDirError> {
        if path.join("request.json").exists() {
            return Err(RunDirError::Exists {
                path: path.to_path_buf(),
            });
        }
        std::fs::create_dir_all(path.join("sections")).map_err(|e| io(path, e))?;
        let dir = RunDir {
            path: path.to_path_buf(),
        };
        dir.write_json("state.json", &State::default())?;
        if let Some(plan) = plan {
            dir.save_plan(plan)?;
        }
        dir.write_json("request.json", request)?;
        Ok(dir)
    }

    /// Opens an existing run.
    pub fn open(path: &Path) -> Result<(Self, Request), RunDirError> {
        if !path.join("request.json").exists() {
            return Err(RunDirError::NotARun {
                path: path.to_path_buf(),
            });
        }
        let dir = RunDir {
            path: path.to_path_buf(),
        };
        let request = dir
            .read_json("request.json")?
            .ok_or_else(|| RunDirError::NotARun {
                path: path.to_path_buf(),
            })?;
        Ok((dir, request))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn section_path(&self, index: usize) -> PathBuf {
        self.path
            .join("sections")
            .join(format!("{:03}.md", index + 1))
    }

    pub fn document_path(&self) -> PathBuf {
        self.path.join("document.md")
    }

    fn read_json<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, RunDirError> {
        let p = self.path.join(name);
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&p, e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| RunDirError::Corrupt {
                path: p,
                reason: e.to_string(),
            })
    }

    fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<(), RunDirError> {
        let text = serde_json::to_string_pretty(value).expect("run records serialise");
        write_atomic(&self.path.join(name), text.as_bytes())
    }
}

fn io(path: &Path, source: std::io::Error) -> RunDirError {
    RunDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// [`lw_core::write_atomic`], as this crate's error.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RunDirError> {
    lw_core::write_atomic(path, bytes).map_err(|e| RunDirError::Io {
        path: e.path,
        source: e.source,
    })
}

/// A directory name from the instruction's first words and the time.
pub fn default_run_name(instruction: &str, unix_secs: u64) -> String {
    let slug: String = instruction
        .chars()
        .map(|c| {
            if c.is_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect::<String>()
        .split('-')
        .filter(|w| !w.is_empty())
        .take(6)
        .collect::<Vec<_>>()
        .join("-");
    let slug: String = slug.chars().take(48).collect();
    format!(
        "{}-{unix_secs}",
        if slug.is_empty() {
            "run".to_string()
        } else {
            slug
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        Request {
            instruction: "Write a 1000-word essay.".into(),
            asked_words: Some(1000),
            language: Language::English,
            mode: Mode::AgentWrite,
            sampling: SamplingParams::default(),
            model: "m".into(),
        }
    }

    #[test]
    fn a_run_round_trips_and_refuses_to_be_created_twice() {
        let dir = std::env::temp_dir().join(format!("lw-rundir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let run = RunDir::create(&dir, &request()).unwrap();
        run.save_section(0, "First.").unwrap();
        assert_eq!(run.section(0).unwrap().as_deref(), Some("First."));
        assert_eq!(run.section(1).unwrap(), None);
        assert!(matches!(
            RunDir::create(&dir, &request()),
            Err(RunDirError::Exists { .. })
        ));
        let (_, req) = RunDir::open(&dir).unwrap();
        assert_eq!(req, request());
        // No temporary files are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(dir.join("sections"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        std::fs::write(dir.join("state.json"), "{ broken").unwrap();
        let err = run.state().unwrap_err().to_string();
        assert!(err.contains("state.json"), "{err}");
    }

    #[test]
    fn run_names_come_from_the_instruction() {
        assert_eq!(
            default_run_name("Write a 10000-word guide to tea!", 7),
            "write-a-10000-word-guide-to-7"
        );
        assert_eq!(default_run_name("!!!", 7), "run-7");
    }
}
