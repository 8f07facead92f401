//! The job store of a data build: `DIR/data.sqlite` holds every instruction,
//! its writing request, plan and run figures, each finished section, every
//! attempt (endpoint, timings, tokens, error) and each build session. Every
//! change is one transaction (WAL, synchronous=FULL), so a process killed at
//! any moment reruns with every finished section intact; a section is never
//! written twice and an instruction is stored once (keyed by the SHA-256 of
//! its text).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use lw_write::{Plan, Request, RunDirError, RunStore, State, Usage};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::instructions::Instruction;
use crate::DataError;

/// Where an item stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Not started, or put back (endpoint down, stopped, crash).
    Pending,
    /// Claimed by a worker of a live build (or of a build that was killed).
    Running,
    /// Written and through every quality gate.
    Accepted,
    /// Kept with the reason: a gate failed, or the run could not finish.
    Rejected,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Accepted => "accepted",
            Status::Rejected => "rejected",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Status::Pending,
            "running" => Status::Running,
            "accepted" => Status::Accepted,
            "rejected" => Status::Rejected,
            _ => return None,
        })
    }
}

/// An item as stored.
#[derive(Debug, Clone)]
pub struct ItemRow {
    pub id: String,
    /// Order of first addition.
    pub seq: i64,
    pub prompt: String,
    /// The instruction line's other fields.
    pub meta: serde_json::Map<String, serde_json::Value>,
    pub status: Status,
    /// 0 for the first run; each `--retry-rejected` starts a new round.
    pub round: u32,
    /// Rejection code (`length`, `repetition`, …) and detail.
    pub reason: Option<String>,
    pub detail: Option<String>,
    pub request: Option<Request>,
    pub plan: Option<Plan>,
    pub state: State,
    pub document: Option<String>,
    pub words: Option<usize>,
    pub endpoint: Option<String>,
    pub attempts: u32,
}

/// Figures of a store for `data stats`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub items: usize,
    pub pending: usize,
    pub running: usize,
    pub accepted: usize,
    pub rejected: usize,
    /// Rejection codes, most frequent first.
    pub reasons: Vec<(String, usize)>,
    /// Delivered words of accepted items.
    pub accepted_words: Vec<usize>,
    /// Tokens of every call so far, retries and unfinished items included.
    pub usage: Usage,
    pub attempts: usize,
    /// Attempts put back because an endpoint failed.
    pub endpoint_failures: usize,
    /// Wall time of all build sessions, seconds.
    pub session_seconds: f64,
    /// Items finished (accepted or rejected) and output tokens, over those sessions.
    pub session_items: usize,
    pub session_completion_tokens: usize,
}

impl Stats {
    pub fn items_per_hour(&self) -> Option<f64> {
        (self.session_seconds > 0.0)
            .then(|| self.session_items as f64 * 3600.0 / self.session_seconds)
    }

    pub fn output_tokens_per_second(&self) -> Option<f64> {
        (self.session_seconds > 0.0)
            .then(|| self.session_completion_tokens as f64 / self.session_seconds)
    }
}

/// Held while a build runs (see [`DataStore::lock_for_build`]).
pub struct BuildLock {
    _file: std::fs::File,
}

pub struct DataStore {
    conn: Mutex<Connection>,
    path: PathBuf,
}

