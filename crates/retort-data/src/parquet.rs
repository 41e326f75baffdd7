//! Parquet datasets: each row, with its columns as fields (nested lists and structs included), is
//! turned into a JSON object and then validated like a JSONL record.

use std::path::Path;

use crate::dataset::RawRecords;
use crate::error::{Error, Location, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};

/// Every row of a Parquet file as (row index, JSON object).
pub(crate) fn rows(path: &Path, bytes: Vec<u8>) -> Result<RawRecords> {
    let bad = |e: parquet::errors::ParquetError| Error::File {
        path: path.to_path_buf(),
        reason: format!("cannot read as Parquet: {e}"),
        hint: "the file is truncated or uses an unsupported codec (supported: \
               uncompressed, snappy, gzip, zstd); re-export it"
            .into(),
    };
    let reader = SerializedFileReader::new(bytes::Bytes::from(bytes)).map_err(bad)?;
    let mut out = Vec::new();
    for (i, row) in reader.get_row_iter(None).map_err(bad)?.enumerate() {
        let row = row.map_err(bad)?;
        out.push((Location::Index(i), Ok(row.to_json_value())));
    }
    Ok(out)
}
