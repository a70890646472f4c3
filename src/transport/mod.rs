//! Transports: how nodes exchange frames (two-sided) and read or write each
//! other's registered memory (one-sided). DESIGN section 5.
//!
//! This module knows nothing about tables, keys or updaters: a [`Frame`] is a
//! kind, an id, a small `meta` blob and a list of byte segments, and remote
//! memory is words at offsets of registered regions. Servers and workers use
//! transports only through [`Transport`], [`Messenger`], [`Handler`] and
//! [`RemoteMemory`].
//!
//! Implementations: [`inproc`] (threads of one process; the embedded job and
//! the tests), [`tcp`] (authenticated with the job's token, see [`auth`]),
//! and the one-sided side channels beside TCP: [`shm`] (same host) and
//! [`rdma`], whose set-up travels over the authenticated TCP connection.

pub mod auth;
pub mod frame;
pub mod inproc;
pub mod rdma;
pub mod shm;
pub mod tcp;

use std::fmt;
use std::sync::Arc;

use bytemuck::{Pod, Zeroable};
use bytes::Bytes;

use crate::error::Result;
use crate::store::Region;

pub use frame::{Frame, Limits};

/// A connection as seen from one endpoint. Ids are local to the endpoint that
/// assigned them (the connector and the acceptor each have their own).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer#{}", self.0)
    }
}

/// Receives what arrives at an endpoint. Called from the transport's
/// receiving threads (or, in process, the sender's thread): it must not block
/// on anything that waits for the caller. Handing work to a bounded queue is
/// fine; that is how backpressure reaches senders.
pub trait Handler: Send + Sync + 'static {
    /// A frame from `from`; reply through `net`.
    fn on_frame(&self, net: &Arc<dyn Messenger>, from: PeerId, frame: Frame);
    /// `peer` is gone; nothing more will arrive from it.
    fn on_disconnect(&self, _net: &Arc<dyn Messenger>, _peer: PeerId) {}
}

/// One endpoint's two-sided messaging.
pub trait Messenger: Send + Sync + 'static {
    /// The address other nodes connect to.
    fn local_addr(&self) -> String;
    /// Connects to the endpoint at `addr`.
    fn connect(&self, addr: &str) -> Result<PeerId>;
    /// Queues `frame` for `peer`. Frames to one peer arrive in the order sent.
    fn send(&self, peer: PeerId, frame: Frame) -> Result<()>;
    /// The remote address of `peer`, for messages and logs.
    fn peer_addr(&self, peer: PeerId) -> String;
    /// Closes one connection.
    fn disconnect(&self, peer: PeerId);
    /// Closes the endpoint and every connection; pending sends may be lost.
    fn shutdown(&self);
    /// Whether `peer` runs on this host (so shared memory can reach it).
    fn same_host(&self, peer: PeerId) -> bool {
        let _ = peer;
        false
    }
    /// The address to tell others, as seen on the connection `via` (differs
    /// from `local_addr` when bound to a wildcard address).
    fn advertised_addr(&self, via: PeerId) -> String {
        let _ = via;
        self.local_addr()
    }
    /// This endpoint's one-sided access, where the transport offers it.
    fn remote_memory(&self) -> Option<Arc<dyn RemoteMemory>> {
        None
    }
    /// What this endpoint moved and refused so far (zeros where not counted).
    fn stats(&self) -> TransportStats {
        TransportStats::default()
    }
}

/// An endpoint's counters: whole frames (headers included) each way, and
/// connections refused for failing authentication or over a limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportStats {
    /// Connections open now.
    pub connections: u64,
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub auth_failures: u64,
    pub refused: u64,
}

/// Creates endpoints.
pub trait Transport: Send + Sync + 'static {
    /// "inproc", "tcp", ...
    fn name(&self) -> &'static str;
    /// Opens an endpoint at `addr` (an empty address picks a free one) whose
    /// arrivals go to `handler`.
    fn bind(&self, addr: &str, handler: Arc<dyn Handler>) -> Result<Arc<dyn Messenger>>;
}

/// Rights a peer gets on a registered region. Least privilege: shards are
/// registered `READ` only; `WRITE` is for a worker's own push ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
#[repr(transparent)]
pub struct Access(u32);

impl Access {
    pub const READ: Access = Access(1);
    pub const WRITE: Access = Access(2);
    pub const READ_WRITE: Access = Access(3);

    pub fn allows(self, wanted: Access) -> bool {
        self.0 & wanted.0 == wanted.0
    }
    pub fn bits(self) -> u32 {
        self.0
    }
    /// Parses wire bits; unknown bits are refused.
    pub fn from_bits(bits: u32) -> Option<Access> {
        (bits & !3 == 0).then_some(Access(bits))
    }
}

/// The wire description of a registered region: enough for a peer to read or
/// write it one-sided. Fixed size, plain old data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable, serde::Serialize, serde::Deserialize)]
#[repr(C)]
pub struct RegionDesc {
    /// Registry id (inproc, shm) or remote address (RDMA).
    pub id: u64,
    /// Length in bytes.
    pub len: u64,
    /// Remote key (RDMA rkey); 0 elsewhere.
    pub rkey: u32,
    /// `Access` bits.
    pub access: u32,
}

impl RegionDesc {
    pub fn to_bytes(&self) -> [u8; 24] {
        bytemuck::cast(*self)
    }
    pub fn from_bytes(b: &[u8]) -> Option<RegionDesc> {
        let d: RegionDesc = bytemuck::try_pod_read_unaligned(b).ok()?;
        Access::from_bits(d.access)?;
        Some(d)
    }
    pub fn access(&self) -> Access {
        Access::from_bits(self.access).unwrap_or(Access(0))
    }
}

