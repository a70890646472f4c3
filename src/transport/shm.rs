//! Same-host one-sided access through files in shared memory (DESIGN
//! section 5, "shm").
//!
//! A server keeps its shard regions in files under /dev/shm (mode 0600, so
//! only processes of the same user can map them; removed when the shard is
//! dropped, and files of processes that died are removed at the next start).
//! A worker on the same host maps them read-only and reads slots itself,
//! validating every copy exactly as an RDMA READ is validated. Pushes travel
//! through a [`Ring`] per connection: the worker copies the encoded frame
//! into the shared ring and sends a small doorbell on the connection, so the
//! push keeps its place in the connection's order.
//!
//! This module owns files, mappings and the ring's byte protocol; what the
//! bytes mean is the server's and worker's business.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use memmap2::{MmapOptions, MmapRaw};
use parking_lot::Mutex;

use super::frame::{self, Frame, FrameHeader, HEADER_LEN, Limits};
use crate::error::{Error, Result};
use crate::store::Region;

/// Where shared-memory files go: `PSERVER_SHM_DIR`, else /dev/shm.
pub fn dir() -> PathBuf {
    std::env::var_os("PSERVER_SHM_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/dev/shm"))
}

/// Whether shared memory can be offered here.
pub fn available() -> bool {
    let d = dir();
    d.is_dir() && std::fs::metadata(&d).map(|m| !m.permissions().readonly()).unwrap_or(false)
}

const FILE_PREFIX: &str = "pserver-";

/// Files of one process: `pserver-<pid>-<nonce>-<name>`.
#[derive(Debug)]
pub struct Namespace {
    dir: PathBuf,
    prefix: String,
    next: AtomicU64,
}

impl Namespace {
    /// A namespace for this process; removes files left by dead processes.
    pub fn new() -> Result<Namespace> {
        let dir = dir();
        let removed = clean_stale(&dir);
        if removed > 0 {
            tracing::info!(removed, dir = %dir.display(), "removed shared-memory files of processes that died");
        }
        let nonce = crate::table::mix64_public(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
        ) & 0xffff_ffff;
        Ok(Namespace {
            dir,
            prefix: format!("{FILE_PREFIX}{}-{nonce:08x}", std::process::id()),
            next: AtomicU64::new(0),
        })
    }

    /// A new owner-only region file, removed when the region is dropped.
    pub fn create(&self, what: &str, bytes: usize) -> Result<Region> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{}-{what}-{n}", self.prefix));
        Region::create_owned_file(&path, bytes)
    }
}

/// Removes `pserver-<pid>-...` files whose process is gone. Returns how many.
pub fn clean_stale(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(FILE_PREFIX)) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else { continue };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let gone =
            unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone && std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// A region file mapped read-only: the worker's view of a server's shard.
/// Only loads are possible through it, and the pages are read-only, so a
/// worker cannot write a shard.
pub struct Mapped {
    map: MmapRaw,
    words: usize,
    path: PathBuf,
}

impl std::fmt::Debug for Mapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mapped({}, {} words)", self.path.display(), self.words)
    }
}

impl Mapped {
    pub fn open(path: &Path) -> Result<Mapped> {
        let ctx = || format!("mapping {}", path.display());
        let file = OpenOptions::new().read(true).open(path).map_err(|e| Error::io(ctx(), e))?;
        let len = file.metadata().map_err(|e| Error::io(ctx(), e))?.len() as usize;
        if len == 0 || !len.is_multiple_of(8) {
            return Err(Error::Config(format!("{} has {len} bytes: not a region", path.display())));
        }
        let map = MmapOptions::new().len(len).map_raw_read_only(&file).map_err(|e| Error::io(ctx(), e))?;
        Ok(Mapped { map, words: len / 8, path: path.to_path_buf() })
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page-aligned and `words * 8` bytes long, and
        // lives as long as `self`. The pages are mapped read-only and this
        // type only ever loads through the atomics (a store would fault, and
        // none is written); other processes write them concurrently, which is
        // why every access is atomic.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr() as *const AtomicU64, self.words) }
    }

