//! Checkpoints (DESIGN section 6): a consistent snapshot of every shard at
//! a clock, in files, and the restore of a job started on them.
//!
//! Layout under the checkpoint directory:
//! ```text
//! ckpt-00000040/MANIFEST              JSON: clock, workers, table specs, files
//! ckpt-00000040/t0000002a-...ckpt     the owned state of one key range
//! LATEST                              "ckpt-00000040": the newest complete one
//! ```
//! A range's file is the REPLICATE frames its owner would send a new replica
//! (keys, versions, values, per-key rule state, last applied push seqs and
//! progress), one format for replication and checkpoints. Every file is
//! written to a temporary name, synced and renamed; the MANIFEST, holding
//! the size and CRC-32C of every file, is written the same way once all
//! files are, and LATEST last. So a crash at any moment leaves the previous
//! checkpoint as LATEST, and a damaged or missing file is detected when the
//! checkpoint is opened, never restored from.
//!
//! Consistency comes from the scheduler: a checkpoint at clock `c` is taken
//! while every worker waits in `clock()` with all its pushes acknowledged, so
//! the shards hold exactly the pushes of clocks `< c`.

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::BytesMut;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::table::TableSpec;
use crate::transport::frame::{self, Decoder, Frame, Limits};

/// The file naming the newest complete checkpoint.
pub const LATEST: &str = "LATEST";
const MANIFEST: &str = "MANIFEST";
const FORMAT: u32 = 1;
/// Checkpoints kept besides the newest.
const KEEP_OLDER: usize = 1;

/// One range's file of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub table: u32,
    pub start: u64,
    pub end: u64,
    pub bytes: u64,
    pub crc32c: u32,
}

/// What a checkpoint holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Every push of clocks below this one is in, none later.
    pub clock: u32,
    pub workers: u32,
    pub tables: Vec<TableSpec>,
    pub files: Vec<FileEntry>,
}

/// The directory of the checkpoint at `clock`.
pub fn dir_for(root: &Path, clock: u32) -> PathBuf {
    root.join(format!("ckpt-{clock:08}"))
}

/// The file name of a range's state.
pub fn file_name(table: u32, start: u64, end: u64) -> String {
    format!("t{table:08x}-{start:016x}-{end:016x}.ckpt")
}

fn io(what: String, e: std::io::Error) -> Error {
    Error::io(what, e)
}

/// Writes `bytes` to `path` atomically: a temporary file, synced, renamed.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let ctx = |what: &str| format!("{what} {}", tmp.display());
    let mut f = std::fs::File::create(&tmp).map_err(|e| io(ctx("creating"), e))?;
    f.write_all(bytes).map_err(|e| io(ctx("writing"), e))?;
    f.sync_all().map_err(|e| io(ctx("syncing"), e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(format!("renaming {} to {}", tmp.display(), path.display()), e))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all(); // the rename itself is durable
    }
    Ok(())
}

/// Writes a range's frames as file `name` of checkpoint directory `dir`.
pub fn write_range(dir: &Path, table: u32, start: u64, end: u64, frames: &[Frame]) -> Result<FileEntry> {
    std::fs::create_dir_all(dir).map_err(|e| io(format!("creating {}", dir.display()), e))?;
    let mut bytes = Vec::new();
    for f in frames {
        bytes.extend_from_slice(&frame::encode(f));
    }
    let name = file_name(table, start, end);
    write_atomically(&dir.join(&name), &bytes)?;
    Ok(FileEntry { name, table, start, end, bytes: bytes.len() as u64, crc32c: crc32c::crc32c(&bytes) })
}

/// Reads and checks a range's file: its size and CRC must match the
/// manifest, and it must decode into whole frames.
pub fn read_range(dir: &Path, entry: &FileEntry) -> Result<Vec<Frame>> {
    let path = dir.join(&entry.name);
    let bytes = std::fs::read(&path).map_err(|e| io(format!("reading checkpoint file {}", path.display()), e))?;
    let corrupt = |why: String| Error::Config(format!("checkpoint file {} is corrupt: {why}", path.display()));
    if bytes.len() as u64 != entry.bytes {
        return Err(corrupt(format!("{} bytes, the manifest says {}", bytes.len(), entry.bytes)));
    }
    if crc32c::crc32c(&bytes) != entry.crc32c {
        return Err(corrupt("checksum mismatch".into()));
    }
    let mut buf = BytesMut::from(&bytes[..]);
    let mut dec = Decoder::new(Limits::default());
    let mut frames = Vec::new();
    while !buf.is_empty() {
        match dec.decode(&mut buf).map_err(|e| corrupt(e.to_string()))? {
            Some(f) => frames.push(f),
            None => return Err(corrupt("truncated frame".into())),
        }
    }
    Ok(frames)
}