/// A local buffer for one-sided operations, passed by ownership into a post
/// and returned with its completion, so it cannot be touched while a transfer
/// may still write it. Transports with registered memory hand out buffers from
/// their pools through [`RemoteMemory::alloc`].
#[derive(Debug)]
pub struct LocalBuf {
    words: Vec<u64>,
}

impl LocalBuf {
    pub fn len(&self) -> usize {
        self.words.len()
    }
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }
}

impl std::ops::Deref for LocalBuf {
    type Target = [u64];
    fn deref(&self) -> &[u64] {
        &self.words
    }
}

impl std::ops::DerefMut for LocalBuf {
    fn deref_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }
}

/// A finished one-sided operation.
#[derive(Debug)]
pub struct Completion {
    /// The id given when posting.
    pub wr_id: u64,
    /// The buffer given when posting (for a read: now holding the words).
    pub buf: LocalBuf,
    pub result: Result<()>,
}

/// One-sided access to registered memory (DESIGN section 5). Offsets and
/// lengths are in 64-bit words: an aligned word is the unit every transport
/// reads atomically, which is what slot validation relies on.
pub trait RemoteMemory: Send + Sync + 'static {
    /// Server side: exposes `region` to peers with `access`.
    fn register(&self, region: Arc<Region>, access: Access) -> Result<RegionDesc>;
    /// Server side: withdraws a region; later operations on it fail.
    fn deregister(&self, desc: &RegionDesc);
    /// A buffer of `words` words usable in posts.
    fn alloc(&self, words: usize) -> Result<LocalBuf>;
    /// Reads `buf.len()` words at word `offset` of `region` into `buf`.
    fn post_read(&self, region: &RegionDesc, offset: u64, buf: LocalBuf, wr_id: u64) -> Result<()>;
    /// Writes `buf` at word `offset` of `region`; `imm`, when given, rings the
    /// owner's doorbell after the data is in place.
    fn post_write(&self, region: &RegionDesc, offset: u64, buf: LocalBuf, imm: Option<u32>, wr_id: u64) -> Result<()>;
    /// Moves finished operations into `out` (at most `max`), waiting for at
    /// least one when `block` is set and anything is outstanding.
    fn poll(&self, out: &mut Vec<Completion>, max: usize, block: bool) -> Result<usize>;
    /// Doorbells rung on regions this endpoint registered: (region id, imm).
    fn take_doorbells(&self, out: &mut Vec<(u64, u32)>);

    /// Reads synchronously: post, then wait for this read's completion.
    /// Other completions that arrive meanwhile are dropped, so do not mix this
    /// with outstanding posts.
    fn read(&self, region: &RegionDesc, offset: u64, buf: LocalBuf) -> Result<LocalBuf> {
        const SYNC_ID: u64 = u64::MAX;
        self.post_read(region, offset, buf, SYNC_ID)?;
        let mut done = Vec::new();
        loop {
            self.poll(&mut done, 16, true)?;
            if let Some(pos) = done.iter().position(|c| c.wr_id == SYNC_ID) {
                let c = done.swap_remove(pos);
                return c.result.map(|()| c.buf);
            }
            done.clear();
        }
    }
}

/// Reinterprets a segment as plain values when it is suitably aligned, else
/// copies it (received buffers are normally 8-aligned, so this is a view).
pub fn pod_slice<T: Pod>(b: &Bytes) -> std::borrow::Cow<'_, [T]> {
    match bytemuck::try_cast_slice(b) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => std::borrow::Cow::Owned(bytemuck::pod_collect_to_vec(b)),
    }
}

/// Makes a segment from a vector of plain values without copying it.
pub fn bytes_of_vec<T: Pod + Send + Sync>(v: Vec<T>) -> Bytes {
    struct Owner<T>(Vec<T>);
    impl<T: Pod> AsRef<[u8]> for Owner<T> {
        fn as_ref(&self) -> &[u8] {
            bytemuck::cast_slice(&self.0)
        }
    }
    Bytes::from_owner(Owner(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_desc_round_trips_through_bytes_and_refuses_unknown_access_bits() {
        let d = RegionDesc { id: 0xdead_beef_0000_0001, len: 4096, rkey: 77, access: Access::READ.bits() };
        assert_eq!(RegionDesc::from_bytes(&d.to_bytes()), Some(d));
        let mut b = d.to_bytes();
        b[20] = 0x80;
        assert_eq!(RegionDesc::from_bytes(&b), None);
        assert_eq!(RegionDesc::from_bytes(&b[..10]), None);
    }

    #[test]
    fn access_is_least_privilege() {
        assert!(Access::READ_WRITE.allows(Access::WRITE));
        assert!(!Access::READ.allows(Access::WRITE));
        assert!(!Access::WRITE.allows(Access::READ));
    }

    #[test]
    fn vec_to_bytes_is_zero_copy_and_pod_slice_views_it() {
        let v: Vec<f32> = vec![1.0, 2.0, 3.0];
        let p = v.as_ptr() as usize;
        let b = bytes_of_vec(v);
        assert_eq!(b.as_ptr() as usize, p);
        let s = pod_slice::<f32>(&b);
        assert!(matches!(s, std::borrow::Cow::Borrowed(_)));
        assert_eq!(&*s, &[1.0, 2.0, 3.0]);
        let unaligned = b.slice(1..9);
        assert_eq!(pod_slice::<f32>(&unaligned).len(), 2);
    }
}