    /// Copies `dst.len()` words from word `offset`, each read atomically (the
    /// guarantee slot validation relies on).
    pub fn read(&self, offset: usize, dst: &mut [u64]) -> Result<()> {
        let src = offset
            .checked_add(dst.len())
            .and_then(|end| self.words().get(offset..end))
            .ok_or_else(|| Error::Config(format!("words {offset}..+{} are outside {:?}", dst.len(), self)))?;
        crate::store::slot::copy_words(src, dst);
        Ok(())
    }

    /// `len` words from word `offset`, as atomics (for [`crate::store::slot::read_run`]).
    pub fn words_at(&self, offset: usize, len: usize) -> Result<&[AtomicU64]> {
        offset
            .checked_add(len)
            .and_then(|end| self.words().get(offset..end))
            .ok_or_else(|| Error::Config(format!("words {offset}..+{len} are outside {:?}", self)))
    }

    /// One word, Acquire (for progress words: slot stores before it are visible).
    pub fn load(&self, word: usize) -> Option<u64> {
        self.words().get(word).map(|w| w.load(Ordering::Acquire))
    }

    pub fn len_words(&self) -> usize {
        self.words
    }
}

/// Ring header words; data starts at byte 64 ([`RING_DATA_BYTE`]).
const RING_MAGIC: u64 = u64::from_le_bytes(*b"PSRING01");
/// Consumer position: bytes released so far (only grows).
pub const RING_HEAD: usize = 2;
/// Frames the consumer has taken so far (RDMA flow control).
pub const RING_CONSUMED: usize = 3;
const RING_DATA_WORD: usize = 8;
/// Where a ring's data starts, in bytes from the start of its region.
pub const RING_DATA_BYTE: usize = RING_DATA_WORD * 8;

/// Where a frame of `len` bytes goes when the producer is at `tail`: frames
/// never wrap, so one that does not fit before the end starts at the next
/// lap. Producer and consumer both follow this rule, which is what lets a
/// doorbell carry only a length.
pub fn ring_place(tail: u64, len: u64, cap: u64) -> u64 {
    let at = tail % cap;
    if at + len > cap { tail + (cap - at) } else { tail }
}

/// A single-producer (worker), single-consumer (server) ring of frames in a
/// shared file. Positions are byte counts that only grow; a frame never wraps
/// (the producer skips to the start when the end is too short).
pub struct Ring {
    region: RingMem,
    cap: u64,
    /// Producer only: where the next frame goes.
    tail: Mutex<u64>,
}

enum RingMem {
    Owned(Arc<Region>),
    Opened(Region),
}

impl RingMem {
    fn words(&self) -> &[AtomicU64] {
        match self {
            RingMem::Owned(r) => r.words(),
            RingMem::Opened(r) => r.words(),
        }
    }
}

impl Ring {
    /// Server side: a new ring of `bytes` of data.
    pub fn create(ns: &Namespace, bytes: usize) -> Result<Ring> {
        let cap = Self::capacity_for(bytes);
        Self::init(ns.create("ring", RING_DATA_WORD * 8 + cap as usize)?, cap)
    }

    /// A ring in anonymous memory (RDMA: the server's ring, registered for
    /// remote write, and the worker's staging copy of it).
    pub fn anon(bytes: usize) -> Result<Ring> {
        let cap = Self::capacity_for(bytes);
        Self::init(Region::anon(RING_DATA_WORD * 8 + cap as usize)?, cap)
    }

    /// The data capacity a ring of `bytes` gets.
    pub fn capacity_for(bytes: usize) -> u64 {
        (bytes.max(4096) as u64).div_ceil(8) * 8
    }

    fn init(region: Region, cap: u64) -> Result<Ring> {
        let w = region.words();
        w[0].store(RING_MAGIC, Ordering::Relaxed);
        w[1].store(cap, Ordering::Relaxed);
        Ok(Ring { region: RingMem::Owned(Arc::new(region)), cap, tail: Mutex::new(0) })
    }

    /// Bytes of data the ring holds.
    pub fn capacity(&self) -> u64 {
        self.cap
    }

    /// The ring's memory (header, then data from [`RING_DATA_BYTE`]), for
    /// registering it with a NIC; `None` for a ring opened from a file.
    pub fn region(&self) -> Option<&Arc<Region>> {
        match &self.region {
            RingMem::Owned(r) => Some(r),
            RingMem::Opened(_) => None,
        }
    }

