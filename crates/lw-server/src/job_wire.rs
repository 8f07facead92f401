//! What the long-writing job routes send, as types: a job as it stands,
//! the list of jobs, a cancel answer, and the events a subscriber receives
//! (each numbered, so a client can tell where it is).

use serde::Serialize;

use crate::store::JobRow;

/// One paragraph of a job's plan.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct PlanPoint {
    pub main_point: String,
    pub words: u32,
}

impl PlanPoint {
    pub fn of(plan: &lw_write::Plan) -> Vec<PlanPoint> {
        plan.paragraphs
            .iter()
            .map(|p| PlanPoint {
                main_point: p.main_point.clone(),
                words: p.words,
            })
            .collect()
    }
}

/// A finished section.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Section {
    pub index: usize,
    pub text: String,
    pub words: usize,
}

/// The section being written and its text so far.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Current {
    pub index: Option<usize>,
    pub text: String,
}

#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct JobUsage {
    pub prompt_tokens: usize,
    pub cached_prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// A job: request, state, plan, finished sections, figures; while it runs,
/// the section being written (`current`) and the number of the last event
/// sent (`seq`).
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Job {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub status: &'static str,
    pub instruction: String,
    pub mode: &'static str,
    pub language: &'static str,
    pub model: String,
    pub asked_words: Option<u32>,
    pub planned_words: Option<u32>,
    pub delivered_words: usize,
    pub plan: Option<Vec<PlanPoint>>,
    pub sections: Vec<Section>,
    pub usage: JobUsage,
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current: Option<Current>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

/// One line of the job list.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct JobSummary {
    pub id: String,
    pub created: u64,
    pub status: &'static str,
    pub instruction: String,
    pub asked_words: Option<u32>,
    pub planned_words: Option<u32>,
    pub delivered_words: usize,
}

impl JobSummary {
    pub fn of(j: &JobRow) -> JobSummary {
        JobSummary {
            id: j.id.clone(),
            created: j.created,
            status: j.status.as_str(),
            instruction: j.request.instruction.clone(),
            asked_words: j.request.asked_words,
            planned_words: j.plan.as_ref().map(|p| p.total_words()),
            delivered_words: j.state.sections.iter().map(|s| s.delivered_words).sum(),
        }
    }
}

#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct JobList {
    pub object: &'static str,
    pub data: Vec<JobSummary>,
}

#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct CancelAnswer {
    pub id: String,
    pub cancelling: bool,
    pub status: &'static str,
}

/// What a subscriber receives, by `type`: the job so far first, then the
/// plan, each section's start, text deltas and end (or a retry), and one of
/// `finished`, `failed`, `cancelled`.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobEvent {
    Snapshot(Box<Job>),
    Plan {
        plan: Vec<PlanPoint>,
        planned_words: u32,
    },
    SectionStart {
        index: usize,
        total: usize,
        asked_words: u32,
    },
    Delta {
        index: usize,
        text: String,
    },
    SectionRetry {
        index: usize,
        reason: String,
    },
    SectionDone {
        index: usize,
        text: String,
        words: usize,
        asked_words: u32,
    },
    Finished {
        words: usize,
    },
    Cancelled,
    Failed {
        error: String,
    },
}

impl JobEvent {
    /// Whether the job ends with this event.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobEvent::Finished { .. } | JobEvent::Failed { .. } | JobEvent::Cancelled
        )
    }
}

/// An event with its number in the job's sequence.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Numbered {
    pub seq: u64,
    #[serde(flatten)]
    pub event: JobEvent,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_carry_their_type_and_number() {
        let e = Numbered {
            seq: 4,
            event: JobEvent::SectionStart {
                index: 1,
                total: 3,
                asked_words: 400,
            },
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"seq": 4, "type": "section_start", "index": 1, "total": 3, "asked_words": 400})
        );
        let c = serde_json::to_value(Numbered {
            seq: 9,
            event: JobEvent::Cancelled,
        })
        .unwrap();
        assert_eq!(c, json!({"seq": 9, "type": "cancelled"}));
        assert!(JobEvent::Cancelled.is_terminal());
        assert!(!JobEvent::Delta {
            index: 0,
            text: "a".into()
        }
        .is_terminal());
    }
}
