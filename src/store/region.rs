//! Regions: the raw memory shards live in.
//!
//! A region is a page-aligned mapping (anonymous, or backed by a file such as
//! one under /dev/shm) viewed as a slice of `AtomicU64` words. Owning the
//! mapping is all this module does: what the words mean is `slot`'s and
//! `shard`'s business. A region never moves or shrinks while it exists, so a
//! transport may register it once (RDMA memory region, shm file) and hand its
//! address to remote readers.
//!
//! Every access from this process goes through the atomic view, because other
//! threads, other processes (shm) and NICs (RDMA) read the words while the
//! owner writes them; plain references to the bytes would be data races.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};

/// Bytes in a cache line; slots areas and headers start on this boundary.
pub const CACHE_LINE: usize = 64;

/// A fixed-size, page-aligned mapping seen as atomic 64-bit words.
pub struct Region {
    map: MmapRaw,
    words: usize,
    path: Option<PathBuf>,
    /// Remove the backing file when the region is dropped (its creator owns it).
    unlink: bool,
}

impl Drop for Region {
    fn drop(&mut self) {
        if self.unlink
            && let Some(p) = &self.path
        {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("bytes", &self.len_bytes()).field("path", &self.path).finish()
    }
}

fn round_len(bytes: usize) -> usize {
    // At least one cache line, and a whole number of cache lines so that the
    // atomic view covers every byte of the mapping.
    bytes.max(CACHE_LINE).div_ceil(CACHE_LINE) * CACHE_LINE
}

impl Region {
    /// A zero-filled anonymous region of at least `bytes` bytes. The kernel
    /// backs pages lazily, so a large region costs only what is touched.
    pub fn anon(bytes: usize) -> Result<Self> {
        let len = round_len(bytes);
        let map = MmapOptions::new()
            .len(len)
            .map_anon()
            .map_err(|e| Error::io(format!("mapping an anonymous region of {len} bytes"), e))?;
        Ok(Region { map: map.into(), words: len / 8, path: None, unlink: false })
    }

    /// A zero-filled region backed by a new file at `path` (created with mode
    /// 0600, replacing any file of that name), shared with every process that
    /// maps the same file.
    pub fn create_file(path: &Path, bytes: usize) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let len = round_len(bytes);
        let ctx = || format!("creating region file {}", path.display());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::io(ctx(), e))?;
        file.set_len(len as u64).map_err(|e| Error::io(ctx(), e))?;
        let map = MmapOptions::new().len(len).map_raw(&file).map_err(|e| Error::io(ctx(), e))?;
        Ok(Region { map, words: len / 8, path: Some(path.to_path_buf()), unlink: false })
    }

    /// [`Region::create_file`], removing the file when the region is dropped.
    pub fn create_owned_file(path: &Path, bytes: usize) -> Result<Self> {
        let mut r = Region::create_file(path, bytes)?;
        r.unlink = true;
        Ok(r)
    }

    /// Maps an existing region file (for example a server's shard under
    /// /dev/shm). The file's size must be a whole number of cache lines.
    pub fn open_file(path: &Path) -> Result<Self> {
        let ctx = || format!("opening region file {}", path.display());
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| Error::io(ctx(), e))?;
        let len = file.metadata().map_err(|e| Error::io(ctx(), e))?.len() as usize;
        if len == 0 || !len.is_multiple_of(CACHE_LINE) {
            return Err(Error::Config(format!(
                "region file {} has {len} bytes, not a positive multiple of {CACHE_LINE}",
                path.display()
            )));
        }
        let map = MmapOptions::new().len(len).map_raw(&file).map_err(|e| Error::io(ctx(), e))?;
        Ok(Region { map, words: len / 8, path: None, unlink: false })
    }

    /// The region as atomic words.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page-aligned (mmap guarantees it), so its
        // start satisfies AtomicU64's 8-byte alignment; it is `self.words * 8`
        // bytes long (round_len makes the length a multiple of 64) and stays
        // mapped for as long as `self` lives, which bounds the returned
        // lifetime. AtomicU64 has the same size as u64 and every bit pattern is
        // valid, and all accesses from this process go through these atomics,
        // so no plain reference ever aliases memory another thread writes.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr() as *const AtomicU64, self.words) }
    }

    /// Length in bytes (a multiple of [`CACHE_LINE`]).
    pub fn len_bytes(&self) -> usize {
        self.words * 8
    }

    /// Start address, for registering the region with a NIC.
    pub fn as_ptr(&self) -> *const u8 {
        self.map.as_ptr()
    }

    /// The backing file, when this region created one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn anonymous_region_is_zeroed_aligned_and_rounded() {
        let r = Region::anon(100).unwrap();
        assert_eq!(r.len_bytes(), 128);
        assert_eq!(r.as_ptr() as usize % 4096, 0);
        assert!(r.words().iter().all(|w| w.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn file_region_is_shared_between_mappings_and_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("pserver-region-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r");
        let a = Region::create_file(&path, 4096).unwrap();
        let b = Region::open_file(&path).unwrap();
        a.words()[7].store(42, Ordering::Release);
        assert_eq!(b.words()[7].load(Ordering::Acquire), 42);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn opening_a_missing_or_odd_sized_file_is_an_error() {
        assert!(Region::open_file(Path::new("/nonexistent/pserver-region")).is_err());
        let path = std::env::temp_dir().join(format!("pserver-odd-{}", std::process::id()));
        std::fs::write(&path, [1u8; 10]).unwrap();
        let err = Region::open_file(&path).unwrap_err().to_string();
        assert!(err.contains("not a positive multiple"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
}
