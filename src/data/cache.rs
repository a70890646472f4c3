//! The binary cache of parsed shards. Parsing text costs far more than
//! reading it, so a worker saves the `Dataset` it parsed and later runs load
//! it back at disk speed (`load_or_build`).
//!
//! Format, little-endian: a 32-byte header (magic, version u32, tag length
//! u32, rows u64, nnz u64), the tag (what the cache was built from), then
//! labels f32 x rows, offsets u64 x (rows + 1), features u64 x nnz, values
//! f32 x nnz, and last a crc32c of every byte before it. Files are replaced
//! atomically, so a crash leaves the old cache or none, never half of one.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::Path;
use std::time::UNIX_EPOCH;

use super::{Dataset, FeatureMode, Shard, Source, bad_data, write_atomically};
use crate::error::{Error, Result};

const MAGIC: [u8; 8] = *b"PSDATA\r\n";
const VERSION: u32 = 1;
const HEADER: u64 = 32;
const TRAILER: u64 = 4;

impl Dataset {
    /// Writes the dataset as a binary cache file (atomically).
    pub fn save_cache(&self, path: impl AsRef<Path>) -> Result<()> {
        save(path.as_ref(), self, b"")
    }

    /// Reads a cache file written by `save_cache`, checking it is complete
    /// and intact.
    pub fn load_cache(path: impl AsRef<Path>) -> Result<Dataset> {
        load(path.as_ref()).map(|(data, _tag)| data)
    }
}

/// Where `load_or_build` got its data from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheStatus {
    /// Loaded from the cache.
    Hit,
    /// Parsed; there was no cache for this input yet.
    Built,
    /// Parsed because the cache could not be used (the reason).
    Rebuilt(String),
}

/// This shard of `source`, from the cache in `cache_dir` when one was built
/// from the same input (paths, sizes, modification times), shard and
/// feature mode; otherwise parsed, and cached for next time. Failing to
/// write the cache is logged, not an error: the data is still good.
pub fn load_or_build(
    source: &Source,
    shard: Shard,
    mode: FeatureMode,
    cache_dir: impl AsRef<Path>,
) -> Result<(Dataset, CacheStatus)> {
    shard.validate()?;
    mode.validate()?;
    let key = cache_key(source, shard, mode)?;
    let path = cache_dir.as_ref().join(format!("{:016x}.psdata", xxhash_rust::xxh3::xxh3_64(key.as_bytes())));
    let mut status = CacheStatus::Built;
    if path.exists() {
        match load(&path) {
            Ok((data, tag)) if tag == key.as_bytes() => return Ok((data, CacheStatus::Hit)),
            Ok(_) => status = CacheStatus::Rebuilt("the cache file was built from other input".into()),
            Err(e) => status = CacheStatus::Rebuilt(e.to_string()),
        }
        if let CacheStatus::Rebuilt(reason) = &status {
            tracing::warn!(cache = %path.display(), reason, "data cache unusable; parsing the input again");
        }
    }
    let data = super::read(source, shard, mode)?;
    let saved = std::fs::create_dir_all(cache_dir.as_ref())
        .map_err(|e| Error::io(format!("creating {}", cache_dir.as_ref().display()), e))
        .and_then(|()| save(&path, &data, key.as_bytes()));
    if let Err(e) = saved {
        tracing::warn!(cache = %path.display(), error = %e, "could not write the data cache; continuing without it");
    }
    Ok((data, status))
}

/// Everything a shard's rows depend on. Stored in the cache file and
/// compared on load, so a hash collision of file names cannot serve the
/// wrong data.
fn cache_key(source: &Source, shard: Shard, mode: FeatureMode) -> Result<String> {
    let mut key = format!("pserver data cache v{VERSION}\nfeatures {mode}\nshard {shard}\n");
    let files: Vec<_> = match source {
        Source::File(path) => {
            key.push_str("split by byte ranges\n");
            vec![path]
        }
        Source::Files(files) => {
            key.push_str("split by files\n");
            shard.files(files).collect()
        }
    };
    for path in files {
        let io_err = |e| Error::io(format!("reading {}", path.display()), e);
        let meta = std::fs::metadata(path).map_err(io_err)?;
        let mtime = meta.modified().map_err(io_err)?.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let path = std::fs::canonicalize(path).map_err(io_err)?;
        let _ = writeln!(key, "file {:?} size {} mtime {mtime}", path.as_os_str(), meta.len());
    }
    Ok(key)
}

pub(crate) fn save(path: &Path, data: &Dataset, tag: &[u8]) -> Result<()> {
    let tag_len = u32::try_from(tag.len()).map_err(|_| Error::Config("data cache tag longer than 4 GiB".into()))?;
    write_atomically(path, |out| {
        let mut w = Crc { inner: out, crc: 0 };
        let mut write = || -> io::Result<()> {
            w.write_all(&MAGIC)?;
            w.write_all(&VERSION.to_le_bytes())?;
            w.write_all(&tag_len.to_le_bytes())?;
            w.write_all(&(data.rows() as u64).to_le_bytes())?;
            w.write_all(&(data.nnz() as u64).to_le_bytes())?;
            w.write_all(tag)?;
            write_array(&mut w, &data.labels)?;
            write_array(&mut w, &data.offsets)?;
            write_array(&mut w, &data.features)?;
            write_array(&mut w, &data.values)?;
            let crc = w.crc;
            w.inner.write_all(&crc.to_le_bytes())
        };
        write().map_err(|e| Error::io(format!("writing data cache {}", path.display()), e))
    })
}

