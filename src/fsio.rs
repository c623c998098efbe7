//! Files, safely: reads of user-named files are capped in size (a scenario path naming `/dev/zero`
//! must be an error, not an out-of-memory kill), and every file fleetsim writes replaces its
//! predecessor atomically (write a temporary sibling, sync, rename), so a reader or a crash never
//! sees half a file. Files holding secrets are created owner-only (0600).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The largest configuration, scenario, key or certificate file read: far above any real one.
pub const MAX_INPUT_FILE: u64 = 16 * 1024 * 1024;

/// Reads a whole UTF-8 text file of at most `max` bytes. A larger (or endless) file is an
/// `InvalidData` error saying so, read no further than `max + 1` bytes.
pub fn read_text_capped(path: &Path, max: u64) -> std::io::Result<String> {
    let bytes = read_capped(path, max)?;
    String::from_utf8(bytes).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "is not UTF-8 text"))
}

/// Reads a whole file of at most `max` bytes; see [`read_text_capped`].
pub fn read_capped(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    std::fs::File::open(path)?.take(max.saturating_add(1)).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("is larger than {max} bytes (is it the right file?)"),
        ));
    }
    Ok(out)
}

/// Writes `bytes` to a temporary sibling, then renames it over `path`, mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic(path, bytes, 0o600)
}

/// Writes `bytes` to a temporary sibling with `mode`, syncs it, then renames it over `path`: the
/// file is either the old one or the new one, never a mix, whatever happens meanwhile.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut f = open_new(&tmp, mode)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    // The rename itself is durable once the directory is synced (best effort: not every
    // filesystem lets a directory be opened for that).
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A name beside `path` that no other writer in this or another process uses at the same time.
fn temp_sibling(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}.{n}", std::process::id()))
}

#[cfg(unix)]
fn open_new(path: &Path, mode: u32) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path)
}

#[cfg(not(unix))]
fn open_new(path: &Path, _mode: u32) -> std::io::Result<std::fs::File> {
    std::fs::File::create(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endless_and_oversized_files_are_refused_after_the_cap() {
        // Issue 10: a scenario path naming /dev/zero was read until the OOM killer came.
        let err = read_text_capped(Path::new("/dev/zero"), 1024).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("larger than 1024 bytes"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.toml");
        std::fs::write(&p, "a = 1\n").unwrap();
        assert_eq!(read_text_capped(&p, 6).unwrap(), "a = 1\n");
        assert!(read_text_capped(&p, 5).is_err());
    }

    #[test]
    fn atomic_writes_replace_whole_files_and_leave_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        write_atomic(&p, b"one", 0o644).unwrap();
        write_atomic(&p, b"two", 0o644).unwrap();
        write_private(&dir.path().join("keys.json"), b"{}").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let mut names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        names.sort();
        assert_eq!(names, ["ca.pem", "keys.json"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("keys.json")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A directory that does not exist fails cleanly.
        assert!(write_atomic(&dir.path().join("no/such/dir/x"), b"x", 0o644).is_err());
    }
}
