//! File handling every crate shares: whole-file writes that never leave a half-written file (a
//! synced temp file beside the target, `NAME.partial-PID`, then a rename), removal of what a
//! killed writer left behind, and content hashes. Errors are `std::io::Error`s from `fs_err`,
//! which name the file.

use std::io::{Result, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

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

/// Remove what a process killed mid-write left in `dir`: `NAME.partial-PID` files of
/// [`write_atomic`] and `.NAME.partial` checkpoint directories. Never listed anywhere, so safe
/// to remove once no run is writing into `dir` (the caller holds the run).
pub fn remove_partials(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    let Ok(entries) = fs_err::read_dir(dir) else {
        return Ok(0); // nothing written yet
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let leftover =
            name.contains(".partial-") || (name.starts_with('.') && name.ends_with(".partial"));
        if !leftover {
            continue;
        }
        if e.path().is_dir() {
            fs_err::remove_dir_all(e.path())?;
        } else {
            fs_err::remove_file(e.path())?;
        }
        removed += 1;
    }
    Ok(removed)
}

/// Hex SHA-256 of a file's bytes, streamed (weights files are gigabytes).
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs_err::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partials_left_by_a_killed_writer_are_removed_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        fs_err::write(p.join("latest"), "step-2").unwrap();
        fs_err::write(p.join("latest.partial-4242"), "step-").unwrap();
        fs_err::create_dir(p.join(".step-3.partial")).unwrap();
        fs_err::write(p.join(".step-3.partial/model.safetensors"), "x").unwrap();
        fs_err::create_dir(p.join("step-2")).unwrap();
        assert_eq!(remove_partials(p).unwrap(), 2);
        let mut left: Vec<String> = fs_err::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["latest", "step-2"]);
        write_atomic(&p.join("latest"), b"step-3").unwrap();
        assert_eq!(fs_err::read_to_string(p.join("latest")).unwrap(), "step-3");
        assert_eq!(remove_partials(&p.join("missing")).unwrap(), 0);
    }

    #[test]
    fn file_and_byte_hashes_agree_with_the_known_digest() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("abc");
        write_atomic(&p, b"abc").unwrap();
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_file(&p).unwrap(), want);
        assert_eq!(sha256_hex(b"abc"), want);
        assert!(
            sha256_file(&d.path().join("missing"))
                .unwrap_err()
                .to_string()
                .contains("missing")
        );
    }
}
