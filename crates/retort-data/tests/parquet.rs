//! The Parquet reader on a file written by pyarrow (`scripts/fixtures/make_parquet.py`).

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::path::PathBuf;

use retort_data::{Format, Location, ReadOptions, Role, dataset};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat.parquet")
}

#[test]
fn reads_pyarrow_parquet_rows_as_messages() {
    let e = dataset::read(&fixture(), &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("chat.parquet:record 1"), "{e}");
    assert!(e.contains("messages[1].content"), "{e}");

    let ds = dataset::read(
        &fixture(),
        &ReadOptions {
            skip_invalid: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ds.format, Format::Messages);
    assert_eq!(ds.records.len(), 2);
    assert_eq!(ds.skipped.len(), 1);
    let r = &ds.records[0];
    assert_eq!(r.id, "p0");
    assert_eq!(r.location, Location::Index(0));
    assert_eq!(r.conversation.messages[0].role, Role::System);
    assert_eq!(r.conversation.messages[2].content, "4");
    assert_eq!(ds.records[1].conversation.messages[1].content, "Hi.");
}

#[test]
fn truncated_parquet_is_a_file_error() {
    let bytes = fs_err::read(fixture()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cut.parquet");
    fs_err::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = dataset::read(&p, &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("cut.parquet"), "{e}");
    assert!(e.contains("hint:"), "{e}");
}