    /// A header word (RDMA: the worker's mirror of the server's head and
    /// frame count lives in its staging ring's header).
    pub fn header_word(&self, word: usize) -> u64 {
        self.region.words()[word].load(Ordering::Acquire)
    }

    /// The producer's position: bytes written so far.
    pub fn tail(&self) -> u64 {
        *self.tail.lock()
    }

    /// The file the worker maps.
    pub fn path(&self) -> Option<&Path> {
        match &self.region {
            RingMem::Owned(r) => r.path(),
            RingMem::Opened(r) => r.path(),
        }
    }

    /// Worker side: maps the ring the server created.
    pub fn open(path: &Path) -> Result<Ring> {
        let region = Region::open_file(path)?;
        let w = region.words();
        let cap = w[1].load(Ordering::Relaxed);
        if w[0].load(Ordering::Relaxed) != RING_MAGIC
            || cap == 0
            || (RING_DATA_WORD as u64 * 8).checked_add(cap).is_none_or(|n| n > region.len_bytes() as u64)
        {
            return Err(Error::Config(format!("{} is not a pserver ring", path.display())));
        }
        Ok(Ring { region: RingMem::Opened(region), cap, tail: Mutex::new(0) })
    }

    fn data(&self) -> &[AtomicU64] {
        &self.region.words()[RING_DATA_WORD..RING_DATA_WORD + (self.cap / 8) as usize]
    }

    /// Producer: copies `frame`'s wire bytes into the ring; returns (position,
    /// length) for the doorbell, or `None` when there is no room (send the
    /// frame the ordinary way then).
    pub fn write(&self, frame: &Frame) -> Option<(u64, u64)> {
        let len = frame.wire_len();
        if len > self.cap {
            return None;
        }
        let mut tail = self.tail.lock();
        // Acquire: the consumer released this space after it finished reading.
        let head = self.region.words()[RING_HEAD].load(Ordering::Acquire);
        let pos = ring_place(*tail, len, self.cap);
        if pos + len - head > self.cap {
            return None;
        }
        let mut prefix = Vec::with_capacity(64);
        frame::encode_prefix(frame, &mut prefix);
        let data = self.data();
        let mut word = ((pos % self.cap) / 8) as usize;
        let mut put = |bytes: &[u8]| {
            for chunk in bytes.chunks(8) {
                let mut w = [0u8; 8];
                w[..chunk.len()].copy_from_slice(chunk);
                // Relaxed: the doorbell is sent through a socket after these
                // stores, and the consumer reads only after receiving it.
                data[word].store(u64::from_le_bytes(w), Ordering::Relaxed);
                word += 1;
            }
        };
        put(&prefix);
        for s in &frame.segments {
            put(s); // the last partial word is zero-filled: the padding
        }
        *tail = pos + len;
        Some((pos, len))
    }

    /// Consumer: the frame a doorbell announced, checked like any frame from
    /// the wire; then releases its space (and any skipped end before it).
    pub fn read(&self, pos: u64, len: u64, limits: &Limits) -> Result<Frame> {
        let bad = |d: String| Error::protocol("ring", d);
        let at = pos % self.cap;
        if len < HEADER_LEN as u64 || len > self.cap || at + len > self.cap || !len.is_multiple_of(8) {
            return Err(bad(format!("doorbell for {len} bytes at {pos} does not fit the ring")));
        }
        let mut buf = vec![0u64; (len / 8) as usize];
        crate::store::slot::copy_words(&self.data()[(at / 8) as usize..((at + len) / 8) as usize], &mut buf);
        // Release: the producer may reuse the space once it sees this.
        let w = self.region.words();
        w[RING_HEAD].store(pos + len, Ordering::Release);
        w[RING_CONSUMED].store(w[RING_CONSUMED].load(Ordering::Relaxed) + 1, Ordering::Release);
        let bytes = super::bytes_of_vec(buf);
        let header: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().expect("length checked");
        let h = FrameHeader::parse(&header, limits).map_err(|e| bad(e.to_string()))?;
        if h.body_len + HEADER_LEN as u64 != len {
            return Err(bad(format!("frame of {} bytes in a {len}-byte doorbell", h.body_len + HEADER_LEN as u64)));
        }
        frame::decode_body(&h, bytes.slice(HEADER_LEN..)).map_err(|e| bad(e.to_string()))
    }
}

