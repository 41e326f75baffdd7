//! Whole-file writes that never leave a half-written file: a synced temp file beside the target
//! (`NAME.partial-PID`), then a rename.

use std::io::Write;
use std::path::Path;

use crate::error::Result;

/// Write `bytes` to `path` through a synced temp file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("partial-{}", std::process::id()));
    {
        let mut f = fs_err::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs_err::rename(&tmp, path)?;
    Ok(())
}
