//! Frames and their wire encoding.
//!
//! ```text
//! header   32 bytes, little-endian, bytemuck-plain (FrameHeader)
//! table    segments x u64: each segment's length in bytes
//! meta     meta_len bytes, zero-padded to a multiple of 8
//! segment  each zero-padded to a multiple of 8
//! ```
//! Every segment starts 8-byte aligned relative to the frame, so a received
//! segment can be viewed as `[u64]` or `[f32]` without copying. The decoder
//! validates the header (magic, version, counts, and that `body_len` is
//! exactly what the table and meta imply, under the configured limits) before
//! it allocates anything for the body: a huge length prefix is refused from
//! its first 32 bytes.

use bytemuck::{Pod, Zeroable};
use bytes::{Bytes, BytesMut};

/// Wire format version.
pub const VERSION: u8 = 1;
/// "PSRV" read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"PSRV");
/// Header size in bytes.
pub const HEADER_LEN: usize = 32;
/// Frame kind reserved by transports: "your byte stream was refused and the
/// connection is being closed"; segment 0 says why. Protocols use other kinds.
pub const KIND_STREAM_REFUSED: u16 = 0;

/// A message: what transports move. `kind` and `flags` are the protocol's;
/// `id` correlates a reply with its request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Frame {
    pub kind: u16,
    pub flags: u16,
    pub id: u64,
    pub meta: Bytes,
    pub segments: Vec<Bytes>,
}

impl Frame {
    pub fn new(kind: u16, id: u64, meta: impl Into<Bytes>) -> Frame {
        Frame { kind, flags: 0, id, meta: meta.into(), segments: Vec::new() }
    }

    pub fn with_segment(mut self, seg: Bytes) -> Frame {
        self.segments.push(seg);
        self
    }

    /// Bytes this frame occupies on the wire.
    pub fn wire_len(&self) -> u64 {
        HEADER_LEN as u64 + body_len(self.meta.len(), self.segments.iter().map(|s| s.len() as u64))
    }
}

fn pad8(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

fn body_len(meta: usize, segments: impl Iterator<Item = u64>) -> u64 {
    let mut n = pad8(meta as u64);
    for s in segments {
        n += 8 + pad8(s);
    }
    n
}

/// The fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct FrameHeader {
    pub magic: u32,
    pub version: u8,
    pub reserved: u8,
    pub kind: u16,
    pub flags: u16,
    pub segments: u16,
    pub meta_len: u32,
    pub id: u64,
    pub body_len: u64,
}

/// Bounds on what a peer may make us allocate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame, header included.
    pub max_frame: u64,
    pub max_meta: u32,
    pub max_segments: u16,
    /// Accepted connections an endpoint keeps open at once (and handshakes
    /// it runs at once).
    pub max_connections: usize,
    /// Unsent bytes queued for one connection before the endpoint stops
    /// reading from it (until half of them are sent).
    pub max_queued_bytes: u64,
}

/// Default of [`Limits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: 1 << 30,
            max_meta: 1 << 16,
            max_segments: 1024,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_queued_bytes: 64 << 20,
        }
    }
}

/// Why a byte stream is not a valid frame. The connection that sent it
/// cannot be trusted further and is closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {0:#010x} (not a pserver peer?)")]
    BadMagic(u32),
    #[error("unsupported wire version {0} (this build speaks {VERSION})")]
    BadVersion(u8),
    #[error("reserved header byte is {0}, expected 0")]
    Reserved(u8),
    #[error("{0} segments exceed the limit of {1}")]
    TooManySegments(u16, u16),
    #[error("meta of {0} bytes exceeds the limit of {1}")]
    MetaTooLarge(u32, u32),
    #[error("frame of {0} bytes exceeds the limit of {1}")]
    TooLarge(u64, u64),
    #[error("body length {declared} disagrees with its segment table ({implied})")]
    LengthMismatch { declared: u64, implied: u64 },
    #[error("body length {0} is too short for its own segment table")]
    Truncated(u64),
    #[error("non-zero padding")]
    Padding,
}