impl Ring {
    /// Consumer: the next frame, of `len` bytes, placed by [`ring_place`]
    /// after the current head (a doorbell that carries only the length:
    /// RDMA write-with-immediate). Checked like [`Ring::read`].
    pub fn read_next(&self, len: u64, limits: &Limits) -> Result<Frame> {
        let head = self.region.words()[RING_HEAD].load(Ordering::Relaxed);
        if len == 0 || len > self.cap {
            return Err(Error::protocol("ring", format!("doorbell for {len} bytes in a ring of {}", self.cap)));
        }
        self.read(ring_place(head, len, self.cap), len, limits)
    }
}

/// Bytes for a doorbell's meta.
pub fn doorbell_meta(pos: u64, len: u64) -> Bytes {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&pos.to_le_bytes());
    v.extend_from_slice(&len.to_le_bytes());
    Bytes::from(v)
}

/// Parses a doorbell's meta.
pub fn parse_doorbell(meta: &[u8]) -> Option<(u64, u64)> {
    (meta.len() == 16).then(|| {
        (u64::from_le_bytes(meta[..8].try_into().expect("8")), u64::from_le_bytes(meta[8..].try_into().expect("8")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn frame(id: u64, n: usize) -> Frame {
        Frame::new(16, id, Bytes::from_static(b"meta")).with_segment(Bytes::from(vec![id as u8; n]))
    }

    #[test]
    fn frames_go_through_the_ring_in_order_and_wrap() {
        let ns = Namespace::new().unwrap();
        let server = Ring::create(&ns, 4096).unwrap();
        let worker = Ring::open(server.path().unwrap()).unwrap();
        for id in 0..200u64 {
            let f = frame(id, (id as usize * 13) % 1500);
            let (pos, len) = worker.write(&f).expect("room after each read");
            let got = server.read(pos, len, &Limits::default()).unwrap();
            assert_eq!(got, f);
        }
    }

    #[test]
    fn a_full_ring_refuses_until_space_is_released() {
        let ns = Namespace::new().unwrap();
        let server = Ring::create(&ns, 4096).unwrap();
        let worker = Ring::open(server.path().unwrap()).unwrap();
        let mut pending = Vec::new();
        while let Some(d) = worker.write(&frame(1, 1000)) {
            pending.push(d);
        }
        assert!(!pending.is_empty() && pending.len() < 5);
        let (pos, len) = pending.remove(0);
        server.read(pos, len, &Limits::default()).unwrap();
        assert!(worker.write(&frame(2, 1000)).is_some());
        assert!(worker.write(&frame(3, 100_000)).is_none(), "larger than the ring");
    }

    #[test]
    fn bad_doorbells_are_errors() {
        let ns = Namespace::new().unwrap();
        let server = Ring::create(&ns, 4096).unwrap();
        let l = Limits::default();
        assert!(server.read(0, 7, &l).is_err());
        assert!(server.read(4000, 800, &l).is_err());
        assert!(server.read(0, 64, &l).is_err(), "zeros are not a frame");
        assert!(parse_doorbell(&[0; 15]).is_none());
    }

    #[test]
    fn files_are_owner_only_removed_on_drop_and_mapped_read_only() {
        let ns = Namespace::new().unwrap();
        let r = ns.create("shard", 4096).unwrap();
        let path = r.path().unwrap().to_path_buf();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        r.words()[3].store(99, Ordering::Release);
        let m = Mapped::open(&path).unwrap();
        let mut out = [0u64; 2];
        m.read(2, &mut out).unwrap();
        assert_eq!(out, [0, 99]);
        assert!(m.read(usize::MAX - 1, &mut out).is_err());
        drop(r);
        assert!(!path.exists());
    }

    #[test]
    fn files_of_dead_processes_are_cleaned() {
        let d = dir();
        if !d.is_dir() {
            return;
        }
        // PIDs are below 2^22 on Linux: this one cannot exist.
        let stale = d.join(format!("{FILE_PREFIX}2147483646-deadbeef-shard-0"));
        std::fs::write(&stale, [0u8; 64]).unwrap();
        assert!(clean_stale(&d) >= 1);
        assert!(!stale.exists());
    }
}
