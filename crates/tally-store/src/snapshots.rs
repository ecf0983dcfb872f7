//! Snapshot files of the SQLite store. A snapshot is a cache of the state after a
//! journal sequence (the journal keeps every record), so it lives beside the database
//! in a directory of its own (`tally.db` keeps them in `tally.snapshots/`) rather than
//! in it: writing tens of megabytes into the database would hold SQLite's write lock,
//! and every commit behind it, for as long as the write and its sync take. A file is
//! written by a thread of its own, synced in small steps (so the disk never has much
//! of it queued ahead of a commit's sync), then renamed into place. Deleting the
//! directory loses nothing but restart time.
//!
//! A file names the journal record it follows by sequence, time and size, so a
//! snapshot left beside another database (or a journal restored from an older backup)
//! is recognized as foreign and ignored, never replayed onto.

use crate::codec::FORMAT_VERSION;
use crate::StoreError;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"TALLYSNP";
const END: &[u8; 8] = b"TALLYEND";
/// Magic, format, sequence, the journal record's time and commands length, state length.
const HEADER_LEN: usize = 8 + 4 + 8 + 8 + 8 + 8;
/// Bytes written between syncs while a snapshot is written.
const SYNC_EVERY_BYTES: usize = 1 << 20;
/// Snapshot files kept besides the newest, in case the newest is unreadable.
pub(crate) const SNAPSHOT_FILES_KEPT: usize = 2;
const SUFFIX: &str = ".snapshot";

/// The directory of `path`'s snapshots: `tally.db` keeps them in `tally.snapshots/`.
pub fn snapshot_dir(path: &Path) -> PathBuf {
    path.with_extension("snapshots")
}

/// What a snapshot says about the journal record it follows, checked against the
/// journal when loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct JournalMark {
    pub at: i64,
    pub commands_len: u64,
}

fn file_name(seq: u64) -> String {
    format!("{seq:020}{SUFFIX}")
}

/// The snapshot files in `dir`, newest first.
pub(crate) fn list(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error.into()),
    };
    let mut seqs = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = name.strip_suffix(SUFFIX).and_then(|digits| digits.parse::<u64>().ok()) {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable_by(|a, b| b.cmp(a));
    Ok(seqs)
}

/// Writes the snapshot of the state after `seq` and removes all but the newest few.
pub(crate) fn write(dir: &Path, seq: u64, mark: JournalMark, encoded: &[u8]) -> Result<(), StoreError> {
    std::fs::create_dir_all(dir)?;
    let temporary = dir.join(format!("{seq:020}.tmp"));
    let mut file = File::create(&temporary)?;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header.extend_from_slice(&seq.to_le_bytes());
    header.extend_from_slice(&mark.at.to_le_bytes());
    header.extend_from_slice(&mark.commands_len.to_le_bytes());
    header.extend_from_slice(&(encoded.len() as u64).to_le_bytes());
    debug_assert_eq!(header.len(), HEADER_LEN);
    file.write_all(&header)?;
    for chunk in encoded.chunks(SYNC_EVERY_BYTES) {
        file.write_all(chunk)?;
        file.sync_data()?;
    }
    file.write_all(END)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, dir.join(file_name(seq)))?;
    // The rename is durable once the directory is synced.
    File::open(dir)?.sync_all()?;
    // Only older ones: files with higher sequences can only be foreign (a journal
    // restored from an older backup); removing them would not help, and keeping the
    // newest three regardless would remove the snapshot just written.
    for old in list(dir)?.into_iter().filter(|old| *old < seq).skip(SNAPSHOT_FILES_KEPT) {
        std::fs::remove_file(dir.join(file_name(old)))?;
    }
    // Files of writes cut short (the process was killed mid-write).
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|extension| extension == "tmp") {
            std::fs::remove_file(path)?;
        }
    }
    Ok(())
}

/// Why a snapshot file was not used.
#[derive(Debug)]
pub(crate) enum Unusable {
    /// Not a complete snapshot file (cut short, or not ours).
    Malformed(&'static str),
    /// It follows a journal record this database does not have, or has differently.
    Foreign,
    Error(StoreError),
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unusable::Malformed(what) => write!(f, "malformed: {what}"),
            Unusable::Foreign => write!(f, "it follows a journal record this database does not have"),
            Unusable::Error(error) => write!(f, "{error}"),
        }
    }
}

