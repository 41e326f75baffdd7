//! Review decisions, kept in the synth ledger (`OUT/ledger.sqlite`) next to the items they judge.
//!
//! The teacher's outputs are never touched: `items` and `requests` belong to `retort synth`.
//! Review adds two tables:
//! - `review_decisions`: append-only, one row per click (accept, reject, skip) with the input and
//!   answer as the reviewer left them, the reason, who and when, and the `answer_key` of the
//!   teacher answer that was reviewed;
//! - `review_state`: per item, the decision that currently holds (the latest accept or reject).
//!
//! Both are written in one transaction per decision, committed before the page answers (WAL,
//! `synchronous = FULL`): a crash of the browser or the server loses nothing already clicked.
//! A decision holds only while the item's teacher answer is the one reviewed: when a later
//! `retort synth` run re-answers an item (say, after a system-prompt change), its `answer_key`
//! changes and the item is pending again (the old decision stays in the log).
//! Every statement takes its values as parameters.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::error::{Error, Result};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS review_decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_hash TEXT NOT NULL,
    answer_key TEXT,
    action TEXT NOT NULL CHECK (action IN ('accept', 'reject', 'skip')),
    origin TEXT CHECK (origin IN ('teacher', 'edited', 'human')),
    input TEXT NOT NULL,
    answer TEXT,
    reason TEXT,
    reviewer TEXT NOT NULL,
    at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')));
CREATE INDEX IF NOT EXISTS review_decisions_item ON review_decisions (item_hash, id);
CREATE TABLE IF NOT EXISTS review_state (
    item_hash TEXT PRIMARY KEY,
    answer_key TEXT,
    decision_id INTEGER NOT NULL REFERENCES review_decisions (id));
";

/// The synth items with their texts pulled out of the JSON once (a snapshot, rebuilt whenever
/// another connection — a `retort synth` run — has committed since), so queue queries over
/// 10,000 items scan plain columns.
const SNAPSHOT: &str = "
DROP TABLE IF EXISTS temp.review_items;
CREATE TEMP TABLE review_items AS
SELECT i.hash, i.position, i.status AS teacher_status, i.detail, i.answer_key, i.provenance,
    json_extract(r.request, '$.messages') AS prompt,
    COALESCE(json_extract(r.request, '$.messages[#-1].content'), i.input) AS original_input,
    CASE WHEN i.status = 'answered' THEN json_extract(i.messages, '$[#-1].content') END
        AS original_answer
FROM items i LEFT JOIN requests r ON r.key = i.answer_key;
CREATE UNIQUE INDEX temp.review_items_hash ON review_items (hash);
CREATE INDEX temp.review_items_position ON review_items (position);
";

/// One item as the queue and the item page see it: the snapshot joined with the decision that
/// holds.
const VIEW: &str = "
CREATE TEMP VIEW IF NOT EXISTS review_queue AS
SELECT t.hash, t.position, t.teacher_status, t.detail, t.answer_key, t.provenance, t.prompt,
    t.original_input, t.original_answer,
    d.id AS decision_id, d.action, d.origin, d.reason, d.reviewer, d.at,
    COALESCE(d.input, t.original_input) AS input,
    COALESCE(d.answer, t.original_answer) AS answer,
    CASE WHEN d.action = 'accept' THEN 'accepted'
         WHEN d.action = 'reject' THEN 'rejected'
         WHEN t.teacher_status = 'answered' THEN 'pending'
         ELSE 'no-answer' END AS status
FROM review_items t
LEFT JOIN review_state s ON s.item_hash = t.hash AND s.answer_key IS t.answer_key
LEFT JOIN review_decisions d ON d.id = s.decision_id;
";

/// Where an item stands in review.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// The teacher answered; nobody has decided yet.
    Pending,
    Accepted,
    Rejected,
    /// The teacher gave no usable answer (cut off, failed); a person can still write one.
    NoAnswer,
}