pub(crate) fn load(path: &Path) -> Result<(Dataset, Vec<u8>)> {
    let io_err = |e| Error::io(format!("reading data cache {}", path.display()), e);
    let corrupt = |detail: String| bad_data(path.display(), format!("corrupt data cache: {detail}"));
    let file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    let mut r = Crc { inner: BufReader::new(file), crc: 0 };
    let mut header = Vec::with_capacity(HEADER as usize);
    (&mut r).take(HEADER).read_to_end(&mut header).map_err(io_err)?;
    let magic = header.len().min(MAGIC.len());
    if header[..magic] != MAGIC[..magic] {
        return Err(bad_data(path.display(), "not a pserver data cache (bad magic bytes)"));
    }
    if len < HEADER + TRAILER {
        return Err(bad_data(path.display(), format!("truncated data cache: {len} bytes, less than a header")));
    }
    let field = |at: usize, len: usize| header[at..at + len].iter().rev().fold(0u64, |n, &b| n << 8 | u64::from(b));
    let (version, tag_len, rows, nnz) = (field(8, 4), field(12, 4), field(16, 8), field(24, 8));
    if version != u64::from(VERSION) {
        return Err(bad_data(path.display(), format!("data cache version {version}; this build reads {VERSION}")));
    }
    // Check the counts against the file size before allocating anything.
    let expected = (|| {
        let arrays = rows.checked_mul(4)?.checked_add(rows.checked_add(1)?.checked_mul(8)?)?;
        HEADER.checked_add(tag_len)?.checked_add(arrays)?.checked_add(nnz.checked_mul(12)?)?.checked_add(TRAILER)
    })();
    if expected != Some(len) {
        let expected = expected.map_or("more than 2^64".into(), |n| n.to_string());
        return Err(corrupt(format!("truncated or bad header: it promises {expected} bytes, the file has {len}")));
    }
    // Both counts fit in memory now: they are bounded by the file's size.
    let (rows, nnz) = (rows as usize, nnz as usize);
    let mut tag = vec![0u8; tag_len as usize];
    r.read_exact(&mut tag).map_err(io_err)?;
    let labels = read_array::<f32>(&mut r, rows).map_err(io_err)?;
    let offsets = read_array::<u64>(&mut r, rows + 1).map_err(io_err)?;
    let features = read_array::<u64>(&mut r, nnz).map_err(io_err)?;
    let values = read_array::<f32>(&mut r, nnz).map_err(io_err)?;
    let computed = r.crc;
    let mut stored = [0u8; TRAILER as usize];
    r.inner.read_exact(&mut stored).map_err(io_err)?;
    let stored = u32::from_le_bytes(stored);
    if stored != computed {
        return Err(corrupt(format!("checksum mismatch (stored {stored:08x}, computed {computed:08x})")));
    }
    let data = Dataset::from_parts(labels, offsets, features, values).map_err(|e| corrupt(e.to_string()))?;
    Ok((data, tag))
}

/// Passes bytes through, keeping a crc32c of them.
struct Crc<T> {
    inner: T,
    crc: u32,
}

impl<W: Write> Write for Crc<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Crc<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        Ok(n)
    }
}

/// Array elements, stored little-endian.
trait Element: bytemuck::Pod {
    /// Little-endian to native or back (the same swap both ways).
    fn swap_le(self) -> Self;
}

impl Element for u64 {
    fn swap_le(self) -> Self {
        u64::from_le(self)
    }
}

impl Element for f32 {
    fn swap_le(self) -> Self {
        f32::from_bits(u32::from_le(self.to_bits()))
    }
}

fn write_array<T: Element>(w: &mut impl Write, items: &[T]) -> io::Result<()> {
    if cfg!(target_endian = "little") {
        return w.write_all(bytemuck::cast_slice(items));
    }
    items.iter().try_for_each(|x| w.write_all(bytemuck::bytes_of(&x.swap_le())))
}

/// Reads `n` elements straight into their vector, without a byte buffer.
fn read_array<T: Element>(r: &mut impl Read, n: usize) -> io::Result<Vec<T>> {
    let mut items = vec![T::zeroed(); n];
    r.read_exact(bytemuck::cast_slice_mut(&mut items))?;
    if cfg!(target_endian = "big") {
        items.iter_mut().for_each(|x| *x = x.swap_le());
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_are_stored_little_endian() {
        let mut bytes = Vec::new();
        write_array(&mut bytes, &[1u64, 2]).unwrap();
        write_array(&mut bytes, &[1.0f32]).unwrap();
        assert_eq!(&bytes[..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&bytes[16..], &1.0f32.to_le_bytes());
        assert_eq!(read_array::<u64>(&mut &bytes[..16], 2).unwrap(), [1, 2]);
    }

    #[test]
    fn the_checksum_covers_what_passed_through() {
        let mut w = Crc { inner: Vec::new(), crc: 0 };
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        assert_eq!(w.crc, crc32c::crc32c(b"hello world"));
        let mut r = Crc { inner: &b"hello world"[..], crc: 0 };
        r.read_exact(&mut [0; 11]).unwrap();
        assert_eq!(r.crc, w.crc);
    }
}
