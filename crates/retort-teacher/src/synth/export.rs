//! `retort export`: the reviewed ledger as training sets, each record with its provenance.
//!
//! - `stage1.jsonl` — accepted items whose answer came from the teacher (as is, or edited by the
//!   reviewer): the synthetic set of the two-stage recipe's first stage;
//! - `stage2.jsonl` — accepted items whose answer a person wrote or edited: the human annotations
//!   of the second stage (an edited answer is in both sets);
//! - `preferences.jsonl` — for each stage-2 item that has a teacher answer: the person's answer
//!   (`chosen`) against the teacher's original (`rejected`), in TRL's conversational preference
//!   format (`prompt`, `chosen`, `rejected`);
//! - `export.json` — counts and where the data came from.
//!
//! Stage-1 and stage-2 records are OpenAI `messages` JSONL, read by `retort train` and
//! `retort label` (so stage 2 can be distilled too). Each file is written to a temporary file and
//! renamed, so an interrupted export leaves the previous files whole.

use std::path::Path;

use retort_data::{Message, Role};
use serde::Serialize;
use serde_json::{Value, json};

use super::review::{Item, Origin, Status, Store};
use crate::error::Result;

pub const STAGE1: &str = "stage1.jsonl";
pub const STAGE2: &str = "stage2.jsonl";
pub const PREFERENCES: &str = "preferences.jsonl";
pub const SUMMARY: &str = "export.json";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExportSummary {
    pub ledger: String,
    pub items: usize,
    pub accepted: usize,
    pub rejected: usize,
    pub pending: usize,
    pub no_answer: usize,
    pub stage1: usize,
    pub stage2: usize,
    pub preferences: usize,
    /// Accepted items whose input the reviewer edited.
    pub inputs_edited: usize,
    /// Pending items exported as accepted by `--auto-accept`.
    pub auto_accepted: usize,
}

/// Write the three sets and the summary into `dir` (created if missing).
pub fn export(store: &Store, dir: &Path) -> Result<ExportSummary> {
    export_with(store, dir, false)
}

/// [`export`], optionally taking every pending teacher answer as accepted unchanged
/// (`auto_accept`: for pipelines run without a reviewer; such records say
/// `"review": {"auto_accepted": true}` and nothing is written to the ledger).
pub fn export_with(store: &Store, dir: &Path, auto_accept: bool) -> Result<ExportSummary> {
    fs_err::create_dir_all(dir)?;
    let items = store.items()?;
    let progress = store.progress()?;
    let mut summary = ExportSummary {
        ledger: store.path().display().to_string(),
        items: progress.total,
        accepted: progress.accepted,
        rejected: progress.rejected,
        pending: progress.pending,
        no_answer: progress.no_answer,
        stage1: 0,
        stage2: 0,
        preferences: 0,
        inputs_edited: 0,
        auto_accepted: 0,
    };
    let (mut stage1, mut stage2, mut prefs) = (String::new(), String::new(), String::new());
    // One pass in queue order: auto-accepted pending items among the decided ones.
    for item in &items {
        if item.status == Status::Accepted {
            accepted(item, &mut summary, &mut stage1, &mut stage2, &mut prefs);
            continue;
        }
        let (true, Status::Pending, Some(answer)) = (auto_accept, item.status, &item.answer) else {
            continue;
        };
        let mut messages = prompt(item);
        messages.push(Message::assistant(answer.clone()));
        let record = json!({
            "id": &item.hash[..16.min(item.hash.len())],
            "messages": messages,
            "provenance": {
                "synth": item.provenance,
                "review": {"ledger": summary.ledger, "item": item.hash, "auto_accepted": true},
            },
        });
        push_line(&mut stage1, &record);
        summary.stage1 += 1;
        summary.auto_accepted += 1;
    }
    let write = retort_data::files::write_atomic;
    write(&dir.join(STAGE1), stage1.as_bytes())?;
    write(&dir.join(STAGE2), stage2.as_bytes())?;
    write(&dir.join(PREFERENCES), prefs.as_bytes())?;
    let json = serde_json::to_string_pretty(&summary).unwrap_or_default();
    write(&dir.join(SUMMARY), json.as_bytes())?;
    Ok(summary)
}

/// An accepted item into its stage set(s) and, for a human answer over a teacher's, a pair.
fn accepted(
    item: &Item,
    summary: &mut ExportSummary,
    stage1: &mut String,
    stage2: &mut String,
    prefs: &mut String,
) {
    let (Some(decision), Some(answer)) = (&item.decision, &item.answer) else {
        return;
    };
    let origin = decision.origin.unwrap_or(Origin::Teacher);
    let prompt = prompt(item);
    if item.input != item.original_input {
        summary.inputs_edited += 1;
    }
    let provenance = json!({
        "synth": item.provenance,
        "review": {
            "ledger": summary.ledger,
            "item": item.hash,
            "decision": decision.id,
            "reviewer": decision.reviewer,
            "at": decision.at,
            "origin": origin.as_str(),
            "input_edited": item.input != item.original_input,
            "original_input": (item.input != item.original_input).then_some(&item.original_input),
            "teacher_answer_key": decision.answer_key,
        },
    });
    let mut messages = prompt.clone();
    messages.push(Message::assistant(answer.clone()));
    let record = json!({
        "id": &item.hash[..16.min(item.hash.len())],
        "messages": messages,
        "provenance": provenance,
    });
    if matches!(origin, Origin::Teacher | Origin::Edited) {
        push_line(stage1, &record);
        summary.stage1 += 1;
    }
    if matches!(origin, Origin::Edited | Origin::Human) {
        push_line(stage2, &record);
        summary.stage2 += 1;
        if let Some(original) = item.original_answer.as_ref().filter(|o| *o != answer) {
            let pair = json!({
                "id": record["id"],
                "prompt": prompt,
                "chosen": [Message::assistant(answer.clone())],
                "rejected": [Message::assistant(original.clone())],
                "provenance": provenance,
            });
            push_line(prefs, &pair);
            summary.preferences += 1;
        }
    }
}