impl Status {
    pub const ALL: [Status; 4] = [
        Status::Pending,
        Status::Accepted,
        Status::Rejected,
        Status::NoAnswer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Accepted => "accepted",
            Status::Rejected => "rejected",
            Status::NoAnswer => "no-answer",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// Who wrote the answer a decision keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// The teacher's answer, unchanged.
    Teacher,
    /// The teacher's answer, edited by the reviewer.
    Edited,
    /// Written by the reviewer ("write my own answer").
    Human,
}

impl Origin {
    pub const ALL: [Origin; 3] = [Origin::Teacher, Origin::Edited, Origin::Human];

    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Teacher => "teacher",
            Origin::Edited => "edited",
            Origin::Human => "human",
        }
    }

    pub fn parse(s: &str) -> Option<Origin> {
        Origin::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Accept,
    Reject,
    Skip,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Accept => "accept",
            Action::Reject => "reject",
            Action::Skip => "skip",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        [Action::Accept, Action::Reject, Action::Skip]
            .into_iter()
            .find(|x| x.as_str() == s)
    }
}

/// Which items the queue shows. Empty fields do not filter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    pub status: Option<Status>,
    pub origin: Option<Origin>,
    /// Bounds on the current answer's length in characters.
    pub min_chars: Option<usize>,
    pub max_chars: Option<usize>,
    /// Case-insensitive (ASCII) substring of the input or the answer.
    pub text: Option<String>,
}

impl Filter {
    /// The WHERE clause and its parameters (`?1`…`?6` in this order).
    fn clause(&self) -> (&'static str, Vec<rusqlite::types::Value>) {
        use rusqlite::types::Value;
        let opt_text = |s: Option<&str>| s.map_or(Value::Null, |s| Value::Text(s.to_string()));
        let opt_int = |n: Option<usize>| n.map_or(Value::Null, |n| Value::Integer(n as i64));
        let like = self.text.as_deref().filter(|t| !t.is_empty()).map(|t| {
            let escaped = t
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            format!("%{escaped}%")
        });
        (
            "(?1 IS NULL OR status = ?1)
             AND (?2 IS NULL OR (origin = ?2 AND status = 'accepted'))
             AND (?3 IS NULL OR length(COALESCE(answer, '')) >= ?3)
             AND (?4 IS NULL OR length(COALESCE(answer, '')) <= ?4)
             AND (?5 IS NULL OR input LIKE ?5 ESCAPE '\\' OR answer LIKE ?5 ESCAPE '\\')",
            vec![
                opt_text(self.status.map(Status::as_str)),
                opt_text(self.origin.map(Origin::as_str)),
                opt_int(self.min_chars),
                opt_int(self.max_chars),
                opt_text(like.as_deref()),
            ],
        )
    }
}

/// Counts over every item, whatever the filter.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Progress {
    pub total: usize,
    pub pending: usize,
    pub accepted: usize,
    pub rejected: usize,
    pub no_answer: usize,
}

impl Progress {
    pub fn decided(&self) -> usize {
        self.accepted + self.rejected
    }
}

/// One line of the queue.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueRow {
    pub hash: String,
    pub position: usize,
    pub status: Status,
    pub origin: Option<Origin>,
    pub input: String,
    pub answer: Option<String>,
    pub answer_chars: usize,
    pub reviewer: Option<String>,
    pub at: Option<String>,
}

/// A decision as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub id: i64,
    pub action: Action,
    pub origin: Option<Origin>,
    pub input: String,
    pub answer: Option<String>,
    pub reason: Option<String>,
    pub reviewer: String,
    pub at: String,
    pub answer_key: Option<String>,
}

impl Decision {
    /// A `review_decisions` row whose columns `id, action, origin, input, answer, reason,
    /// reviewer, at, answer_key` start at column `first` (the one mapping of that table).
    fn from_row(r: &rusqlite::Row, first: usize) -> rusqlite::Result<Decision> {
        Ok(Decision {
            id: r.get(first)?,
            action: parsed(r, first + 1, Action::parse)?,
            origin: match r.get::<_, Option<String>>(first + 2)? {
                Some(_) => Some(parsed(r, first + 2, Origin::parse)?),
                None => None,
            },
            input: r.get(first + 3)?,
            answer: r.get(first + 4)?,
            reason: r.get(first + 5)?,
            reviewer: r.get(first + 6)?,
            at: r.get(first + 7)?,
            answer_key: r.get(first + 8)?,
        })
    }
}

/// Column `i` as one of an enum's names; a value the schema's CHECK should have refused is an
/// error naming the column, not a silent default.
fn parsed<T>(r: &rusqlite::Row, i: usize, parse: fn(&str) -> Option<T>) -> rusqlite::Result<T> {
    let s: String = r.get(i)?;
    parse(&s).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            format!("unknown value {s:?} in column {i}").into(),
        )
    })
}