pub(crate) fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The store's key of an instruction: SHA-256 of its trimmed text, hex.
pub fn content_id(prompt: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, prompt.trim().as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

const COLUMNS: &str = "id, seq, prompt, meta, status, round, reason, detail, request, plan, state, document, words, endpoint, attempts";

impl DataStore {
    /// Opens (or creates) `DIR/data.sqlite`.
    pub fn open(dir: &Path) -> Result<Self, DataError> {
        std::fs::create_dir_all(dir).map_err(|source| DataError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join("data.sqlite");
        let sql = |source| DataError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(sql)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA busy_timeout = 10000;
             CREATE TABLE IF NOT EXISTS items (
                 id TEXT PRIMARY KEY,
                 seq INTEGER NOT NULL,
                 prompt TEXT NOT NULL,
                 meta TEXT NOT NULL,
                 status TEXT NOT NULL,
                 round INTEGER NOT NULL DEFAULT 0,
                 reason TEXT,
                 detail TEXT,
                 request TEXT,
                 plan TEXT,
                 state TEXT,
                 document TEXT,
                 words INTEGER,
                 endpoint TEXT,
                 attempts INTEGER NOT NULL DEFAULT 0,
                 added REAL NOT NULL,
                 finished REAL
             );
             CREATE INDEX IF NOT EXISTS items_status ON items (status, seq);
             CREATE TABLE IF NOT EXISTS sections (
                 item TEXT NOT NULL REFERENCES items(id),
                 idx INTEGER NOT NULL,
                 text TEXT NOT NULL,
                 writes INTEGER NOT NULL DEFAULT 1,
                 PRIMARY KEY (item, idx)
             );
             CREATE TABLE IF NOT EXISTS attempts (
                 item TEXT NOT NULL,
                 round INTEGER NOT NULL,
                 session INTEGER NOT NULL,
                 endpoint TEXT NOT NULL,
                 started REAL NOT NULL,
                 ended REAL NOT NULL,
                 outcome TEXT NOT NULL,
                 error TEXT,
                 prompt_tokens INTEGER NOT NULL,
                 cached_tokens INTEGER NOT NULL,
                 completion_tokens INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS sessions (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 started REAL NOT NULL,
                 ended REAL NOT NULL
             );",
        )
        .map_err(sql)?;
        Ok(DataStore {
            conn: Mutex::new(conn),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the build lock of the store's directory (`build.lock`, an
    /// exclusive `flock`, released when the process ends, killed or not), so
    /// two builders never work on the same items.
    pub fn lock_for_build(&self) -> Result<BuildLock, DataError> {
        use std::os::fd::AsRawFd;
        let path = self.path.with_file_name("build.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| DataError::Io {
                path: path.clone(),
                source,
            })?;
        // SAFETY: flock on a descriptor this function owns.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::WouldBlock {
                return Err(DataError::Invalid(format!(
                    "{}: another data build is running on this directory",
                    path.parent().unwrap_or(&path).display()
                )));
            }
            return Err(DataError::Io { path, source: err });
        }
        Ok(BuildLock { _file: file })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, DataError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn).map_err(|source| DataError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }

    fn corrupt(&self, id: &str, field: &'static str, e: impl ToString) -> DataError {
        DataError::Corrupt {
            path: self.path.clone(),
            id: id.to_string(),
            field,
            reason: e.to_string(),
        }
    }

    /// Adds instructions not stored yet, in one transaction. Returns (added,
    /// already present).
    pub fn add(&self, instructions: &[Instruction]) -> Result<(usize, usize), DataError> {
        let added_at = now();
        self.with(|c| {
            let tx = c.transaction()?;
            let mut added = 0;
            {
                let next: i64 =
                    tx.query_row("SELECT COALESCE(MAX(seq), -1) + 1 FROM items", [], |r| {
                        r.get(0)
                    })?;
                let mut st = tx.prepare(
                    "INSERT OR IGNORE INTO items (id, seq, prompt, meta, status, added)
                     VALUES (?1, ?2, ?3, ?4, 'pending', ?5)",
                )?;
                for ins in instructions {
                    let meta = serde_json::Value::Object(ins.meta.clone()).to_string();
                    added += st.execute(params![
                        content_id(&ins.prompt),
                        next + added as i64,
                        ins.prompt.trim(),
                        meta,
                        added_at
                    ])?;
                }
            }
            tx.commit()?;
            Ok((added, instructions.len() - added))
        })
    }

    /// Items a killed build left running go back to pending.
    pub fn recover(&self) -> Result<usize, DataError> {
        self.with(|c| {
            c.execute(
                "UPDATE items SET status = 'pending' WHERE status = 'running'",
                [],
            )
        })
    }

    /// Rejected items start a new round: their plan, sections and figures
    /// are cleared (the attempts stay on record).
    pub fn retry_rejected(&self) -> Result<usize, DataError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "DELETE FROM sections WHERE item IN (SELECT id FROM items WHERE status = 'rejected')",
                [],
            )?;
            let n = tx.execute(
                "UPDATE items SET status = 'pending', round = round + 1, reason = NULL, detail = NULL,
                 request = NULL, plan = NULL, state = NULL, document = NULL, words = NULL, finished = NULL
                 WHERE status = 'rejected'",
                [],
            )?;
            tx.commit()?;
            Ok(n)
        })
    }

    /// Claims the first pending item for `endpoint`.
    pub fn claim(&self, endpoint: &str) -> Result<Option<ItemRow>, DataError> {
        let id = self.with(|c| {
            let tx = c.transaction()?;
            let id: Option<String> = tx
                .query_row(
                    "SELECT id FROM items WHERE status = 'pending' ORDER BY seq LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(id) = &id {
                tx.execute(
                    "UPDATE items SET status = 'running', endpoint = ?2, attempts = attempts + 1 WHERE id = ?1",
                    params![id, endpoint],
                )?;
            }
            tx.commit()?;
            Ok(id)
        })?;
        id.map(|id| self.item(&id)).transpose().map(Option::flatten)
    }

    /// Stores the writing request of an item's round (first claim only).
    pub fn set_request(&self, id: &str, request: &Request) -> Result<(), DataError> {
        let json = serde_json::to_string(request).expect("requests serialise");
        self.with(|c| {
            c.execute(
                "UPDATE items SET request = ?2 WHERE id = ?1",
                params![id, json],
            )
            .map(|_| ())
        })
    }

    /// Puts a running item back (endpoint down, stop).
    pub fn requeue(&self, id: &str) -> Result<(), DataError> {
        self.with(|c| {
            c.execute(
                "UPDATE items SET status = 'pending' WHERE id = ?1 AND status = 'running'",
                params![id],
            )
            .map(|_| ())
        })
    }

    /// Ends an item: accepted, or rejected with a reason.
    pub fn finish(
        &self,
        id: &str,
        status: Status,
        reason: Option<(&str, &str)>,
        words: Option<usize>,
    ) -> Result<(), DataError> {
        let (code, detail) = match reason {
            Some((c, d)) => (Some(c), Some(d)),
            None => (None, None),
        };
        self.with(|c| {
            c.execute(
                "UPDATE items SET status = ?2, reason = ?3, detail = ?4, words = ?5, finished = ?6 WHERE id = ?1",
                params![id, status.as_str(), code, detail, words.map(|w| w as i64), now()],
            )
            .map(|_| ())
        })
    }

    /// Starts a build session (for throughput figures); returns its id.
    pub fn start_session(&self) -> Result<i64, DataError> {
        let t = now();
        self.with(|c| {
            c.execute(
                "INSERT INTO sessions (started, ended) VALUES (?1, ?1)",
                params![t],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    pub fn touch_session(&self, session: i64) -> Result<(), DataError> {
        self.with(|c| {
            c.execute(
                "UPDATE sessions SET ended = ?2 WHERE id = ?1",
                params![session, now()],
            )
            .map(|_| ())
        })
    }

    /// Records one attempt at an item.
    #[allow(clippy::too_many_arguments)]
    pub fn record_attempt(
        &self,
        item: &ItemRow,
        session: i64,
        endpoint: &str,
        started: f64,
        outcome: &str,
        error: Option<&str>,
        usage: &Usage,
    ) -> Result<(), DataError> {
        let ended = now();
        self.with(|c| {
            c.execute(
                "INSERT INTO attempts (item, round, session, endpoint, started, ended, outcome, error,
                 prompt_tokens, cached_tokens, completion_tokens) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    item.id,
                    item.round,
                    session,
                    endpoint,
                    started,
                    ended,
                    outcome,
                    error,
                    usage.prompt_tokens as i64,
                    usage.cached_prompt_tokens as i64,
                    usage.completion_tokens as i64
                ],
            )?;
            c.execute("UPDATE sessions SET ended = ?2 WHERE id = ?1", params![session, ended])
                .map(|_| ())
        })
    }

    pub fn item(&self, id: &str) -> Result<Option<ItemRow>, DataError> {
        let raw = self.with(|c| {
            c.query_row(
                &format!("SELECT {COLUMNS} FROM items WHERE id = ?1"),
                params![id],
                raw_row,
            )
            .optional()
        })?;
        raw.map(|r| self.decode(r)).transpose()
    }

    /// Items in order of addition; only those of `status` when given.
    pub fn items(&self, status: Option<Status>) -> Result<Vec<ItemRow>, DataError> {
        let raws = self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {COLUMNS} FROM items WHERE (?1 IS NULL OR status = ?1) ORDER BY seq"
            ))?;
            let rows = st.query_map(params![status.map(|s| s.as_str())], raw_row)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        raws.into_iter().map(|r| self.decode(r)).collect()
    }

    pub fn count(&self, status: Status) -> Result<usize, DataError> {
        self.with(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM items WHERE status = ?1",
                params![status.as_str()],
                |r| r.get::<_, i64>(0),
            )
        })
        .map(|n| n as usize)
    }

    /// Finished sections of an item in order: (index, text).
    pub fn sections(&self, id: &str) -> Result<Vec<(usize, String)>, DataError> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT idx, text FROM sections WHERE item = ?1 ORDER BY idx")?;
            let rows = st.query_map(params![id], |r| {
                Ok((r.get::<_, i64>(0)? as usize, r.get::<_, String>(1)?))
            })?;
            rows.collect()
        })
    }

    /// The most times any section was written (1 unless something rewrote one).
    pub fn max_section_writes(&self) -> Result<u32, DataError> {
        self.with(|c| {
            c.query_row("SELECT COALESCE(MAX(writes), 0) FROM sections", [], |r| {
                r.get::<_, i64>(0)
            })
        })
        .map(|n| n as u32)
    }

    pub fn stats(&self) -> Result<Stats, DataError> {
        let mut s = Stats::default();
        let counts: Vec<(String, i64)> = self.with(|c| {
            let mut st = c.prepare("SELECT status, COUNT(*) FROM items GROUP BY status")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })?;
        for (status, n) in counts {
            let n = n as usize;
            s.items += n;
            match Status::parse(&status) {
                Some(Status::Pending) => s.pending += n,
                Some(Status::Running) => s.running += n,
                Some(Status::Accepted) => s.accepted += n,
                Some(Status::Rejected) => s.rejected += n,
                None => return Err(self.corrupt("?", "status", status)),
            }
        }
        s.reasons = self.with(|c| {
            let mut st = c.prepare(
                "SELECT reason, COUNT(*) AS n FROM items WHERE status = 'rejected'
                 GROUP BY reason ORDER BY n DESC, reason",
            )?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?
                        .unwrap_or_else(|| "unknown".into()),
                    r.get::<_, i64>(1)? as usize,
                ))
            })?;
            rows.collect()
        })?;
        s.accepted_words = self.with(|c| {
            let mut st =
                c.prepare("SELECT words FROM items WHERE status = 'accepted' ORDER BY seq")?;
            let rows =
                st.query_map(
                    [],
                    |r| Ok(r.get::<_, Option<i64>>(0)?.unwrap_or(0) as usize),
                )?;
            rows.collect()
        })?;
        let (attempts, failures, done) = self.with(|c| {
            c.query_row(
                "SELECT COUNT(*), COALESCE(SUM(outcome = 'endpoint-failed'), 0),
                 COALESCE(SUM(completion_tokens), 0) FROM attempts",
                [],
                three_ints,
            )
        })?;
        s.attempts = attempts as usize;
        s.endpoint_failures = failures as usize;
        // Tokens: each item's state holds those of its current round (killed
        // attempts included, as it is saved after every section); earlier
        // rounds are on record in the attempts.
        let (p, cached, out) = self.with(|c| {
            c.query_row(
                "SELECT COALESCE(SUM(a.prompt_tokens), 0), COALESCE(SUM(a.cached_tokens), 0),
                 COALESCE(SUM(a.completion_tokens), 0)
                 FROM attempts a JOIN items i ON a.item = i.id WHERE a.round < i.round",
                [],
                three_ints,
            )
        })?;
        s.usage = Usage {
            prompt_tokens: p as usize,
            cached_prompt_tokens: cached as usize,
            completion_tokens: out as usize,
        };
        let states: Vec<(String, String)> = self.with(|c| {
            let mut st = c.prepare("SELECT id, state FROM items WHERE state IS NOT NULL")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })?;
        for (id, state) in states {
            let state: State =
                serde_json::from_str(&state).map_err(|e| self.corrupt(&id, "state", e))?;
            s.usage.add(&state.usage);
        }
        let (seconds, items) = self.with(|c| {
            c.query_row(
                "SELECT COALESCE(SUM(ended - started), 0),
                 (SELECT COUNT(*) FROM attempts WHERE outcome IN ('accepted', 'rejected'))
                 FROM sessions",
                [],
                |r| Ok((r.get::<_, f64>(0)?, r.get::<_, i64>(1)?)),
            )
        })?;
        s.session_seconds = seconds;
        s.session_items = items as usize;
        s.session_completion_tokens = done as usize;
        Ok(s)
    }

    fn decode(&self, r: RawRow) -> Result<ItemRow, DataError> {
        let id = r.id;
        let status =
            Status::parse(&r.status).ok_or_else(|| self.corrupt(&id, "status", &r.status))?;
        let meta = match serde_json::from_str(&r.meta) {
            Ok(serde_json::Value::Object(m)) => m,
            Ok(_) => return Err(self.corrupt(&id, "meta", "not a JSON object")),
            Err(e) => return Err(self.corrupt(&id, "meta", e)),
        };
        let request = r
            .request
            .map(|p| serde_json::from_str(&p))
            .transpose()
            .map_err(|e| self.corrupt(&id, "request", e))?;
        let plan = r
            .plan
            .map(|p| serde_json::from_str(&p))
            .transpose()
            .map_err(|e| self.corrupt(&id, "plan", e))?;
        let state = r
            .state
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(|e| self.corrupt(&id, "state", e))?
            .unwrap_or_default();
        Ok(ItemRow {
            id,
            seq: r.seq,
            prompt: r.prompt,
            meta,
            status,
            round: r.round as u32,
            reason: r.reason,
            detail: r.detail,
            request,
            plan,
            state,
            document: r.document,
            words: r.words.map(|w| w as usize),
            endpoint: r.endpoint,
            attempts: r.attempts as u32,
        })
    }
}

