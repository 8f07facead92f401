//! The job store: one SQLite file under the data directory holds every
//! long-writing job, its plan, its run figures and each finished section.
//! Each save is one transaction, so a server killed at any moment restarts
//! with every finished section intact, and a section is never written twice.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use lw_write::{Plan, Request, RunDirError, RunStore, State};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{}: another `serve` is using this data directory (one server per --data-dir)", path.display())]
    Locked { path: PathBuf },
    #[error("{}: job {id}: stored {field} is not valid: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        id: String,
        field: &'static str,
        reason: String,
    },
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Running,
    Finished,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Finished => "finished",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Status::Queued,
            "running" => Status::Running,
            "finished" => Status::Finished,
            "failed" => Status::Failed,
            "cancelled" => Status::Cancelled,
            _ => return None,
        })
    }

    /// Still to be run (after a restart too).
    pub fn is_open(self) -> bool {
        matches!(self, Status::Queued | Status::Running)
    }
}

/// A job as stored.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: String,
    pub owner: String,
    pub created: u64,
    pub status: Status,
    pub request: Request,
    pub plan: Option<Plan>,
    pub state: State,
    pub document: Option<String>,
    pub error: Option<String>,
}

pub struct JobStore {
    conn: Mutex<Connection>,
    path: PathBuf,
    /// `DIR/serve.lock`, locked while the store is open: SQLite would let
    /// two servers share the jobs, and both would run every open job.
    _lock: std::fs::File,
}

impl JobStore {
    /// Opens (or creates) `DIR/jobs.sqlite`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let lock_path = dir.join("serve.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| StoreError::Io {
                path: lock_path.clone(),
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    path: dir.to_path_buf(),
                })
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(StoreError::Io {
                    path: lock_path,
                    source,
                })
            }
        }
        let path = dir.join("jobs.sqlite");
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(sql)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS jobs (
                 id TEXT PRIMARY KEY,
                 owner TEXT NOT NULL,
                 created INTEGER NOT NULL,
                 status TEXT NOT NULL,
                 request TEXT NOT NULL,
                 plan TEXT,
                 state TEXT,
                 document TEXT,
                 error TEXT
             );
             CREATE TABLE IF NOT EXISTS sections (
                 job TEXT NOT NULL REFERENCES jobs(id),
                 idx INTEGER NOT NULL,
                 text TEXT NOT NULL,
                 writes INTEGER NOT NULL DEFAULT 1,
                 PRIMARY KEY (job, idx)
             );",
        )
        .map_err(sql)?;
        Ok(JobStore {
            _lock: lock,
            conn: Mutex::new(conn),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn).map_err(|source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }

    pub fn create(
        &self,
        id: &str,
        owner: &str,
        created: u64,
        request: &Request,
        plan: Option<&Plan>,
    ) -> Result<(), StoreError> {
        let request = serde_json::to_string(request).expect("requests serialise");
        let plan = plan.map(|p| serde_json::to_string(p).expect("plans serialise"));
        self.with(|c| {
            c.execute(
                "INSERT INTO jobs (id, owner, created, status, request, plan) VALUES (?1, ?2, ?3, 'queued', ?4, ?5)",
                params![id, owner, created as i64, request, plan],
            )
            .map(|_| ())
        })
    }

    pub fn set_status(
        &self,
        id: &str,
        status: Status,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE jobs SET status = ?2, error = ?3 WHERE id = ?1",
                params![id, status.as_str(), error],
            )
            .map(|_| ())
        })
    }

    fn corrupt(&self, id: &str, field: &'static str, e: impl ToString) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            id: id.to_string(),
            field,
            reason: e.to_string(),
        }
    }

    /// One job, or `None` if there is no such id.
    pub fn get(&self, id: &str) -> Result<Option<JobRow>, StoreError> {
        let raw = self.with(|c| {
            c.query_row(
                "SELECT id, owner, created, status, request, plan, state, document, error FROM jobs WHERE id = ?1",
                params![id],
                raw_row,
            )
            .optional()
        })?;
        raw.map(|r| self.decode(r)).transpose()
    }

    /// Jobs newest first; only `owner`'s when given.
    pub fn list(&self, owner: Option<&str>, limit: usize) -> Result<Vec<JobRow>, StoreError> {
        let raws = self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, owner, created, status, request, plan, state, document, error FROM jobs
                 WHERE (?1 IS NULL OR owner = ?1) ORDER BY created DESC, rowid DESC LIMIT ?2",
            )?;
            let rows = st.query_map(params![owner, limit as i64], raw_row)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        raws.into_iter().map(|r| self.decode(r)).collect()
    }

    /// Ids of jobs that were queued or running (to resume at start).
    pub fn open_jobs(&self) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id FROM jobs WHERE status IN ('queued', 'running') ORDER BY created, rowid",
            )?;
            let rows = st.query_map([], |r| r.get::<_, String>(0))?;
            rows.collect()
        })
    }

    /// Finished sections in order: (index, text).
    pub fn sections(&self, id: &str) -> Result<Vec<(usize, String)>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT idx, text FROM sections WHERE job = ?1 ORDER BY idx")?;
            let rows = st.query_map(params![id], |r| {
                Ok((r.get::<_, i64>(0)? as usize, r.get::<_, String>(1)?))
            })?;
            rows.collect()
        })
    }

    /// How many times each section was written (1 unless something rewrote it).
    pub fn section_writes(&self, id: &str) -> Result<Vec<(usize, u32)>, StoreError> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT idx, writes FROM sections WHERE job = ?1 ORDER BY idx")?;
            let rows = st.query_map(params![id], |r| {
                Ok((r.get::<_, i64>(0)? as usize, r.get::<_, i64>(1)? as u32))
            })?;
            rows.collect()
        })
    }

    fn decode(&self, r: RawRow) -> Result<JobRow, StoreError> {
        let id = r.id;
        let status =
            Status::parse(&r.status).ok_or_else(|| self.corrupt(&id, "status", &r.status))?;
        let request =
            serde_json::from_str(&r.request).map_err(|e| self.corrupt(&id, "request", e))?;
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
        Ok(JobRow {
            id,
            owner: r.owner,
            created: r.created as u64,
            status,
            request,
            plan,
            state,
            document: r.document,
            error: r.error,
        })
    }
}