/// Column `i` as JSON the pipeline wrote (a request's messages, an item's provenance).
fn json_column<T: serde::de::DeserializeOwned>(i: usize, text: &str) -> rusqlite::Result<T> {
    serde_json::from_str(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// One item with everything the item page and the export need.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Item {
    pub hash: String,
    pub position: usize,
    pub status: Status,
    /// The synth run's verdict on the teacher's answer (`answered`, `failed`) and why it failed.
    pub teacher_status: String,
    pub detail: Option<String>,
    pub answer_key: Option<String>,
    /// The prompt the teacher answered (system + user messages), as JSON.
    pub prompt: Vec<retort_data::Message>,
    pub original_input: String,
    pub original_answer: Option<String>,
    /// The input and answer as they stand (edited where edited).
    pub input: String,
    pub answer: Option<String>,
    pub decision: Option<Decision>,
    pub provenance: serde_json::Value,
}

impl Item {
    /// The system prompt the teacher answered under, if any.
    pub fn system(&self) -> Option<&str> {
        self.prompt
            .iter()
            .find(|m| m.role == retort_data::Role::System)
            .map(|m| m.content.as_str())
    }
}

/// What a reviewer submits.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDecision {
    pub action: Action,
    pub input: String,
    pub answer: String,
    /// The answer was written by the reviewer, not edited from the teacher's.
    pub human: bool,
    pub reason: String,
    pub reviewer: String,
}

/// Longest text a field may hold (characters), so a stray paste cannot bloat the database.
pub const MAX_FIELD_CHARS: usize = 200_000;
/// Longest rejection reason (the page's field allows as many; the store enforces it too).
pub const MAX_REASON_CHARS: usize = 500;

pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// `PRAGMA data_version` when the snapshot was taken.
    snapshot: std::cell::Cell<Option<i64>>,
}

