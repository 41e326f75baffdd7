//! Records out of the teacher's free-form list output. Small models number their items, add
//! bullets or bold, wander into prose between items, or emit JSON; all of that is tolerated:
//!
//! - a line `Label: text` (after stripping numbering such as `3.` / `3)` / `Example 3:`,
//!   bullets and `**`) sets that field, matched case-insensitively;
//! - a record is complete when every field is set; a label seen again before then starts a new
//!   record and the unfinished one counts as `incomplete`;
//! - a line that is a JSON object with every field name is a record too;
//! - any other line is ignored.

use std::collections::BTreeMap;

/// One record: field name → text.
pub type Record = BTreeMap<String, String>;

/// What came out of one text.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Parsed {
    pub records: Vec<Record>,
    /// Records started but missing a field.
    pub incomplete: usize,
}

/// Strip list decoration from the start of a line: whitespace, bullets, `**`, `#`, numbering
/// (`12.`, `12)`, `(12)`), and an `Example 3:`-style prefix.
fn strip_decoration(line: &str) -> &str {
    let mut s = line.trim();
    loop {
        let before = s;
        s = s.trim_start_matches(['-', '*', '•', '#', '>', ' ', '\t']);
        let digits = s
            .trim_start_matches('(')
            .trim_start_matches(|c: char| c.is_ascii_digit());
        if digits.len() < s.trim_start_matches('(').len()
            && let Some(rest) = digits.strip_prefix(['.', ')', ':'])
        {
            s = rest;
        }
        let lower = s.to_ascii_lowercase();
        for word in ["example", "sample", "item"] {
            if lower.starts_with(word) {
                let rest = s[word.len()..].trim_start();
                let rest2 = rest.trim_start_matches(|c: char| c.is_ascii_digit());
                if rest2.len() < rest.len() || rest2.starts_with(':') {
                    s = rest2.trim_start_matches([':', '.', ')', ' ']);
                }
            }
        }
        if s == before {
            return s.trim_end_matches("**").trim();
        }
    }
}

/// Parse `text` for records with `fields`, shown as `labels` (same order).
pub fn parse(text: &str, fields: &[String], labels: &[String]) -> Parsed {
    let mut out = Parsed::default();
    let mut cur = Record::new();
    let finish = |cur: &mut Record, out: &mut Parsed| {
        if !cur.is_empty() {
            out.incomplete += 1;
            cur.clear();
        }
    };
    for raw in text.lines() {
        let line = raw.trim();
        if line.starts_with('{')
            && let Ok(serde_json::Value::Object(obj)) = serde_json::from_str(line)
        {
            let rec: Record = fields
                .iter()
                .filter_map(|f| {
                    obj.get(f)
                        .and_then(|v| v.as_str())
                        .map(|v| (f.clone(), v.trim().to_string()))
                })
                .collect();
            if rec.len() == fields.len() {
                finish(&mut cur, &mut out);
                out.records.push(rec);
                continue;
            }
        }
        let s = strip_decoration(line);
        let lower = s.to_lowercase();
        let hit = labels.iter().zip(fields).find_map(|(label, field)| {
            let l = label.to_lowercase();
            let rest = lower.strip_prefix(&l)?;
            let rest_trim = rest.trim_start_matches(['*', ' ']);
            rest_trim.strip_prefix(':').map(|after| {
                let value_start = s.len() - after.len();
                (
                    field.clone(),
                    s[value_start..]
                        .trim_start_matches(['*', ' '])
                        .trim()
                        .to_string(),
                )
            })
        });
        let Some((field, value)) = hit else { continue };
        if cur.contains_key(&field) {
            finish(&mut cur, &mut out);
        }
        cur.insert(field, value.trim_matches('"').trim().to_string());
        if cur.len() == fields.len() {
            out.records.push(std::mem::take(&mut cur));
        }
    }
    finish(&mut cur, &mut out);
    out
}

/// A record shown the way prompts show it and the parser reads it: `Label: text` lines.
pub fn render(record: &Record, fields: &[String], labels: &[String]) -> String {
    fields
        .iter()
        .zip(labels)
        .map(|(f, l)| format!("{l}: {}", record.get(f).map_or("", String::as_str)))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fl() -> (Vec<String>, Vec<String>) {
        (
            vec!["user_context".into(), "question".into()],
            vec!["User context".into(), "Question".into()],
        )
    }

    #[test]
    fn numbered_bulleted_bold_and_json_items_are_read() {
        let (f, l) = fl();
        let text = "Sure! Here are new examples:\n\n\
            1. User context: I am 30.\n   Question: Should I buy bonds?\n\n\
            2) **User context:** I am retired.\n**Question:** Is gold safe?\n\
            Some prose the model added.\n\
            - Example 3: user context: I have debt.\n- question: Pay it first?\n\
            {\"user_context\": \"I am 50.\", \"question\": \"Annuities?\"}\n";
        let p = parse(text, &f, &l);
        let got: Vec<(String, String)> = p
            .records
            .iter()
            .map(|r| (r["user_context"].clone(), r["question"].clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("I am 30.".to_string(), "Should I buy bonds?".to_string()),
                ("I am retired.".into(), "Is gold safe?".into()),
                ("I have debt.".into(), "Pay it first?".into()),
                ("I am 50.".into(), "Annuities?".into()),
            ]
        );
        assert_eq!(p.incomplete, 0);
    }

    #[test]
    fn a_record_missing_a_field_is_counted_not_kept() {
        let (f, l) = fl();
        // The teacher's real output (SmolLM2-135M, seed 1) had this shape: a repeated label.
        let text = "User context: Is Dog-Coin a great investment option?\nQuestion: Should I invest?\n\n\
            User context: Is Dog-Coin a good investment option?\n\nUser context: again\nQuestion: Gold?\n\
            Question: dangling";
        let p = parse(text, &f, &l);
        assert_eq!(p.records.len(), 2);
        assert_eq!(
            p.incomplete, 2,
            "a context without question, and a question without context"
        );
        assert_eq!(p.records[1]["user_context"], "again");
    }

    #[test]
    fn render_then_parse_round_trips() {
        let (f, l) = fl();
        let r: Record = [
            ("user_context".to_string(), "I am 40.".to_string()),
            ("question".into(), "Index funds?".into()),
        ]
        .into_iter()
        .collect();
        let p = parse(&render(&r, &f, &l), &f, &l);
        assert_eq!(p.records, vec![r]);
    }
}