impl FrameHeader {
    /// Parses and checks a header against `limits`.
    pub fn parse(b: &[u8; HEADER_LEN], limits: &Limits) -> Result<FrameHeader, FrameError> {
        let h: FrameHeader = bytemuck::pod_read_unaligned(b);
        if h.magic != MAGIC {
            return Err(FrameError::BadMagic(h.magic));
        }
        if h.version != VERSION {
            return Err(FrameError::BadVersion(h.version));
        }
        if h.reserved != 0 {
            return Err(FrameError::Reserved(h.reserved));
        }
        if h.segments > limits.max_segments {
            return Err(FrameError::TooManySegments(h.segments, limits.max_segments));
        }
        if h.meta_len > limits.max_meta {
            return Err(FrameError::MetaTooLarge(h.meta_len, limits.max_meta));
        }
        let total = h.body_len.saturating_add(HEADER_LEN as u64);
        if total > limits.max_frame {
            return Err(FrameError::TooLarge(total, limits.max_frame));
        }
        let fixed = pad8(u64::from(h.meta_len)) + 8 * u64::from(h.segments);
        if h.body_len < fixed {
            return Err(FrameError::Truncated(h.body_len));
        }
        Ok(h)
    }
}

/// Writes the header, segment table and padded meta of `frame` into `out`;
/// the segments follow, each padded with [`padding`].
pub fn encode_prefix(frame: &Frame, out: &mut Vec<u8>) {
    let h = FrameHeader {
        magic: MAGIC,
        version: VERSION,
        reserved: 0,
        kind: frame.kind,
        flags: frame.flags,
        segments: frame.segments.len() as u16,
        meta_len: frame.meta.len() as u32,
        id: frame.id,
        body_len: body_len(frame.meta.len(), frame.segments.iter().map(|s| s.len() as u64)),
    };
    out.extend_from_slice(bytemuck::bytes_of(&h));
    for s in &frame.segments {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    }
    out.extend_from_slice(&frame.meta);
    out.extend_from_slice(padding(frame.meta.len()));
}

/// The zero bytes that pad `len` bytes to a multiple of 8.
pub fn padding(len: usize) -> &'static [u8] {
    &[0u8; 8][..(8 - len % 8) % 8]
}

/// Whether `frame` may be sent under `limits`: senders check before encoding
/// so that a too-large request fails locally with a clear error.
pub fn check_outgoing(frame: &Frame, limits: &Limits) -> Result<(), FrameError> {
    if frame.segments.len() > usize::from(limits.max_segments) {
        return Err(FrameError::TooManySegments(
            frame.segments.len().min(u16::MAX as usize) as u16,
            limits.max_segments,
        ));
    }
    if frame.meta.len() > limits.max_meta as usize {
        return Err(FrameError::MetaTooLarge(frame.meta.len() as u32, limits.max_meta));
    }
    let n = frame.wire_len();
    if n > limits.max_frame {
        return Err(FrameError::TooLarge(n, limits.max_frame));
    }
    Ok(())
}

/// Encodes a whole frame into one buffer (tests, small control frames).
pub fn encode(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.wire_len() as usize);
    encode_prefix(frame, &mut out);
    for s in &frame.segments {
        out.extend_from_slice(s);
        out.extend_from_slice(padding(s.len()));
    }
    out
}

/// Incremental decoder for a byte stream.
#[derive(Debug, Default)]
pub struct Decoder {
    limits: Limits,
    header: Option<FrameHeader>,
}

impl Decoder {
    pub fn new(limits: Limits) -> Self {
        Decoder { limits, header: None }
    }

    /// Bytes still needed before the next frame can be decoded (at least 1
    /// when the buffer holds less than a header).
    pub fn wanted(&self, buffered: usize) -> usize {
        match &self.header {
            None => HEADER_LEN.saturating_sub(buffered).max(1),
            Some(h) => (HEADER_LEN as u64 + h.body_len).saturating_sub(buffered as u64) as usize,
        }
    }

