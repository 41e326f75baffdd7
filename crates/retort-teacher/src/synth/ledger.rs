//! The pipeline's state in SQLite. Every teacher request is a row keyed by the hash of its
//! content (prompt, sampling parameters, teacher): a finished row is never sent again nor
//! overwritten, so a run killed at any point and restarted completes every request exactly once,
//! and a changed pipeline re-sends only the requests whose content changed. Each answer is
//! committed (WAL, `synchronous = FULL`) before the next is handled.
//!
//! Tables (inspect with `sqlite3 ledger.sqlite`):
//! - `requests(key, stage, request, status, response, error, attempts, seconds, finished_at)`,
//!   `status` ∈ {done, failed}; a failed row is replaced when a later run succeeds;
//! - `items(hash, position, input, messages, expand_key, answer_key, status, detail, provenance)`:
//!   the inputs the current pipeline keeps and their answers, rewritten at the end of each run;
//!   `status` ∈ {answered, failed}; teacher outputs are never edited here;
//! - `meta(key, value)`: the last run's funnel report.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::error::Result;
use crate::teacher::{Generation, Outcome};

pub const SCHEMA_VERSION: i64 = 1;

pub struct Ledger {
    conn: Connection,
}

/// A finished request as stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    Done(Vec<Generation>),
    Failed(String),
}

/// One row of `items`.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemRow {
    pub hash: String,
    pub position: usize,
    pub input: String,
    pub messages: Option<String>,
    pub expand_key: String,
    pub answer_key: Option<String>,
    pub status: String,
    pub detail: Option<String>,
    pub provenance: String,
}