impl Store {
    /// Open the ledger written by `retort synth` and add the review tables if missing.
    pub fn open(path: &Path) -> Result<Store> {
        if !path.is_file() {
            return Err(Error::invalid(
                format!("`{}` does not exist", path.display()),
                "pass the ledger `retort synth` wrote: OUT/ledger.sqlite (OUT is the pipeline's out_dir or --out)",
            ));
        }
        let conn = Connection::open(path)?;
        let tables: Vec<String> = {
            let mut st = conn.prepare("SELECT name FROM sqlite_master WHERE type = 'table'")?;
            st.query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?
        };
        for t in ["items", "requests"] {
            if !tables.iter().any(|x| x == t) {
                return Err(Error::invalid(
                    format!(
                        "`{}` is not a synth ledger: it has no `{t}` table",
                        path.display()
                    ),
                    "pass the ledger `retort synth` wrote: OUT/ledger.sqlite",
                ));
            }
        }
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA)?;
        let store = Store {
            conn,
            path: path.to_path_buf(),
            snapshot: std::cell::Cell::new(None),
        };
        store.refresh()?;
        store.conn.execute_batch(VIEW)?;
        Ok(store)
    }

    /// Retake the snapshot of `items` if another connection committed since the last one.
    fn refresh(&self) -> Result<()> {
        let version: i64 = self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?;
        if self.snapshot.get() != Some(version) {
            self.conn.execute_batch(SNAPSHOT)?;
            self.snapshot.set(Some(version));
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn progress(&self) -> Result<Progress> {
        self.refresh()?;
        let mut p = Progress::default();
        let mut st = self
            .conn
            .prepare_cached("SELECT status, COUNT(*) FROM review_queue GROUP BY status")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (s, n) = row?;
            let n = n as usize;
            p.total += n;
            match Status::parse(&s) {
                Some(Status::Pending) => p.pending += n,
                Some(Status::Accepted) => p.accepted += n,
                Some(Status::Rejected) => p.rejected += n,
                Some(Status::NoAnswer) => p.no_answer += n,
                None => {}
            }
        }
        Ok(p)
    }

    /// Page `page` (from 0) of the items matching `filter`, `per_page` at a time, and how many match.
    pub fn queue(
        &self,
        filter: &Filter,
        page: usize,
        per_page: usize,
    ) -> Result<(Vec<QueueRow>, usize)> {
        self.refresh()?;
        let (clause, mut values) = filter.clause();
        let count: i64 = self.conn.query_row(
            &format!("SELECT COUNT(*) FROM review_queue WHERE {clause}"),
            rusqlite::params_from_iter(values.iter()),
            |r| r.get(0),
        )?;
        values.push(rusqlite::types::Value::Integer(per_page as i64));
        values.push(rusqlite::types::Value::Integer((page * per_page) as i64));
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT hash, position, status, origin, substr(input, 1, 240), substr(answer, 1, 240),
                    length(COALESCE(answer, '')), reviewer, at
             FROM review_queue WHERE {clause} ORDER BY position LIMIT ?6 OFFSET ?7"
        ))?;
        let rows = st.query_map(rusqlite::params_from_iter(values.iter()), |r| {
            Ok(QueueRow {
                hash: r.get(0)?,
                position: r.get::<_, i64>(1)? as usize,
                status: parsed(r, 2, Status::parse)?,
                origin: r
                    .get::<_, Option<String>>(3)?
                    .and_then(|s| Origin::parse(&s)),
                input: r.get(4)?,
                answer: r.get(5)?,
                answer_chars: r.get::<_, i64>(6)? as usize,
                reviewer: r.get(7)?,
                at: r.get(8)?,
            })
        })?;
        Ok((rows.collect::<rusqlite::Result<_>>()?, count as usize))
    }

    /// The item after (`forward`) or before `hash` among those matching `filter`.
    pub fn neighbour(&self, hash: &str, filter: &Filter, forward: bool) -> Result<Option<String>> {
        self.refresh()?;
        let Some(position) = self.position(hash)? else {
            return Ok(None);
        };
        let (clause, mut values) = filter.clause();
        values.push(rusqlite::types::Value::Integer(position as i64));
        let sql = if forward {
            format!(
                "SELECT hash FROM review_queue WHERE ({clause}) AND position > ?6 ORDER BY position LIMIT 1"
            )
        } else {
            format!(
                "SELECT hash FROM review_queue WHERE ({clause}) AND position < ?6 ORDER BY position DESC LIMIT 1"
            )
        };
        Ok(self
            .conn
            .query_row(&sql, rusqlite::params_from_iter(values.iter()), |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// The first item matching `filter`.
    pub fn first(&self, filter: &Filter) -> Result<Option<String>> {
        self.refresh()?;
        let (clause, values) = filter.clause();
        Ok(self
            .conn
            .query_row(
                &format!("SELECT hash FROM review_queue WHERE {clause} ORDER BY position LIMIT 1"),
                rusqlite::params_from_iter(values.iter()),
                |r| r.get(0),
            )
            .optional()?)
    }

    fn position(&self, hash: &str) -> Result<Option<usize>> {
        Ok(self
            .conn
            .query_row(
                "SELECT position FROM review_items WHERE hash = ?1",
                params![hash],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map(|p| p as usize))
    }

    /// Every item in queue order (the export reads this).
    pub fn items(&self) -> Result<Vec<Item>> {
        self.select_items("1 = 1", params![])
    }

    pub fn item(&self, hash: &str) -> Result<Option<Item>> {
        Ok(self
            .select_items("hash = ?1", params![hash])?
            .into_iter()
            .next())
    }

    fn select_items(&self, clause: &str, values: &[&dyn rusqlite::ToSql]) -> Result<Vec<Item>> {
        self.refresh()?;
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT q.hash, q.position, q.status, q.teacher_status, q.detail, q.answer_key,
                    q.prompt, q.original_input, q.original_answer, q.input, q.answer, q.provenance,
                    d.id, d.action, d.origin, d.input, d.answer, d.reason, d.reviewer, d.at,
                    d.answer_key
             FROM review_queue q LEFT JOIN review_decisions d ON d.id = q.decision_id
             WHERE {clause} ORDER BY q.position"
        ))?;
        let rows = st.query_map(values, |r| {
            let decision = match r.get::<_, Option<i64>>(12)? {
                Some(_) => Some(Decision::from_row(r, 12)?),
                None => None,
            };
            let prompt: Option<String> = r.get(6)?;
            let provenance: String = r.get(11)?;
            Ok(Item {
                hash: r.get(0)?,
                position: r.get::<_, i64>(1)? as usize,
                status: parsed(r, 2, Status::parse)?,
                teacher_status: r.get(3)?,
                detail: r.get(4)?,
                answer_key: r.get(5)?,
                // No request row (an item whose expansion failed) has no prompt.
                prompt: match prompt {
                    Some(p) => json_column(6, &p)?,
                    None => Vec::new(),
                },
                original_input: r.get(7)?,
                original_answer: r.get(8)?,
                input: r.get(9)?,
                answer: r.get(10)?,
                decision,
                provenance: json_column(11, &provenance)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every decision ever taken on `hash`, oldest first (skips included).
    pub fn history(&self, hash: &str) -> Result<Vec<Decision>> {
        let mut st = self.conn.prepare_cached(
            "SELECT id, action, origin, input, answer, reason, reviewer, at, answer_key
             FROM review_decisions WHERE item_hash = ?1 ORDER BY id",
        )?;
        let rows = st.query_map(params![hash], |r| Decision::from_row(r, 0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Record a decision on `hash`, committed before this returns; its id.
    pub fn decide(&mut self, hash: &str, d: &NewDecision) -> Result<i64> {
        let item = self.item(hash)?.ok_or_else(|| {
            Error::invalid(
                format!("no item `{hash}` in `{}`", self.path.display()),
                "the ledger was rewritten by a newer `retort synth` run; reload the queue",
            )
        })?;
        let input = normalise(&d.input);
        let answer = normalise(&d.answer);
        let reason = d.reason.trim().to_string();
        let reviewer = d.reviewer.trim().to_string();
        if reason.chars().count() > MAX_REASON_CHARS {
            return Err(Error::invalid(
                format!("the reason is longer than {MAX_REASON_CHARS} characters"),
                "say why in a few words, e.g. \"wrong facts\"; edit the answer to show more",
            ));
        }
        for (field, text) in [("input", &input), ("answer", &answer)] {
            if text.chars().count() > MAX_FIELD_CHARS {
                return Err(Error::invalid(
                    format!("the {field} is longer than {MAX_FIELD_CHARS} characters"),
                    "shorten it; review is for answers a model is trained on",
                ));
            }
        }
        if reviewer.is_empty() {
            return Err(Error::invalid(
                "no reviewer name",
                "start `retort review` with --reviewer NAME",
            ));
        }
        let origin = match d.action {
            Action::Accept => {
                if input.trim().is_empty() {
                    return Err(Error::invalid(
                        "cannot accept an empty input",
                        "write the question back, or reject the item",
                    ));
                }
                if answer.trim().is_empty() {
                    return Err(Error::invalid(
                        "cannot accept an empty answer",
                        "write an answer (\"write my own answer\"), or reject the item",
                    ));
                }
                Some(if d.human || item.original_answer.is_none() {
                    Origin::Human
                } else if item.original_answer.as_deref().map(normalise).as_deref()
                    == Some(answer.as_str())
                {
                    Origin::Teacher
                } else {
                    Origin::Edited
                })
            }
            Action::Reject => {
                if reason.is_empty() {
                    return Err(Error::invalid(
                        "a rejection needs a reason",
                        "pick or type a reason, e.g. \"wrong facts\" or \"off topic\"",
                    ));
                }
                None
            }
            Action::Skip => None,
        };
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO review_decisions (item_hash, answer_key, action, origin, input, answer, reason, reviewer)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                hash,
                item.answer_key,
                d.action.as_str(),
                origin.map(Origin::as_str),
                input,
                (!answer.is_empty()).then_some(&answer),
                (!reason.is_empty()).then_some(&reason),
                reviewer
            ],
        )?;
        let id = tx.last_insert_rowid();
        if d.action != Action::Skip {
            tx.execute(
                "INSERT INTO review_state (item_hash, answer_key, decision_id) VALUES (?1, ?2, ?3)
                 ON CONFLICT (item_hash) DO UPDATE SET
                     answer_key = excluded.answer_key, decision_id = excluded.decision_id",
                params![hash, item.answer_key, id],
            )?;
        }
        tx.commit()?;
        Ok(id)
    }
}

/// Browsers submit text areas with CRLF line ends; store LF so edits compare with the original.
pub fn normalise(s: &str) -> String {
    s.replace("\r\n", "\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::testing::ledger_with_items;

    fn decision(action: Action, input: &str, answer: &str, reason: &str) -> NewDecision {
        NewDecision {
            action,
            input: input.into(),
            answer: answer.into(),
            human: false,
            reason: reason.into(),
            reviewer: "ana".into(),
        }
    }

    #[test]
    fn decisions_hold_are_logged_and_never_touch_the_teacher_output() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ledger.sqlite");
        ledger_with_items(&db, 10, |i| format!("answer {i}"));
        let before: String = Connection::open(&db)
            .unwrap()
            .query_row("SELECT group_concat(messages, '|') FROM items", [], |r| {
                r.get(0)
            })
            .unwrap();
        let mut s = Store::open(&db).unwrap();
        let h = |i: usize| format!("{i:064x}");
        assert_eq!(
            s.progress().unwrap(),
            Progress {
                total: 10,
                pending: 8,
                accepted: 0,
                rejected: 0,
                no_answer: 2
            }
        );
        // 0: accepted as is; 1: edited (CRLF from the browser is not an edit by itself);
        // 2: rejected; 3: skipped; 4 (failed): own answer.
        s.decide(
            &h(0),
            &decision(Action::Accept, "question 0", "answer 0", ""),
        )
        .unwrap();
        s.decide(
            &h(1),
            &decision(Action::Accept, "question 1", "better\r\nanswer 1", ""),
        )
        .unwrap();
        s.decide(
            &h(2),
            &decision(Action::Reject, "question 2", "answer 2", "wrong"),
        )
        .unwrap();
        s.decide(&h(3), &decision(Action::Skip, "question 3", "answer 3", ""))
            .unwrap();
        s.decide(
            &h(4),
            &decision(Action::Accept, "question 4?", "a human answer", ""),
        )
        .unwrap();
        let p = s.progress().unwrap();
        assert_eq!(
            (p.accepted, p.rejected, p.pending, p.no_answer),
            (3, 1, 5, 1)
        );
        let items = s.items().unwrap();
        assert_eq!(
            items[0].decision.as_ref().unwrap().origin,
            Some(Origin::Teacher)
        );
        assert_eq!(
            items[1].decision.as_ref().unwrap().origin,
            Some(Origin::Edited)
        );
        assert_eq!(items[1].answer.as_deref(), Some("better\nanswer 1"));
        assert_eq!(items[1].original_answer.as_deref(), Some("answer 1"));
        assert_eq!(items[2].status, Status::Rejected);
        assert_eq!(items[3].status, Status::Pending, "a skip decides nothing");
        assert_eq!(
            items[4].decision.as_ref().unwrap().origin,
            Some(Origin::Human)
        );
        assert_eq!(items[4].input, "question 4?");
        assert_eq!(items[4].original_input, "question 4");
        assert_eq!(items[4].system(), Some("You are an expert."));
        // A later decision replaces the earlier one; both stay in the log.
        s.decide(
            &h(2),
            &decision(Action::Accept, "question 2", "answer 2", ""),
        )
        .unwrap();
        assert_eq!(s.item(&h(2)).unwrap().unwrap().status, Status::Accepted);
        let log = s.history(&h(2)).unwrap();
        assert_eq!(
            log.iter().map(|d| d.action).collect::<Vec<_>>(),
            vec![Action::Reject, Action::Accept]
        );
        assert_eq!(log[0].reason.as_deref(), Some("wrong"));
        assert_eq!(log[0].reviewer, "ana");
        assert!(log[0].at.ends_with('Z'), "{}", log[0].at);
        assert_eq!(s.history(&h(3)).unwrap().len(), 1, "the skip is logged");
        drop(s);
        // Reopened from disk: the same state; the teacher's outputs untouched.
        let s = Store::open(&db).unwrap();
        assert_eq!(s.progress().unwrap(), {
            let mut q = p.clone();
            q.accepted += 1;
            q.rejected -= 1;
            q
        });
        let after: String = s
            .conn
            .query_row("SELECT group_concat(messages, '|') FROM items", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(before, after);
    }

    #[test]
    fn bad_decisions_are_refused_with_a_hint_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ledger.sqlite");
        ledger_with_items(&db, 5, |i| format!("answer {i}"));
        let mut s = Store::open(&db).unwrap();
        let h0 = format!("{:064x}", 0);
        for (d, needle) in [
            (decision(Action::Reject, "q", "a", "  "), "needs a reason"),
            (decision(Action::Accept, "q", " \r\n ", ""), "empty answer"),
            (decision(Action::Accept, "", "a", ""), "empty input"),
        ] {
            let e = s.decide(&h0, &d).unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains("hint:"), "{e}");
        }
        let e = s
            .decide("nope", &decision(Action::Skip, "q", "a", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no item `nope`"), "{e}");
        assert!(s.history(&h0).unwrap().is_empty());
        let e = Store::open(&dir.path().join("missing.sqlite"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("does not exist") && e.contains("hint:"), "{e}");
        let other = dir.path().join("other.sqlite");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let e = Store::open(&other).err().unwrap().to_string();
        assert!(e.contains("not a synth ledger"), "{e}");
    }

    #[test]
    fn filters_pages_and_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ledger.sqlite");
        // Answer i has i + 1 characters 'x', and item 7 mentions 100% and an underscore.
        ledger_with_items(&db, 20, |i| {
            if i == 7 {
                "100% a_b".into()
            } else {
                "x".repeat(i + 1)
            }
        });
        let mut s = Store::open(&db).unwrap();
        let h = |i: usize| format!("{i:064x}");
        s.decide(&h(1), &decision(Action::Accept, "question 1", "edited", ""))
            .unwrap();
        s.decide(&h(2), &decision(Action::Reject, "question 2", "x", "bad"))
            .unwrap();
        let positions = |f: &Filter| -> Vec<usize> {
            let (rows, n) = s.queue(f, 0, 100).unwrap();
            assert_eq!(rows.len(), n);
            rows.iter().map(|r| r.position).collect()
        };
        assert_eq!(positions(&Filter::default()).len(), 20);
        let pending = Filter {
            status: Some(Status::Pending),
            ..Filter::default()
        };
        assert_eq!(
            positions(&pending),
            vec![0, 3, 5, 6, 7, 8, 10, 11, 12, 13, 15, 16, 17, 18]
        );
        let edited = Filter {
            origin: Some(Origin::Edited),
            ..Filter::default()
        };
        assert_eq!(positions(&edited), vec![1]);
        let long = Filter {
            status: Some(Status::Pending),
            min_chars: Some(12),
            max_chars: Some(14),
            ..Filter::default()
        };
        assert_eq!(positions(&long), vec![11, 12, 13]);
        // LIKE wildcards in the search are literal.
        let text = |t: &str| Filter {
            text: Some(t.into()),
            ..Filter::default()
        };
        assert_eq!(positions(&text("0%")), vec![7]);
        assert_eq!(positions(&text("a_b")), vec![7]);
        assert_eq!(positions(&text("A_B")), vec![7], "case-insensitive");
        assert_eq!(positions(&text("question 1")).len(), 11); // 1, 10–19
        // Pages.
        let (page, n) = s.queue(&Filter::default(), 1, 8).unwrap();
        assert_eq!(n, 20);
        assert_eq!(page.first().unwrap().position, 8);
        assert_eq!(page.len(), 8);
        // Neighbours follow the filter.
        assert_eq!(s.neighbour(&h(3), &pending, true).unwrap(), Some(h(5)));
        assert_eq!(s.neighbour(&h(5), &pending, false).unwrap(), Some(h(3)));
        assert_eq!(s.neighbour(&h(18), &pending, true).unwrap(), None);
        assert_eq!(s.first(&pending).unwrap(), Some(h(0)));
    }

    #[test]
    fn a_reanswered_item_is_pending_again() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ledger.sqlite");
        ledger_with_items(&db, 3, |i| format!("answer {i}"));
        let mut s = Store::open(&db).unwrap();
        let h0 = format!("{:064x}", 0);
        s.decide(&h0, &decision(Action::Accept, "question 0", "answer 0", ""))
            .unwrap();
        assert_eq!(s.item(&h0).unwrap().unwrap().status, Status::Accepted);
        // A new synth run (another connection) re-answered item 0 under another request.
        Connection::open(&db)
            .unwrap()
            .execute(
                "UPDATE items SET answer_key = 'answer-key-1' WHERE hash = ?1",
                params![h0],
            )
            .unwrap();
        assert_eq!(s.item(&h0).unwrap().unwrap().status, Status::Pending);
        assert_eq!(s.history(&h0).unwrap().len(), 1);
    }
}