struct RawRow {
    id: String,
    seq: i64,
    prompt: String,
    meta: String,
    status: String,
    round: i64,
    reason: Option<String>,
    detail: Option<String>,
    request: Option<String>,
    plan: Option<String>,
    state: Option<String>,
    document: Option<String>,
    words: Option<i64>,
    endpoint: Option<String>,
    attempts: i64,
}

fn three_ints(r: &rusqlite::Row) -> rusqlite::Result<(i64, i64, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
}

fn raw_row(r: &rusqlite::Row) -> rusqlite::Result<RawRow> {
    Ok(RawRow {
        id: r.get(0)?,
        seq: r.get(1)?,
        prompt: r.get(2)?,
        meta: r.get(3)?,
        status: r.get(4)?,
        round: r.get(5)?,
        reason: r.get(6)?,
        detail: r.get(7)?,
        request: r.get(8)?,
        plan: r.get(9)?,
        state: r.get(10)?,
        document: r.get(11)?,
        words: r.get(12)?,
        endpoint: r.get(13)?,
        attempts: r.get(14)?,
    })
}

/// One item seen as a writing run: the AgentWrite loop reads and saves its
/// plan, state and sections here.
pub struct ItemRun<'a> {
    pub store: &'a DataStore,
    pub id: String,
}

