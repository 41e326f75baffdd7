//! Ledgers for tests and benchmarks of the review (not part of the API).

use std::path::Path;

use super::ledger::{ItemRow, Ledger};
use rusqlite::params;

/// A ledger with `n` items: item `i` asks `question i` and the teacher answered `answer(i)`,
/// except every fifth item (4, 9, …), whose answer failed (cut off).
pub fn ledger_with_items(path: &Path, n: usize, answer: impl Fn(usize) -> String) {
    ledger_with(path, n, |i| (format!("question {i}"), answer(i)))
}

/// As [`ledger_with_items`], with each item's (question, answer) given.
pub fn ledger_with(path: &Path, n: usize, item: impl Fn(usize) -> (String, String)) {
    let mut l = Ledger::open(path).expect("open the ledger");
    let mut rows = Vec::new();
    for i in 0..n {
        let (question, answer) = item(i);
        let key = format!("answer-key-{i}");
        let system = serde_json::json!({"role": "system", "content": "You are an expert."});
        let user = serde_json::json!({"role": "user", "content": question});
        let prompt = serde_json::json!({
            "messages": [system, user],
            "sampling": {"max_tokens": 16, "n": 1}
        });
        let answered = i % 5 != 4;
        l.connection()
            .execute(
                "INSERT INTO requests (key, stage, request, status, response, attempts, seconds)
                 VALUES (?1, 'answer', ?2, 'done', '[]', 1, 0.1)",
                params![key, prompt.to_string()],
            )
            .expect("insert a request");
        let messages = answered.then(|| {
            serde_json::json!([system, user, {"role": "assistant", "content": answer}]).to_string()
        });
        rows.push(ItemRow {
            hash: format!("{i:064x}"),
            position: i,
            input: serde_json::json!({ "question": question }).to_string(),
            messages,
            expand_key: "expand-key".into(),
            answer_key: Some(key),
            status: if answered { "answered" } else { "failed" }.into(),
            detail: (!answered).then(|| "cut off at retry_max_tokens = 16".into()),
            provenance: serde_json::json!({"teacher": {"model": "tiny"}}).to_string(),
        });
    }
    l.write_items(&rows).expect("write the items");
}