/// Reads snapshot `seq` from `dir`; `mark` looks up the journal record it must follow.
/// Returns the encoded state.
pub(crate) fn read(
    dir: &Path,
    seq: u64,
    mark: impl FnOnce(u64) -> Result<Option<JournalMark>, StoreError>,
) -> Result<Vec<u8>, Unusable> {
    let bytes = std::fs::read(dir.join(file_name(seq))).map_err(|error| Unusable::Error(error.into()))?;
    if bytes.len() < HEADER_LEN + END.len() || &bytes[..8] != MAGIC {
        return Err(Unusable::Malformed("no snapshot header"));
    }
    let u64_at = |offset: usize| u64::from_le_bytes(bytes[offset..offset + 8].try_into().expect("8 bytes"));
    let format = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if format > FORMAT_VERSION {
        return Err(Unusable::Error(StoreError::NewerFormat { found: format, supported: FORMAT_VERSION }));
    }
    if u64_at(12) != seq {
        return Err(Unusable::Malformed("the sequence inside differs from the file name"));
    }
    let written = JournalMark { at: u64_at(20) as i64, commands_len: u64_at(28) };
    let length = u64_at(36) as usize;
    if bytes.len() != HEADER_LEN + length + END.len() || &bytes[HEADER_LEN + length..] != END {
        return Err(Unusable::Malformed("cut short"));
    }
    match mark(seq).map_err(Unusable::Error)? {
        Some(journal) if journal == written => {}
        _ => return Err(Unusable::Foreign),
    }
    let mut bytes = bytes;
    bytes.truncate(HEADER_LEN + length);
    bytes.drain(..HEADER_LEN);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARK: JournalMark = JournalMark { at: 1_700_000_000_000, commands_len: 42 };

    #[test]
    fn a_written_snapshot_reads_back_and_only_the_newest_are_kept() {
        let directory = tempfile::tempdir().unwrap();
        let dir = snapshot_dir(&directory.path().join("t.db"));
        for seq in 1..=5u64 {
            write(&dir, seq, MARK, &vec![seq as u8; 3_000_000]).unwrap();
        }
        assert_eq!(list(&dir).unwrap(), vec![5, 4, 3]);
        // A write cut short leaves a temporary file, which is neither read nor kept.
        std::fs::write(dir.join(format!("{:020}.tmp", 9)), b"half").unwrap();
        assert_eq!(list(&dir).unwrap(), vec![5, 4, 3]);
        write(&dir, 6, MARK, b"six").unwrap();
        assert_eq!(list(&dir).unwrap(), vec![6, 5, 4]);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 3);
        let bytes = read(&dir, 5, |_| Ok(Some(MARK))).unwrap();
        assert_eq!(read(&dir, 6, |_| Ok(Some(MARK))).unwrap(), b"six");
        assert_eq!(bytes, vec![5u8; 3_000_000]);
    }

    #[test]
    fn files_left_from_a_longer_journal_never_push_out_the_snapshot_just_written() {
        let directory = tempfile::tempdir().unwrap();
        let dir = snapshot_dir(&directory.path().join("t.db"));
        for seq in [10, 11, 12, 1, 2, 3] {
            write(&dir, seq, MARK, b"state").unwrap();
        }
        write(&dir, 4, MARK, b"state").unwrap();
        assert_eq!(list(&dir).unwrap(), vec![12, 11, 10, 4, 3, 2]);
    }

    #[test]
    fn a_cut_short_or_foreign_snapshot_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        let dir = snapshot_dir(&directory.path().join("t.db"));
        write(&dir, 7, MARK, b"state").unwrap();
        assert!(matches!(read(&dir, 7, |_| Ok(None)), Err(Unusable::Foreign)));
        let other = JournalMark { at: MARK.at + 1, ..MARK };
        assert!(matches!(read(&dir, 7, |_| Ok(Some(other))), Err(Unusable::Foreign)));
        let path = dir.join(file_name(7));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert!(matches!(read(&dir, 7, |_| Ok(Some(MARK))), Err(Unusable::Malformed(_))));
        std::fs::write(&path, b"not a snapshot").unwrap();
        assert!(matches!(read(&dir, 7, |_| Ok(Some(MARK))), Err(Unusable::Malformed(_))));
    }
}