impl Ledger {
    pub fn open(path: &Path) -> Result<Ledger> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS requests (
                 key TEXT PRIMARY KEY,
                 stage TEXT NOT NULL,
                 request TEXT NOT NULL,
                 status TEXT NOT NULL CHECK (status IN ('done', 'failed')),
                 response TEXT,
                 error TEXT,
                 attempts INTEGER NOT NULL,
                 seconds REAL NOT NULL,
                 finished_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')));
             CREATE TABLE IF NOT EXISTS items (
                 hash TEXT PRIMARY KEY,
                 position INTEGER NOT NULL,
                 input TEXT NOT NULL,
                 messages TEXT,
                 expand_key TEXT NOT NULL,
                 answer_key TEXT,
                 status TEXT NOT NULL,
                 detail TEXT,
                 provenance TEXT NOT NULL);",
        )?;
        let v: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        match v {
            None => {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)",
                    params![SCHEMA_VERSION.to_string()],
                )?;
            }
            Some(v) if v == SCHEMA_VERSION.to_string() => {}
            Some(v) => {
                return Err(crate::error::Error::invalid(
                    format!(
                        "ledger `{}` has schema version {v}; this retort reads {SCHEMA_VERSION}",
                        path.display()
                    ),
                    "use the retort version that wrote it, or start over in a new --out directory",
                ));
            }
        }
        Ok(Ledger { conn })
    }

    /// The stored outcome of request `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<Stored>> {
        let row: Option<(String, Option<String>, Option<String>)> = self
            .conn
            .query_row(
                "SELECT status, response, error FROM requests WHERE key = ?1",
                params![key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        Ok(row.map(|(status, response, error)| {
            // A row the pipeline cannot read back counts as failed, so a rerun asks again.
            match (status.as_str(), response) {
                ("done", Some(r)) => match serde_json::from_str(&r) {
                    Ok(g) => Stored::Done(g),
                    Err(e) => Stored::Failed(format!("unreadable stored response: {e}")),
                },
                ("done", None) => Stored::Failed("stored as done without a response".into()),
                _ => Stored::Failed(error.unwrap_or_else(|| "(no reason stored)".into())),
            }
        }))
    }

    pub fn is_done(&self, key: &str) -> Result<bool> {
        let status: Option<String> = self
            .conn
            .query_row(
                "SELECT status FROM requests WHERE key = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()?;
        Ok(status.as_deref() == Some("done"))
    }

    /// Record the outcome of request `key`. A `done` row is final: recording again is a no-op
    /// (returns `false`), so a request can never be stored twice.
    pub fn record(
        &self,
        key: &str,
        stage: &str,
        request: &impl serde::Serialize,
        outcome: &Outcome,
        seconds: f64,
    ) -> Result<bool> {
        let req = serde_json::to_string(request).map_err(std::io::Error::from)?;
        let (status, response, error, attempts) = match outcome {
            Ok(g) => (
                "done",
                Some(serde_json::to_string(g).map_err(std::io::Error::from)?),
                None,
                1,
            ),
            Err(f) => ("failed", None, Some(f.reason.clone()), f.attempts as i64),
        };
        let n = self.conn.execute(
            "INSERT INTO requests (key, stage, request, status, response, error, attempts, seconds)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(key) DO UPDATE SET
                 status = excluded.status, response = excluded.response, error = excluded.error,
                 attempts = requests.attempts + excluded.attempts, seconds = excluded.seconds,
                 finished_at = excluded.finished_at
             WHERE requests.status = 'failed'",
            params![key, stage, req, status, response, error, attempts, seconds],
        )?;
        Ok(n == 1)
    }

    /// Rows of `requests` per (stage, status).
    pub fn request_counts(&self) -> Result<Vec<(String, String, usize)>> {
        let mut st = self.conn.prepare("SELECT stage, status, COUNT(*) FROM requests GROUP BY stage, status ORDER BY stage, status")?;
        let rows = st.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as usize))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Replace `items` with `rows` in one transaction.
    pub fn write_items(&mut self, rows: &[ItemRow]) -> Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM items", [])?;
        {
            let mut st = tx.prepare(
                "INSERT INTO items (hash, position, input, messages, expand_key, answer_key, status, detail, provenance)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for r in rows {
                st.execute(params![
                    r.hash,
                    r.position as i64,
                    r.input,
                    r.messages,
                    r.expand_key,
                    r.answer_key,
                    r.status,
                    r.detail,
                    r.provenance
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn items(&self) -> Result<Vec<ItemRow>> {
        let mut st = self.conn.prepare(
            "SELECT hash, position, input, messages, expand_key, answer_key, status, detail, provenance FROM items ORDER BY position",
        )?;
        let rows = st.query_map([], |r| {
            Ok(ItemRow {
                hash: r.get(0)?,
                position: r.get::<_, i64>(1)? as usize,
                input: r.get(2)?,
                messages: r.get(3)?,
                expand_key: r.get(4)?,
                answer_key: r.get(5)?,
                status: r.get(6)?,
                detail: r.get(7)?,
                provenance: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::teacher::{Failure, Finish};

    #[test]
    fn a_done_request_is_final_and_a_failed_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(&dir.path().join("l.sqlite")).unwrap();
        let g = vec![Generation {
            text: "hi".into(),
            finish: Finish::Stop,
            prompt_tokens: 3,
            completion_tokens: 1,
        }];
        let fail: Outcome = Err(Failure {
            reason: "HTTP 500".into(),
            attempts: 8,
        });
        assert!(l.record("k", "answer", &"req", &fail, 1.0).unwrap());
        assert_eq!(l.get("k").unwrap(), Some(Stored::Failed("HTTP 500".into())));
        assert!(
            l.record("k", "answer", &"req", &Ok(g.clone()), 1.0)
                .unwrap(),
            "failed → done"
        );
        let other = vec![Generation {
            text: "other".into(),
            ..g[0].clone()
        }];
        assert!(
            !l.record("k", "answer", &"req", &Ok(other), 1.0).unwrap(),
            "done is final"
        );
        assert!(!l.record("k", "answer", &"req", &fail, 1.0).unwrap());
        assert_eq!(l.get("k").unwrap(), Some(Stored::Done(g)));
        let attempts: i64 = l
            .connection()
            .query_row("SELECT attempts FROM requests WHERE key='k'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(attempts, 9);
        drop(l);
        // Reopened: the same state.
        let l = Ledger::open(&dir.path().join("l.sqlite")).unwrap();
        assert!(l.is_done("k").unwrap());
        assert_eq!(
            l.request_counts().unwrap(),
            vec![("answer".to_string(), "done".to_string(), 1)]
        );
    }
}