impl ItemRun<'_> {
    fn err(&self, e: DataError) -> RunDirError {
        RunDirError::Store(e.to_string())
    }

    fn column<T: serde::de::DeserializeOwned>(
        &self,
        name: &'static str,
    ) -> Result<Option<T>, RunDirError> {
        let raw: Option<String> = self
            .store
            .with(|c| {
                c.query_row(
                    &format!("SELECT {name} FROM items WHERE id = ?1"),
                    params![self.id],
                    |r| r.get(0),
                )
            })
            .map_err(|e| self.err(e))?;
        raw.map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(|e| self.err(self.store.corrupt(&self.id, name, e)))
    }

    fn set(&self, name: &'static str, value: &str) -> Result<(), RunDirError> {
        self.store
            .with(|c| {
                c.execute(
                    &format!("UPDATE items SET {name} = ?2 WHERE id = ?1"),
                    params![self.id, value],
                )
                .map(|_| ())
            })
            .map_err(|e| self.err(e))
    }
}

impl RunStore for ItemRun<'_> {
    fn request(&self) -> Result<Request, RunDirError> {
        self.column("request")?
            .ok_or_else(|| RunDirError::Store(format!("item {}: no request stored", self.id)))
    }
    fn plan(&self) -> Result<Option<Plan>, RunDirError> {
        self.column("plan")
    }
    fn save_plan(&self, plan: &Plan) -> Result<(), RunDirError> {
        self.set(
            "plan",
            &serde_json::to_string(plan).expect("plans serialise"),
        )
    }
    fn state(&self) -> Result<State, RunDirError> {
        Ok(self.column("state")?.unwrap_or_default())
    }
    fn save_state(&self, state: &State) -> Result<(), RunDirError> {
        self.set(
            "state",
            &serde_json::to_string(state).expect("states serialise"),
        )
    }
    fn section(&self, index: usize) -> Result<Option<String>, RunDirError> {
        self.store
            .with(|c| {
                c.query_row(
                    "SELECT text FROM sections WHERE item = ?1 AND idx = ?2",
                    params![self.id, index as i64],
                    |r| r.get(0),
                )
                .optional()
            })
            .map_err(|e| self.err(e))
    }
    fn save_section(&self, index: usize, text: &str) -> Result<(), RunDirError> {
        self.store
            .with(|c| {
                c.execute(
                    "INSERT INTO sections (item, idx, text) VALUES (?1, ?2, ?3)
                     ON CONFLICT (item, idx) DO UPDATE SET text = excluded.text, writes = writes + 1",
                    params![self.id, index as i64, text],
                )
                .map(|_| ())
            })
            .map_err(|e| self.err(e))
    }
    fn save_document(&self, text: &str) -> Result<(), RunDirError> {
        self.set("document", text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lw-data-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn ins(prompt: &str) -> Instruction {
        Instruction {
            prompt: prompt.into(),
            meta: Default::default(),
        }
    }

    #[test]
    fn instructions_are_stored_once_by_content_and_keep_their_order() {
        let dir = scratch("dedup");
        let store = DataStore::open(&dir).unwrap();
        assert_eq!(
            store.add(&[ins("a"), ins("b"), ins(" a ")]).unwrap(),
            (2, 1)
        );
        assert_eq!(store.add(&[ins("c"), ins("b")]).unwrap(), (1, 1));
        let prompts: Vec<String> = store
            .items(None)
            .unwrap()
            .into_iter()
            .map(|i| i.prompt)
            .collect();
        assert_eq!(prompts, ["a", "b", "c"]);
        drop(store);
        // Reopened, the same file adds nothing again.
        let store = DataStore::open(&dir).unwrap();
        assert_eq!(store.add(&[ins("a"), ins("b"), ins("c")]).unwrap(), (0, 3));
    }

    #[test]
    fn one_builder_at_a_time_holds_a_directory() {
        let dir = scratch("lock");
        let store = DataStore::open(&dir).unwrap();
        let held = store.lock_for_build().unwrap();
        let other = DataStore::open(&dir).unwrap();
        let err = other.lock_for_build().err().unwrap().to_string();
        assert!(err.contains("another data build is running"), "{err}");
        drop(held);
        assert!(other.lock_for_build().is_ok());
    }

    #[test]
    fn claims_take_items_in_order_and_a_crash_puts_them_back() {
        let dir = scratch("claim");
        let store = DataStore::open(&dir).unwrap();
        store.add(&[ins("first"), ins("second")]).unwrap();
        let a = store.claim("e1").unwrap().unwrap();
        let b = store.claim("e2").unwrap().unwrap();
        assert_eq!((a.prompt.as_str(), b.prompt.as_str()), ("first", "second"));
        assert!(store.claim("e1").unwrap().is_none());
        assert_eq!(store.recover().unwrap(), 2);
        let again = store.claim("e1").unwrap().unwrap();
        assert_eq!((again.prompt.as_str(), again.attempts), ("first", 2));
    }

    #[test]
    fn a_rewritten_section_is_counted_and_retrying_clears_the_round() {
        let dir = scratch("sections");
        let store = DataStore::open(&dir).unwrap();
        store.add(&[ins("x")]).unwrap();
        let id = content_id("x");
        let run = ItemRun {
            store: &store,
            id: id.clone(),
        };
        run.save_section(0, "one").unwrap();
        run.save_section(1, "two").unwrap();
        assert_eq!(store.max_section_writes().unwrap(), 1);
        run.save_section(1, "two again").unwrap();
        assert_eq!(store.max_section_writes().unwrap(), 2);
        store
            .finish(
                &id,
                Status::Rejected,
                Some(("length", "too short")),
                Some(3),
            )
            .unwrap();
        assert_eq!(store.retry_rejected().unwrap(), 1);
        let item = store.item(&id).unwrap().unwrap();
        assert_eq!(
            (item.status, item.round, item.reason),
            (Status::Pending, 1, None)
        );
        assert!(store.sections(&id).unwrap().is_empty());
    }
}