/// Completes the checkpoint at `m.clock`: its MANIFEST, then LATEST; older
/// checkpoints beyond the one before are removed.
pub fn commit(root: &Path, m: &Manifest) -> Result<()> {
    let dir = dir_for(root, m.clock);
    std::fs::create_dir_all(&dir).map_err(|e| io(format!("creating {}", dir.display()), e))?;
    let json = serde_json::to_vec_pretty(m).map_err(|e| Error::Config(format!("encoding a manifest: {e}")))?;
    write_atomically(&dir.join(MANIFEST), &json)?;
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    write_atomically(&root.join(LATEST), name.as_bytes())?;
    // Prune: keep the newest and KEEP_OLDER before it.
    if let Ok(rd) = std::fs::read_dir(root) {
        let mut old: Vec<String> = rd
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .filter(|n| n.starts_with("ckpt-") && *n != name)
            .collect();
        old.sort();
        let drop = old.len().saturating_sub(KEEP_OLDER);
        for n in &old[..drop] {
            let _ = std::fs::remove_dir_all(root.join(n));
        }
    }
    Ok(())
}

/// The manifest of the checkpoint in `dir` (files are checked as they are
/// read).
pub fn open(dir: &Path) -> Result<Manifest> {
    let text = std::fs::read(dir.join(MANIFEST))
        .map_err(|e| io(format!("reading the manifest of checkpoint {}", dir.display()), e))?;
    serde_json::from_slice(&text)
        .map_err(|e| Error::Config(format!("the manifest of checkpoint {} is corrupt: {e}", dir.display())))
}

/// The newest complete checkpoint under `root`, verified file by file:
/// `None` when there is none; an error naming the problem when LATEST
/// points at something damaged or incomplete.
pub fn latest(root: &Path) -> Result<Option<(PathBuf, Manifest)>> {
    let latest = root.join(LATEST);
    let name = match std::fs::read_to_string(&latest) {
        Ok(n) => n.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(format!("reading {}", latest.display()), e)),
    };
    let refuse = |why: String| {
        Error::Config(format!(
            "the checkpoint {name:?} in {} is unusable: {why}; remove it (or point --checkpoint-dir elsewhere) to start afresh",
            root.display()
        ))
    };
    if name.is_empty() || name.contains('/') || !name.starts_with("ckpt-") {
        return Err(refuse(format!("{} does not name a checkpoint", latest.display())));
    }
    let dir = root.join(&name);
    let text = std::fs::read(dir.join(MANIFEST)).map_err(|e| refuse(format!("no manifest ({e})")))?;
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| refuse(format!("bad manifest: {e}")))?;
    if m.format != FORMAT {
        return Err(refuse(format!("format {} (this build reads {FORMAT})", m.format)));
    }
    for f in &m.files {
        if f.name.contains('/') || !m.tables.iter().any(|t| t.id == f.table) {
            return Err(refuse(format!("the manifest lists a bad file {:?}", f.name)));
        }
        let path = dir.join(&f.name);
        let bytes = std::fs::read(&path).map_err(|e| refuse(format!("{}: {e}", path.display())))?;
        if bytes.len() as u64 != f.bytes || crc32c::crc32c(&bytes) != f.crc32c {
            return Err(refuse(format!("{} is damaged (size or checksum differs from the manifest)", f.name)));
        }
    }
    Ok(Some((dir, m)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pserver-ckpt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn manifest(clock: u32, files: Vec<FileEntry>) -> Manifest {
        Manifest { format: FORMAT, clock, workers: 2, tables: vec![TableSpec::dense(7, 100, 1)], files }
    }

    #[test]
    fn a_committed_checkpoint_reads_back_and_older_ones_are_pruned() {
        let root = tmp("commit");
        assert!(latest(&root).unwrap().is_none());
        for clock in [10, 20, 30] {
            let f = Frame::new(22, 0, Bytes::from_static(b"meta")).with_segment(Bytes::from(vec![clock as u8; 100]));
            let e = write_range(&dir_for(&root, clock), 7, 0, 100, &[f.clone(), f]).unwrap();
            commit(&root, &manifest(clock, vec![e])).unwrap();
        }
        let (dir, m) = latest(&root).unwrap().unwrap();
        assert_eq!(m.clock, 30);
        let frames = read_range(&dir, &m.files[0]).unwrap();
        assert_eq!(frames.len(), 2);
        assert_eq!(&frames[0].segments[0][..], &[30u8; 100][..]);
        assert!(!dir_for(&root, 10).exists(), "the oldest checkpoint is pruned");
        assert!(dir_for(&root, 20).exists(), "the one before the newest is kept");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn damaged_or_partial_checkpoints_are_refused_with_a_clear_message() {
        let root = tmp("damaged");
        let f = Frame::new(22, 0, Bytes::new()).with_segment(Bytes::from(vec![1u8; 64]));
        let e = write_range(&dir_for(&root, 5), 7, 0, 100, &[f]).unwrap();
        commit(&root, &manifest(5, vec![e.clone()])).unwrap();
        // A flipped byte.
        let path = dir_for(&root, 5).join(&e.name);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[40] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = latest(&root).unwrap_err().to_string();
        assert!(err.contains("damaged") && err.contains("start afresh"), "{err}");
        // A missing file.
        std::fs::remove_file(&path).unwrap();
        assert!(latest(&root).unwrap_err().to_string().contains(&e.name));
        // LATEST naming a checkpoint without a manifest (a crash before it).
        std::fs::write(root.join(LATEST), "ckpt-00000099").unwrap();
        assert!(latest(&root).unwrap_err().to_string().contains("no manifest"));
        std::fs::write(root.join(LATEST), "../etc").unwrap();
        assert!(latest(&root).is_err());
        let _ = std::fs::remove_dir_all(&root);
    }
}
