//! RDMA: one-sided pulls and pushes over RC queue pairs (DESIGN section 5,
//! "rdma"), beside the TCP control channel that sets them up.
//!
//! # What lives here
//! * [`verbs`]: the only module that calls `rdma-sys`; safe, typed wrappers
//!   (device list, context, protection domain, memory region, completion
//!   channel and queue, RC queue pair).
//! * [`Rdma`]: the process's device, port, GID and its one protection domain,
//!   opened once. [`memlock`] checks `RLIMIT_MEMLOCK` before every
//!   registration and explains a limit that is too small.
//! * [`Link`] (worker side, one per server): READs of a server's registered
//!   words into a registered pull buffer, and frames written into the
//!   server's push ring with write-with-immediate.
//! * [`Inbox`] (server side, one per process): accepts links, gives each a
//!   push ring registered for remote WRITE only, and a thread that blocks on
//!   a completion channel and hands every frame a doorbell announces to the
//!   server.
//! * [`ConnInfo`]: the fixed-size wire description of a queue pair
//!   (QPN, PSN, LID, GID, MTU), exchanged in `Control` messages over the
//!   link's TCP connection.
//!
//! Like the rest of `transport/`, nothing here knows tables, slots or
//! updaters: a pull is "these words of that region", a push is a frame.
//!
//! # Least privilege
//! The server registers each shard's slots and header (progress words) for
//! remote READ only, and each worker's push ring for remote WRITE only; the
//! ring's control words (consumer head and frame count) are a separate,
//! READ-only registration. Region addresses and rkeys are sent only to the
//! worker that asked, over its own TCP connection. All memory of a process is
//! in one protection domain (DESIGN), so a worker that guessed another
//! worker's ring rkey could write that ring: rkeys are not secrets on RDMA,
//! and the TCP connection is what authenticates a peer.
//!
//! # Pulls: READ, then the store's one validation
//! A pull reads the shard's progress word and then the slots of a run with
//! a second READ posted with `IBV_SEND_FENCE`, so the slots are read no
//! earlier than the progress word: the values are at least as new as the
//! progress the bounded-delay check relies on. Both land in the link's
//! registered pull buffer, which the worker then validates with
//! `slot::read_run`, exactly as it validates a shared-memory mapping: a
//! READ promises only that each aligned 8-byte word is read atomically
//! (soft-RoCE and the PCIe ordering of real NICs promise nothing between
//! words), which is all the slot check needs. Torn slots are read again, then
//! the pull falls back to asking the server.
//!
//! # Pushes and the order of a worker's frames
//! A worker's ordered frames to a server (push, pull, push-pull, clock) must
//! apply in the order it issued them: a pull issued after a push observes it,
//! and a clock reports only pushes already applied. Once a link is up, every
//! such frame goes through the push ring whenever it fits: the worker encodes
//! the frame into a local staging copy of the ring (same capacity, same
//! positions) and posts one RDMA WRITE with immediate from there to the same
//! position of the server's ring; the immediate is the frame's length in
//! words (the position follows from the consumer's own head, by the ring's
//! rule of never wrapping a frame). An RC queue pair executes and completes
//! writes in the order posted, so the ring's order is the issue order.
//!
//! A frame larger than the ring still goes over TCP, so two channels carry a
//! worker's frames and could overtake each other. What keeps the order is a
//! sequence number: every ordered frame a worker sends to a server carries
//! `DataHeader::seq`, consecutive per (worker, server); when a link is
//! accepted the server starts sequencing that connection at the number the
//! worker announced and applies frames strictly in that order, holding (a
//! bounded number of) early ones, whichever channel they came by. Frames on
//! one channel are already in order, so holding only happens across
//! channels.
//!
//! One-sided pulls keep the rule shm has: a pull is served one-sided only if
//! none of the worker's pushes to that server is unacknowledged; otherwise it
//! goes to the server, behind the push.
//!
//! # Flow control and completion batching
//! The worker learns the server's consumer head and frame count by READing
//! the ring's control words (a READ's completion also proves every earlier
//! WRITE completed, so the staging copy below the head is reusable). A frame
//! waits while the ring has no room or the server has no receive request
//! left for its doorbell: at most `RECV_DEPTH - RECV_BATCH` frames are
//! unconsumed, and the server re-posts receive requests in batches of
//! `RECV_BATCH` before it publishes the count, so a doorbell never finds the
//! receive queue empty. Writes are signaled every `SIGNAL_EVERY` posts (and
//! READs only at their last piece): a signaled completion retires every
//! earlier request of the queue pair.
//!
//! # Waiting and failures
//! Waiting for a completion spins briefly, then arms the completion queue
//! and blocks in poll(2) on the completion channel: no core spins while a
//! transfer is in flight. The server's receive thread likewise blocks on its
//! channel. Every wait has a deadline, and the queue pairs have finite
//! retry counts, so a dead or wedged peer turns into an error (the link is
//! then failed for good, its operations fail with a message naming the
//! server and the verbs status, and the worker closes the connection), never
//! into a hang.

#[cfg(feature = "rdma")]
mod imp;
#[cfg(feature = "rdma")]
pub mod memlock;
#[cfg(feature = "rdma")]
pub mod verbs;
#[cfg(feature = "rdma")]
pub use imp::{Accepted, Deliver, Inbox, Link, LinkStats, Rdma, Registration, Totals, device, totals};

