//! Reading a training dataset: JSONL (one record per line), a JSON array, or Parquet, in any of
//! the [`Format`]s, validated record by record.
//!
//! By default the first bad record stops the read with an error naming file, line and field;
//! with [`ReadOptions::skip_invalid`] bad records are skipped and returned in
//! [`Dataset::skipped`] so callers can count and report them.

use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::conversation::Conversation;
use crate::error::{Error, Location, RecordError, Result};
use crate::formats::{self, Format};

/// One valid training record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The record's `id` field, else `line-N` / `record-N`.
    pub id: String,
    pub location: Location,
    pub conversation: Conversation,
}

/// A validated dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub format: Format,
    pub records: Vec<Record>,
    /// Records skipped under `skip_invalid`, with why.
    pub skipped: Vec<RecordError>,
    /// SHA-256 of the file's bytes (hex): the dataset's identity in lineage and caches.
    pub sha256: String,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ReadOptions {
    /// Force a record shape instead of detecting it from the first record.
    pub format: Option<Format>,
    /// Skip and count bad records instead of stopping at the first.
    pub skip_invalid: bool,
}

/// Raw records of a file before validation: (location, JSON value or why it is not one).
pub(crate) type RawRecords = Vec<(Location, std::result::Result<Value, (String, String)>)>;