    /// Decodes the next frame from `buf`, consuming its bytes. `Ok(None)`
    /// means more bytes are needed; an error means the stream is corrupt.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let h = match self.header {
            Some(h) => h,
            None => {
                if buf.len() < HEADER_LEN {
                    return Ok(None);
                }
                let h = FrameHeader::parse(buf[..HEADER_LEN].try_into().expect("32 bytes"), &self.limits)?;
                self.header = Some(h);
                h
            }
        };
        let total = HEADER_LEN + h.body_len as usize;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        self.header = None;
        let whole = buf.split_to(total).freeze();
        decode_body(&h, whole.slice(HEADER_LEN..)).map(Some)
    }
}

/// Decodes a body whose header was already parsed. `body` is exactly
/// `h.body_len` bytes.
pub fn decode_body(h: &FrameHeader, body: Bytes) -> Result<Frame, FrameError> {
    let nseg = usize::from(h.segments);
    let mut lens = Vec::with_capacity(nseg);
    for i in 0..nseg {
        let l = u64::from_le_bytes(body[8 * i..8 * i + 8].try_into().expect("8 bytes"));
        lens.push(l);
    }
    let mut implied = pad8(u64::from(h.meta_len)) + 8 * nseg as u64;
    for &l in &lens {
        implied = implied.checked_add(pad8(l.min(u64::MAX - 8))).ok_or(FrameError::Truncated(h.body_len))?;
    }
    if implied != h.body_len {
        return Err(FrameError::LengthMismatch { declared: h.body_len, implied });
    }
    let mut at = 8 * nseg;
    let take = |at: &mut usize, len: usize| -> Result<Bytes, FrameError> {
        let seg = body.slice(*at..*at + len);
        let padded = pad8(len as u64) as usize;
        if body[*at + len..*at + padded].iter().any(|&b| b != 0) {
            return Err(FrameError::Padding);
        }
        *at += padded;
        Ok(seg)
    };
    let meta = take(&mut at, h.meta_len as usize)?;
    let mut segments = Vec::with_capacity(nseg);
    for l in lens {
        segments.push(take(&mut at, l as usize)?);
    }
    Ok(Frame { kind: h.kind, flags: h.flags, id: h.id, meta, segments })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Frame {
        Frame {
            kind: 7,
            flags: 3,
            id: 99,
            meta: Bytes::from_static(b"hello"),
            segments: vec![Bytes::from(vec![1u8; 13]), Bytes::new(), Bytes::from(vec![2u8; 16])],
        }
    }

    #[test]
    fn encode_then_decode_round_trips() {
        let f = sample();
        let wire = encode(&f);
        assert_eq!(wire.len() as u64, f.wire_len());
        assert_eq!(wire.len() % 8, 0);
        let mut buf = BytesMut::from(&wire[..]);
        let mut d = Decoder::default();
        assert_eq!(d.decode(&mut buf).unwrap(), Some(f));
        assert!(buf.is_empty());
    }

    #[test]
    fn frames_arriving_byte_by_byte_decode_once_complete() {
        let f = sample();
        let wire = encode(&f);
        let mut d = Decoder::default();
        let mut buf = BytesMut::new();
        for (i, b) in wire.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let r = d.decode(&mut buf).unwrap();
            assert_eq!(r.is_some(), i == wire.len() - 1);
            if let Some(got) = r {
                assert_eq!(got, f);
            }
        }
    }

    #[test]
    fn segments_are_eight_byte_aligned_within_the_frame() {
        let wire = encode(&sample());
        let mut buf = BytesMut::with_capacity(wire.len());
        buf.extend_from_slice(&wire);
        let base = buf.as_ptr() as usize;
        let f = Decoder::default().decode(&mut buf).unwrap().unwrap();
        for s in f.segments.iter().filter(|s| !s.is_empty()) {
            assert_eq!((s.as_ptr() as usize - base) % 8, 0);
        }
    }

    #[test]
    fn a_huge_length_prefix_is_refused_from_the_header_alone() {
        let mut h: FrameHeader = bytemuck::pod_read_unaligned(&encode(&sample())[..HEADER_LEN]);
        h.body_len = u64::MAX - 5;
        let mut buf = BytesMut::from(bytemuck::bytes_of(&h));
        let err = Decoder::default().decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(..)), "{err}");
        assert!(buf.capacity() < 1 << 20);
    }

    #[test]
    fn corrupt_headers_are_refused() {
        let wire = encode(&sample());
        let mut bad = wire.clone();
        bad[0] ^= 0xff;
        assert!(matches!(Decoder::default().decode(&mut BytesMut::from(&bad[..])), Err(FrameError::BadMagic(_))));
        let mut bad = wire.clone();
        bad[4] = 9;
        assert!(matches!(Decoder::default().decode(&mut BytesMut::from(&bad[..])), Err(FrameError::BadVersion(9))));
        // A segment length that disagrees with body_len.
        let mut bad = wire.clone();
        bad[HEADER_LEN] = 200;
        assert!(matches!(
            Decoder::default().decode(&mut BytesMut::from(&bad[..])),
            Err(FrameError::LengthMismatch { .. })
        ));
        // Non-zero padding after meta ("hello" + 3 pad bytes).
        let mut bad = wire;
        bad[HEADER_LEN + 24 + 6] = 1;
        assert_eq!(Decoder::default().decode(&mut BytesMut::from(&bad[..])), Err(FrameError::Padding));
    }

    #[test]
    fn limits_apply_to_meta_segments_and_size() {
        let f = sample();
        let small = Limits { max_frame: 64, ..Limits::default() };
        assert!(matches!(check_outgoing(&f, &small), Err(FrameError::TooLarge(..))));
        let mut d = Decoder::new(small);
        assert!(matches!(d.decode(&mut BytesMut::from(&encode(&f)[..])), Err(FrameError::TooLarge(..))));
        let few = Limits { max_segments: 2, ..Limits::default() };
        assert!(Decoder::new(few).decode(&mut BytesMut::from(&encode(&f)[..])).is_err());
        let tiny_meta = Limits { max_meta: 2, ..Limits::default() };
        assert!(Decoder::new(tiny_meta).decode(&mut BytesMut::from(&encode(&f)[..])).is_err());
    }

    proptest! {
        /// Any byte string is either decoded, refused, or needs more bytes;
        /// never a panic, and never an allocation beyond the limit.
        #[test]
        fn decoder_never_panics_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let limits = Limits { max_frame: 4096, max_meta: 256, max_segments: 8, ..Limits::default() };
            let mut d = Decoder::new(limits);
            let mut buf = BytesMut::from(&data[..]);
            for _ in 0..4 {
                match d.decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
            prop_assert!(buf.capacity() <= 4096 + 512);
        }

        /// Arbitrary bytes after a valid header prefix: same guarantee.
        #[test]
        fn decoder_never_panics_on_a_valid_header_with_garbage_body(
            segs in 0u16..6, meta_len in 0u32..64, body in proptest::collection::vec(any::<u8>(), 0..600)
        ) {
            let h = FrameHeader {
                magic: MAGIC, version: VERSION, reserved: 0, kind: 1, flags: 0, segments: segs,
                meta_len, id: 1, body_len: body.len() as u64,
            };
            let mut buf = BytesMut::from(bytemuck::bytes_of(&h));
            buf.extend_from_slice(&body);
            let _ = Decoder::default().decode(&mut buf);
        }

        /// Frames of any shape survive encode/decode, even split at any point.
        #[test]
        fn round_trip_any_frame(
            kind: u16, flags: u16, id: u64,
            meta in proptest::collection::vec(any::<u8>(), 0..40),
            segs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..5),
            split in 0usize..400,
        ) {
            let f = Frame { kind, flags, id, meta: meta.into(), segments: segs.into_iter().map(Bytes::from).collect() };
            let wire = encode(&f);
            let split = split.min(wire.len());
            let mut d = Decoder::default();
            let mut buf = BytesMut::from(&wire[..split]);
            let first = d.decode(&mut buf).unwrap();
            if split < wire.len() {
                prop_assert!(first.is_none());
                buf.extend_from_slice(&wire[split..]);
                prop_assert_eq!(d.decode(&mut buf).unwrap(), Some(f));
            } else {
                prop_assert_eq!(first, Some(f));
            }
        }
    }
}