struct RawRow {
    id: String,
    owner: String,
    created: i64,
    status: String,
    request: String,
    plan: Option<String>,
    state: Option<String>,
    document: Option<String>,
    error: Option<String>,
}

fn raw_row(r: &rusqlite::Row) -> rusqlite::Result<RawRow> {
    Ok(RawRow {
        id: r.get(0)?,
        owner: r.get(1)?,
        created: r.get(2)?,
        status: r.get(3)?,
        request: r.get(4)?,
        plan: r.get(5)?,
        state: r.get(6)?,
        document: r.get(7)?,
        error: r.get(8)?,
    })
}

/// One job's run state, as the writer sees it.
pub struct JobRun<'a> {
    pub store: &'a JobStore,
    pub id: &'a str,
}

impl JobRun<'_> {
    fn err(e: StoreError) -> RunDirError {
        RunDirError::Store(e.to_string())
    }

    fn row(&self) -> Result<JobRow, RunDirError> {
        self.store
            .get(self.id)
            .map_err(Self::err)?
            .ok_or_else(|| RunDirError::Store(format!("job {} is not in the store", self.id)))
    }

    fn set(&self, column: &'static str, value: String) -> Result<(), RunDirError> {
        let sql = format!("UPDATE jobs SET {column} = ?2 WHERE id = ?1");
        self.store
            .with(|c| c.execute(&sql, params![self.id, value]).map(|_| ()))
            .map_err(Self::err)
    }
}

impl RunStore for JobRun<'_> {
    fn request(&self) -> Result<Request, RunDirError> {
        Ok(self.row()?.request)
    }
    fn plan(&self) -> Result<Option<Plan>, RunDirError> {
        Ok(self.row()?.plan)
    }
    fn save_plan(&self, plan: &Plan) -> Result<(), RunDirError> {
        self.set(
            "plan",
            serde_json::to_string(plan).expect("plans serialise"),
        )
    }
    fn state(&self) -> Result<State, RunDirError> {
        Ok(self.row()?.state)
    }
    fn save_state(&self, state: &State) -> Result<(), RunDirError> {
        self.set(
            "state",
            serde_json::to_string(state).expect("states serialise"),
        )
    }
    fn section(&self, index: usize) -> Result<Option<String>, RunDirError> {
        self.store
            .with(|c| {
                c.query_row(
                    "SELECT text FROM sections WHERE job = ?1 AND idx = ?2",
                    params![self.id, index as i64],
                    |r| r.get(0),
                )
                .optional()
            })
            .map_err(Self::err)
    }
    fn save_section(&self, index: usize, text: &str) -> Result<(), RunDirError> {
        self.store
            .with(|c| {
                c.execute(
                    "INSERT INTO sections (job, idx, text) VALUES (?1, ?2, ?3)
                     ON CONFLICT (job, idx) DO UPDATE SET text = excluded.text, writes = writes + 1",
                    params![self.id, index as i64, text],
                )
                .map(|_| ())
            })
            .map_err(Self::err)
    }
    fn save_document(&self, text: &str) -> Result<(), RunDirError> {
        self.set("document", text.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_store_per_data_directory_at_a_time() {
        let dir = std::env::temp_dir().join(format!("lw-store-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = JobStore::open(&dir).unwrap();
        match JobStore::open(&dir) {
            Err(e @ StoreError::Locked { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("another `serve`") && msg.contains(&*dir.to_string_lossy()),
                    "{msg}"
                );
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a second store opened on the same directory"),
        }
        drop(first);
        JobStore::open(&dir).expect("free again once the first is closed");
    }
}