/// Read and validate a dataset.
pub fn read(path: &Path, opts: &ReadOptions) -> Result<Dataset> {
    let bytes = fs_err::read(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let is_parquet = bytes.starts_with(b"PAR1");
    let raw = if is_parquet {
        crate::parquet::rows(path, bytes)?
    } else {
        split_json(path, &bytes)?
    };
    if raw.is_empty() {
        return Err(Error::File {
            path: path.to_path_buf(),
            reason: "the file is empty: it holds no records".into(),
            hint: "write one record per line (JSONL), a JSON array of records, or Parquet rows \
                   with `messages`, `conversations` or `instruction` + `output`"
                .into(),
        });
    }
    let format = match opts.format {
        Some(f) => f,
        None => raw
            .iter()
            .find_map(|(_, r)| r.as_ref().ok().and_then(Format::detect))
            .ok_or_else(|| Error::File {
                path: path.to_path_buf(),
                reason: "no record has the shape of a known format".into(),
                hint: "records need `messages` (OpenAI), `conversations` (ShareGPT) or \
                       `instruction` + `output` (Alpaca); or pass --format"
                    .into(),
            })?,
    };
    let mut records = Vec::with_capacity(raw.len());
    let mut skipped = Vec::new();
    for (location, value) in raw {
        let parsed = match value {
            Ok(v) => formats::parse(format, &v)
                .map(|c| (formats::record_id(&v), c))
                .map_err(|e| (e.field, e.problem, e.hint)),
            Err((problem, hint)) => Err((String::new(), problem, hint)),
        };
        match parsed {
            Ok((id, conversation)) => records.push(Record {
                id: id.unwrap_or_else(|| match location {
                    Location::Line(n) => format!("line-{n}"),
                    Location::Index(n) => format!("record-{n}"),
                }),
                location,
                conversation,
            }),
            Err((field, problem, hint)) => {
                let err = RecordError {
                    path: path.to_path_buf(),
                    location,
                    field,
                    problem,
                    hint,
                };
                if !opts.skip_invalid {
                    return Err(Error::Record(Box::new(err)));
                }
                skipped.push(err);
            }
        }
    }
    if records.is_empty() {
        let (reason, hint) = match skipped.first() {
            None => (
                "the file holds no records".to_string(),
                "write one record per line (JSONL), a JSON array of records, or Parquet rows"
                    .to_string(),
            ),
            Some(first) => (
                format!(
                    "no valid records: all {} are invalid; the first: {}",
                    skipped.len(),
                    first.to_string().replace('\n', " — ")
                ),
                "fix the records; `retort data inspect FILE --skip-invalid` lists every one".into(),
            ),
        };
        return Err(Error::File {
            path: path.to_path_buf(),
            reason,
            hint,
        });
    }
    Ok(Dataset {
        path: path.to_path_buf(),
        format,
        records,
        skipped,
        sha256,
    })
}

/// Split JSONL or a JSON array into records. Blank lines are ignored.
fn split_json(path: &Path, bytes: &[u8]) -> Result<RawRecords> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let text = std::str::from_utf8(bytes).map_err(|e| Error::File {
            path: path.to_path_buf(),
            reason: format!("not UTF-8 at byte {}", e.valid_up_to()),
            hint: "re-encode the file as UTF-8".into(),
        })?;
        let arr: Vec<Value> = serde_json::from_str(text).map_err(|e| Error::File {
            path: path.to_path_buf(),
            reason: format!(
                "invalid JSON array at line {} column {}: {e}",
                e.line(),
                e.column()
            ),
            hint: "fix the JSON, or write one record per line (JSONL)".into(),
        })?;
        return Ok(arr
            .into_iter()
            .enumerate()
            .map(|(i, v)| (Location::Index(i), Ok(v)))
            .collect());
    }
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let location = Location::Line(i + 1);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let value = match std::str::from_utf8(line) {
            Err(e) => Err((
                format!(
                    "not valid UTF-8 (bad byte at column {})",
                    e.valid_up_to() + 1
                ),
                "re-encode the file as UTF-8".to_string(),
            )),
            Ok(text) => serde_json::from_str::<Value>(text).map_err(|e| {
                (
                    format!("invalid JSON at column {}: {e}", e.column()),
                    "each line must be one complete JSON object (JSONL)".to_string(),
                )
            }),
        };
        out.push((location, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::Role;

    fn write(name: &str, content: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        fs_err::write(&p, content).unwrap();
        (dir, p)
    }

    const GOOD: &str = r#"{"id": "a", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}"#;

    #[test]
    fn reads_jsonl_and_skips_blank_lines() {
        let (_d, p) = write("d.jsonl", format!("{GOOD}\n\n{GOOD}\n").as_bytes());
        let ds = read(&p, &ReadOptions::default()).unwrap();
        assert_eq!(ds.format, Format::Messages);
        assert_eq!(ds.records.len(), 2);
        assert_eq!(ds.records[1].location, Location::Line(3));
        assert_eq!(ds.records[0].id, "a");
        assert_eq!(ds.sha256.len(), 64);
    }

    #[test]
    fn reads_a_json_array_of_alpaca_records() {
        let (_d, p) = write(
            "a.json",
            br#"[{"instruction": "i", "input": "", "output": "o"}, {"instruction": "j", "output": "p"}]"#,
        );
        let ds = read(&p, &ReadOptions::default()).unwrap();
        assert_eq!(ds.format, Format::Alpaca);
        assert_eq!(ds.records[1].id, "record-1");
        assert_eq!(ds.records[1].conversation.messages[1].role, Role::Assistant);
    }

    #[test]
    fn an_empty_file_is_called_empty_and_an_all_invalid_file_shows_the_first_reason() {
        for name in ["e.jsonl", "e.json"] {
            let (_d, p) = write(name, b"");
            let e = read(&p, &ReadOptions::default()).unwrap_err().to_string();
            assert!(e.contains("empty") && e.contains("hint:"), "{name}: {e}");
        }
        let (_d, p) = write("bad.jsonl", b"{\"messages\": []}\n");
        for skip_invalid in [false, true] {
            let opts = ReadOptions {
                skip_invalid,
                ..Default::default()
            };
            let e = read(&p, &opts).unwrap_err().to_string();
            assert!(e.contains("bad.jsonl:line 1"), "skip {skip_invalid}: {e}");
            assert!(!e.contains("run `retort data inspect` on"), "{e}");
        }
    }

    #[test]
    fn bad_records_stop_with_file_line_and_field_or_are_skipped() {
        let mut content = format!("{GOOD}\n").into_bytes();
        content.extend_from_slice(b"{not json\n");
        content.extend_from_slice(b"{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"\"}]}\n");
        content.extend_from_slice(
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}\n",
        );
        content.extend_from_slice(format!("{GOOD}\n").as_bytes());
        let (_d, p) = write("bad.jsonl", &content);
        let e = read(&p, &ReadOptions::default()).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl:line 2"), "{e}");
        assert!(e.contains("invalid JSON"), "{e}");
        assert!(e.contains("--skip-invalid"), "{e}");

        let ds = read(
            &p,
            &ReadOptions {
                skip_invalid: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(ds.records.len(), 2);
        assert_eq!(ds.skipped.len(), 3);
        assert_eq!(ds.skipped[1].location, Location::Line(3));
        assert_eq!(ds.skipped[1].field, "messages[1].content");
        assert!(
            ds.skipped[2].problem.contains("UTF-8"),
            "{:?}",
            ds.skipped[2]
        );
    }

    #[test]
    fn forced_format_and_unknown_shapes() {
        let (_d, p) = write("t.jsonl", b"{\"text\": \"x\"}\n");
        let e = read(&p, &ReadOptions::default()).unwrap_err().to_string();
        assert!(e.contains("no record has the shape"), "{e}");
        let e = read(
            &p,
            &ReadOptions {
                format: Some(Format::Sharegpt),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("field `conversations`: is missing"), "{e}");
    }
}