/// The prompt as reviewed: the teacher's system message(s), then the (possibly edited) input as
/// the user turn.
fn prompt(item: &Item) -> Vec<Message> {
    let mut m: Vec<Message> = item
        .prompt
        .iter()
        .filter(|m| m.role == Role::System)
        .cloned()
        .collect();
    m.push(Message::user(item.input.clone()));
    m
}

fn push_line(out: &mut String, v: &Value) {
    out.push_str(&v.to_string());
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::review::{Action, NewDecision};
    use crate::synth::testing::ledger_with_items;

    #[test]
    fn accepted_items_go_to_their_stage_with_provenance() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ledger.sqlite");
        ledger_with_items(&db, 6, |i| format!("answer {i}"));
        let mut s = Store::open(&db).unwrap();
        let h = |i: usize| format!("{i:064x}");
        let d = |action, input: &str, answer: &str, human| NewDecision {
            action,
            input: input.into(),
            answer: answer.into(),
            human,
            reason: "r".into(),
            reviewer: "ana".into(),
        };
        s.decide(&h(0), &d(Action::Accept, "question 0", "answer 0", false))
            .unwrap(); // teacher
        s.decide(
            &h(1),
            &d(Action::Accept, "question 1!", "answer one", false),
        )
        .unwrap(); // edited, input too
        s.decide(&h(2), &d(Action::Reject, "question 2", "answer 2", false))
            .unwrap();
        s.decide(&h(3), &d(Action::Accept, "question 3", "mine", true))
            .unwrap(); // human, over a teacher answer
        s.decide(&h(4), &d(Action::Accept, "question 4", "mine too", false))
            .unwrap(); // human: the teacher had no answer
        let out = dir.path().join("export");
        let sum = export(&s, &out).unwrap();
        assert_eq!(
            (sum.stage1, sum.stage2, sum.preferences, sum.inputs_edited),
            (2, 3, 2, 1)
        );
        assert_eq!((sum.accepted, sum.rejected, sum.pending), (4, 1, 1));
        let read = |f: &str| -> Vec<Value> {
            fs_err::read_to_string(out.join(f))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        let s1 = read(STAGE1);
        let last = |r: &Value| r["messages"][2]["content"].as_str().unwrap().to_string();
        assert_eq!(
            s1.iter().map(last).collect::<Vec<_>>(),
            ["answer 0", "answer one"]
        );
        assert_eq!(s1[1]["messages"][1]["content"], "question 1!");
        assert_eq!(s1[1]["messages"][0]["content"], "You are an expert.");
        assert_eq!(s1[1]["provenance"]["review"]["origin"], "edited");
        assert_eq!(
            s1[1]["provenance"]["review"]["original_input"],
            "question 1"
        );
        assert_eq!(s1[1]["provenance"]["review"]["reviewer"], "ana");
        assert_eq!(s1[0]["provenance"]["synth"]["teacher"]["model"], "tiny");
        let s2 = read(STAGE2);
        assert_eq!(
            s2.iter().map(last).collect::<Vec<_>>(),
            ["answer one", "mine", "mine too"]
        );
        let p = read(PREFERENCES);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0]["chosen"][0]["content"], "answer one");
        assert_eq!(p[0]["rejected"][0]["content"], "answer 1");
        assert_eq!(p[1]["chosen"][0]["content"], "mine");
        assert_eq!(p[1]["rejected"][0]["content"], "answer 3");
        assert_eq!(p[1]["prompt"][1]["content"], "question 3");
        // The stage files are training data retort reads.
        for f in [STAGE1, STAGE2] {
            let ds = retort_data::dataset::read(&out.join(f), &Default::default()).unwrap();
            assert_eq!(ds.format, retort_data::Format::Messages);
            assert!(ds.skipped.is_empty());
        }
        let summary: Value =
            serde_json::from_str(&fs_err::read_to_string(out.join(SUMMARY)).unwrap()).unwrap();
        assert_eq!(summary["stage2"], 3);
        // Auto-accept adds the one pending teacher answer (item 5) to stage 1, in queue order,
        // marked as such; the ledger is not written.
        let auto = export_with(&s, &out, true).unwrap();
        assert_eq!((auto.stage1, auto.auto_accepted, auto.stage2), (3, 1, 3));
        let s1 = read(STAGE1);
        assert_eq!(s1[2]["messages"][2]["content"], "answer 5");
        assert_eq!(s1[2]["provenance"]["review"]["auto_accepted"], true);
        assert_eq!(s.progress().unwrap().pending, 1);
    }
}