#[cfg(not(feature = "rdma"))]
mod stub;
#[cfg(not(feature = "rdma"))]
pub use stub::{Accepted, Deliver, Inbox, Link, LinkStats, Rdma, Registration, Totals, device, totals};

use bytemuck::{Pod, Zeroable};

/// Whether a node uses RDMA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RdmaMode {
    /// Never.
    #[default]
    Off,
    /// Where a device is usable and the peer offers it; else fall back (logged).
    Auto,
    /// Always, or fail.
    Require,
}

/// Frames a ring may hold unconsumed: the server keeps this many receive
/// requests posted per link, re-posting them in batches.
pub const RECV_DEPTH: u32 = 512;
/// Receive requests the server re-posts at once.
pub const RECV_BATCH: u32 = 64;

/// The wire description of one side of an RC queue pair. Fixed size,
/// little-endian, plain old data; checked when parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct ConnInfo {
    pub magic: u32,
    pub version: u16,
    /// Port LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Queue pair number (24 bits).
    pub qpn: u32,
    /// First packet sequence number (24 bits).
    pub psn: u32,
    /// The GID the peer must address (network order).
    pub gid: [u8; 16],
    /// Path MTU as the verbs' enum (1 = 256 bytes .. 5 = 4096).
    pub mtu: u8,
    /// The sender's GID index (for logs; each side uses its own).
    pub gid_index: u8,
    pub reserved: [u8; 6],
}

impl ConnInfo {
    pub const MAGIC: u32 = u32::from_le_bytes(*b"PSQP");
    pub const VERSION: u16 = 1;
    pub const LEN: usize = std::mem::size_of::<ConnInfo>();

    pub fn new(qpn: u32, psn: u32, lid: u16, gid: [u8; 16], mtu: u8, gid_index: u8) -> ConnInfo {
        ConnInfo { magic: Self::MAGIC, version: Self::VERSION, lid, qpn, psn, gid, mtu, gid_index, reserved: [0; 6] }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        bytemuck::bytes_of(self).to_vec()
    }

    /// Parses and checks a peer's description.
    pub fn from_bytes(b: &[u8]) -> Result<ConnInfo, String> {
        let c: ConnInfo = bytemuck::try_pod_read_unaligned(b)
            .map_err(|_| format!("queue pair description of {} bytes, expected {}", b.len(), Self::LEN))?;
        if c.magic != Self::MAGIC || c.version != Self::VERSION {
            return Err(format!("not a pserver queue pair description (magic {:#x}, version {})", c.magic, c.version));
        }
        if c.qpn >= 1 << 24 || c.psn >= 1 << 24 || !(1..=5).contains(&c.mtu) || c.reserved != [0; 6] {
            return Err(format!("invalid queue pair description: qpn {}, psn {}, mtu {}", c.qpn, c.psn, c.mtu));
        }
        Ok(c)
    }

    /// The GID as an IPv6 address (RoCE v2 IPv4 entries print as
    /// `::ffff:a.b.c.d`).
    pub fn gid_text(&self) -> String {
        gid_text(&self.gid)
    }
}

/// A GID as an IPv6 address.
pub fn gid_text(gid: &[u8; 16]) -> String {
    std::net::Ipv6Addr::from(*gid).to_string()
}

/// Whether a GID is an IPv4-mapped address (`::ffff:a.b.c.d`), the form of
/// RoCE v2 entries for IPv4 interfaces.
pub fn is_ipv4_mapped(gid: &[u8; 16]) -> bool {
    gid[..10].iter().all(|&b| b == 0) && gid[10] == 0xff && gid[11] == 0xff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_info_round_trips_through_its_wire_bytes() {
        let mut gid = [0u8; 16];
        gid[10] = 0xff;
        gid[11] = 0xff;
        gid[12..].copy_from_slice(&[127, 0, 0, 1]);
        let c = ConnInfo::new(0x12_3456, 0xab_cdef, 7, gid, 5, 1);
        let b = c.to_bytes();
        assert_eq!(b.len(), ConnInfo::LEN);
        assert_eq!(ConnInfo::LEN, 40);
        assert_eq!(ConnInfo::from_bytes(&b), Ok(c));
        assert_eq!(c.gid_text(), "::ffff:127.0.0.1");
        assert!(is_ipv4_mapped(&c.gid));
    }

    #[test]
    fn bad_conn_info_is_refused() {
        let c = ConnInfo::new(1, 2, 0, [0; 16], 3, 0);
        let good = c.to_bytes();
        assert!(ConnInfo::from_bytes(&good[..39]).is_err(), "short");
        let mut b = good.clone();
        b[0] ^= 1;
        assert!(ConnInfo::from_bytes(&b).is_err(), "magic");
        for bad in [
            ConnInfo { qpn: 1 << 24, ..c },
            ConnInfo { psn: 1 << 24, ..c },
            ConnInfo { mtu: 0, ..c },
            ConnInfo { mtu: 6, ..c },
            ConnInfo { version: 2, ..c },
            ConnInfo { reserved: [1, 0, 0, 0, 0, 0], ..c },
        ] {
            assert!(ConnInfo::from_bytes(&bad.to_bytes()).is_err(), "{bad:?}");
        }
        assert!(!is_ipv4_mapped(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }
}
