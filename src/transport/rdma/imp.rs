//! The device of the process, worker links and the server inbox (see the
//! parent module for the protocol).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::verbs::{
    AccessFlags, CompChannel, Context, Cq, DeviceAttr, DeviceList, Mr, PathParams, Pd, PeerAddr, Qp, QpCaps, QpState,
    Wc, WcOpcode,
};
use super::{ConnInfo, RECV_BATCH, RECV_DEPTH, gid_text, is_ipv4_mapped};
use crate::error::{Error, Result};
use crate::store::Region;
use crate::transport::frame::{Frame, Limits};
use crate::transport::shm::{RING_CONSUMED, RING_DATA_BYTE, RING_HEAD, Ring};
use crate::transport::{Access, RegionDesc};

/// The RDMA device this process uses: one context, one protection domain.
pub struct Rdma {
    ctx: Arc<Context>,
    pd: Arc<Pd>,
    port: u8,
    gid_index: u8,
    gid: [u8; 16],
    lid: u16,
    mtu: u8,
    attr: DeviceAttr,
    max_msg: u32,
    word_atomic: bool,
}

impl std::fmt::Debug for Rdma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

static DEVICE: OnceLock<Result<Arc<Rdma>>> = OnceLock::new();

/// The process's RDMA device, opened on first use: `PSERVER_RDMA_DEVICE`
/// (default: the first device with an active port), port
/// `PSERVER_RDMA_PORT` (default 1), GID `PSERVER_RDMA_GID_INDEX` (default:
/// the RoCE v2 IPv4-mapped entry, found by scanning the GID table). An error
/// says why no device is usable.
pub fn device() -> Result<Arc<Rdma>> {
    DEVICE.get_or_init(|| Rdma::open().map(Arc::new)).clone()
}

fn env_num<T: std::str::FromStr>(k: &str) -> Result<Option<T>> {
    match std::env::var(k) {
        Ok(v) if !v.is_empty() => {
            v.parse().map(Some).map_err(|_| Error::Config(format!("{k}={v:?} is not a valid number")))
        }
        _ => Ok(None),
    }
}

/// The GID type of table entry `index` as the kernel describes it
/// ("RoCE v2", "IB/RoCE v1"); `None` where sysfs does not say.
fn gid_type(dev: &str, port: u8, index: u32) -> Option<String> {
    let p = format!("/sys/class/infiniband/{dev}/ports/{port}/gid_attrs/types/{index}");
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

impl Rdma {
    fn open() -> Result<Rdma> {
        let list = DeviceList::get()?;
        if list.is_empty() {
            return Err(Error::Config(
                "no RDMA device on this host (ibv_get_device_list found none; load a driver such as rdma_rxe, \
                 or see tools/rxe-vm)"
                    .into(),
            ));
        }
        let want = std::env::var("PSERVER_RDMA_DEVICE").ok().filter(|s| !s.is_empty());
        let port: u8 = env_num("PSERVER_RDMA_PORT")?.unwrap_or(1);
        let mut why = Vec::new();
        for dev in list.iter() {
            let name = dev.name();
            if want.as_ref().is_some_and(|w| *w != name) {
                continue;
            }
            match Self::open_one(&dev, port) {
                Ok(r) => return Ok(r),
                Err(e) => why.push(format!("{name}: {e}")),
            }
        }
        Err(Error::Config(match want {
            Some(w) if why.is_empty() => format!("PSERVER_RDMA_DEVICE={w}: no such RDMA device"),
            _ => format!("no usable RDMA device: {}", why.join("; ")),
        }))
    }

    fn open_one(dev: &super::verbs::Device<'_>, port: u8) -> Result<Rdma> {
        let name = dev.name();
        let ctx = dev.open()?;
        let attr = ctx.query_device()?;
        if port == 0 || port > attr.phys_port_cnt {
            return Err(Error::Config(format!("{name} has {} ports, no port {port}", attr.phys_port_cnt)));
        }
        let pa = ctx.query_port(port)?;
        if !pa.active {
            return Err(Error::Config(format!("port {port} of {name} is not active")));
        }
        let gid_index = match env_num::<u32>("PSERVER_RDMA_GID_INDEX")? {
            Some(i) => {
                if i >= pa.gid_table_len || i > 255 {
                    return Err(Error::Config(format!(
                        "PSERVER_RDMA_GID_INDEX={i}, but port {port} of {name} has {} GIDs",
                        pa.gid_table_len
                    )));
                }
                i
            }
            None => Self::default_gid(&ctx, &name, port, pa.gid_table_len, pa.link_layer)?,
        };
        let gid = ctx.query_gid(port, gid_index)?;
        if gid == [0; 16] {
            return Err(Error::Config(format!("GID {gid_index} of {name} port {port} is empty")));
        }
        let pd = ctx.alloc_pd()?;
        // Software RDMA copies with the kernel's memcpy, which promises no
        // atomicity at all (under emulation it copies byte by byte: the
        // RDMA torn-read test sees 8-byte words torn). Hardware reads an
        // aligned 8-byte word in one PCIe read.
        let soft = name.starts_with("rxe") || name.starts_with("siw");
        let word_atomic = match std::env::var("PSERVER_RDMA_WORD_ATOMIC").as_deref() {
            Ok("1") => true,
            Ok("0") => false,
            _ => !soft,
        };
        Ok(Rdma {
            word_atomic,
            ctx,
            pd,
            port,
            gid_index: gid_index as u8,
            gid,
            lid: pa.lid,
            mtu: pa.active_mtu.clamp(1, 5),
            attr,
            max_msg: pa.max_msg_size,
        })
    }

    /// RoCE v2 prefers the IPv4-mapped entry (`::ffff:a.b.c.d`): it is
    /// routable and what peers reach over IPv4. InfiniBand uses entry 0.
    fn default_gid(ctx: &Context, name: &str, port: u8, len: u32, link_layer: u8) -> Result<u32> {
        let mut mapped = Vec::new();
        for i in 0..len.min(256) {
            match ctx.query_gid(port, i) {
                Ok(g) if is_ipv4_mapped(&g) => mapped.push(i),
                _ => {}
            }
        }
        let v2 = mapped.iter().copied().find(|&i| gid_type(name, port, i).is_some_and(|t| t.contains("v2")));
        if let Some(i) = v2.or(mapped.first().copied()) {
            return Ok(i);
        }
        if link_layer == 1 {
            return Ok(0);
        }
        Err(Error::Config(format!(
            "port {port} of {name} has no IPv4-mapped (RoCE v2) GID; give an address to its network interface or \
             set PSERVER_RDMA_GID_INDEX"
        )))
    }

    /// `device=rxe0 port=1 gid_index=1 gid=::ffff:127.0.0.1`
    pub fn describe(&self) -> String {
        format!(
            "device={} port={} gid_index={} gid={}",
            self.ctx.name(),
            self.port,
            self.gid_index,
            gid_text(&self.gid)
        )
    }

    pub fn name(&self) -> &str {
        self.ctx.name()
    }

    /// Whether the device's READs copy each aligned 8-byte word atomically
    /// (hardware: yes; soft-RoCE and soft-iWARP: no). Scalar slots are
    /// self-validating only under such reads (`PSERVER_RDMA_WORD_ATOMIC=0|1`
    /// overrides).
    pub fn word_atomic(&self) -> bool {
        self.word_atomic
    }

    pub fn gid_index(&self) -> u8 {
        self.gid_index
    }

    fn conn_info(&self, qp: &Qp, psn: u32) -> ConnInfo {
        ConnInfo::new(qp.qpn(), psn, self.lid, self.gid, self.mtu, self.gid_index)
    }

    fn params(&self) -> PathParams {
        let rd = |n: u32| n.clamp(1, 16) as u8;
        PathParams {
            max_rd_atomic: rd(self.attr.max_qp_init_rd_atom),
            max_dest_rd_atomic: rd(self.attr.max_qp_rd_atom),
            // 4.096 us x 2^17 = 0.5 s per try, 7 tries: a peer that stopped
            // answering fails the queue pair within seconds.
            timeout: 17,
            retry_cnt: 7,
            // Finite: flow control means the server always has receive
            // requests posted, so running out means it is wedged.
            rnr_retry: 6,
            // 491 ms between RNR retries.
            min_rnr_timer: 31,
        }
    }

    fn mr(&self, region: Arc<Region>, offset: usize, len: usize, access: AccessFlags) -> Result<Mr> {
        Mr::register(&self.pd, region, offset, len, access)
    }

    /// Exposes `region` to peers with `access` (READ for shards); the
    /// registration lasts as long as the returned value.
    pub fn register(&self, region: Arc<Region>, access: Access) -> Result<Registration> {
        let flags = if access.allows(Access::WRITE) {
            AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE
        } else {
            AccessFlags::NONE
        };
        let flags = if access.allows(Access::READ) { flags | AccessFlags::REMOTE_READ } else { flags };
        let len = region.len_bytes();
        let mr = self.mr(region, 0, len, flags)?;
        Ok(Registration { desc: desc_of(&mr, access), _mr: mr })
    }
}

fn desc_of(mr: &Mr, access: Access) -> RegionDesc {
    RegionDesc { id: mr.addr(), len: mr.len() as u64, rkey: mr.rkey(), access: access.bits() }
}

fn random_psn() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    u32::from_le_bytes(b) & 0xff_ffff
}

/// A region registered for peers; deregistered on drop.
pub struct Registration {
    desc: RegionDesc,
    _mr: Mr,
}

impl Registration {
    /// What a peer needs to reach it (address, length, rkey, rights).
    pub fn desc(&self) -> RegionDesc {
        self.desc
    }
}

/// Words a worker's pull buffer holds (4 MiB), unless
/// `PSERVER_RDMA_PULL_BYTES` says otherwise.
const PULL_BYTES: usize = 4 << 20;
/// Bytes of one READ request: a run larger than this is read in pieces
/// posted together, so several are in flight.
const READ_PIECE: usize = 256 << 10;
/// Send queue depth of a worker's queue pair.
const SQ_DEPTH: u32 = 256;
/// A write is signaled at least every this many posts.
const SIGNAL_EVERY: u64 = 32;
/// Polls of a completion queue before a waiter arms it and sleeps.
const SPIN_POLLS: u32 = 200;
/// How long one operation may wait for completions before the link is
/// declared dead (the queue pair's own retry timeouts normally end it
/// first; soft-RoCE does not always time out a peer whose queue pair went
/// to the error state).
const OP_DEADLINE: Duration = Duration::from_secs(15);

/// Everything this process's links moved (RDMA READ bytes, frames written
/// into push rings): what tests check to know RDMA was really used.
static TOTAL_BYTES_READ: AtomicU64 = AtomicU64::new(0);
static TOTAL_FRAMES: AtomicU64 = AtomicU64::new(0);
static TOTAL_LINKS: AtomicU64 = AtomicU64::new(0);

/// What every link of this process did so far: bytes read by RDMA READ,
/// frames written into push rings, links established.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub bytes_read: u64,
    pub frames: u64,
    pub links: u64,
}

pub fn totals() -> Totals {
    Totals {
        bytes_read: TOTAL_BYTES_READ.load(Ordering::Relaxed),
        frames: TOTAL_FRAMES.load(Ordering::Relaxed),
        links: TOTAL_LINKS.load(Ordering::Relaxed),
    }
}

/// What a link moved.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// RDMA READs of slots (pieces), and the bytes they read.
    pub reads: AtomicU64,
    pub bytes_read: AtomicU64,
    /// Frames written into the server's ring, and their bytes.
    pub frames: AtomicU64,
    pub bytes_written: AtomicU64,
}

/// A worker's queue pair to one server: pulls by READ, frames into the
/// server's push ring by write-with-immediate. All posting and polling
/// happens under one lock, held while an operation waits for its completion
/// (so a slow READ holds back pushes behind it, as the wire would).
pub struct Link {
    peer: String,
    stats: LinkStats,
    st: Mutex<LinkState>,
}

struct LinkState {
    // Field order is drop order: the queue pair goes before the memory its
    // requests may still reference.
    qp: Qp,
    cq: Arc<Cq>,
    channel: Arc<CompChannel>,
    /// Pull destination; word 0 of `ctl` takes progress words.
    pull: Mr,
    ctl: Mr,
    ring: Option<RingLink>,
    local_psn: u32,
    rdma: Arc<Rdma>,
    /// Work requests posted and known complete (ids count up from 1; RC
    /// completes them in order, so one completion retires all before it).
    posted: u64,
    done: u64,
    last_signaled: u64,
    failed: Option<Error>,
    wcs: Vec<Wc>,
}

/// The worker's half of a push ring: a staging copy at the same positions
/// (whose header mirrors the server's head and frame count), registered
/// locally, and the server's ring.
struct RingLink {
    staging: Ring,
    mr: Mr,
    data: RegionDesc,
    ctl: RegionDesc,
    frames: u64,
}

impl Link {
    /// A new queue pair (in INIT) towards the server at `peer`; send the
    /// returned description to the server, then call [`Link::establish`]
    /// with its answer.
    pub fn new(rdma: &Arc<Rdma>, peer: &str) -> Result<(Link, ConnInfo)> {
        let pull_bytes = env_num::<usize>("PSERVER_RDMA_PULL_BYTES")?.unwrap_or(PULL_BYTES).clamp(4096, 1 << 30);
        let channel = rdma.ctx.comp_channel()?;
        let depth = SQ_DEPTH.min(rdma.attr.max_qp_wr.max(16));
        let cq = Cq::new(&rdma.ctx, &channel, depth + 16, 0)?;
        let qp = Qp::new(
            &rdma.pd,
            &cq,
            QpCaps { send_wr: depth, recv_wr: 1 },
            rdma.port,
            rdma.gid_index,
            AccessFlags::NONE, // nobody reads or writes a worker's memory
        )?;
        let pull =
            rdma.mr(Arc::new(Region::anon(pull_bytes)?), 0, pull_bytes.div_ceil(64) * 64, AccessFlags::LOCAL_WRITE)?;
        let ctl = rdma.mr(Arc::new(Region::anon(64)?), 0, 64, AccessFlags::LOCAL_WRITE)?;
        let psn = random_psn();
        let info = rdma.conn_info(&qp, psn);
        let st = LinkState {
            qp,
            cq,
            channel,
            pull,
            ctl,
            ring: None,
            local_psn: psn,
            rdma: rdma.clone(),
            posted: 0,
            done: 0,
            last_signaled: 0,
            failed: None,
            wcs: Vec::with_capacity(32),
        };
        Ok((Link { peer: peer.to_string(), stats: LinkStats::default(), st: Mutex::new(st) }, info))
    }

    /// Connects to the server's queue pair and push ring (`ring`: its data,
    /// remote WRITE; `ring_ctl`: its head and frame count, remote READ).
    pub fn establish(&self, remote: &ConnInfo, ring: RegionDesc, ring_ctl: RegionDesc) -> Result<()> {
        let mut st = self.st.lock();
        if !ring.access().allows(Access::WRITE) || !ring_ctl.access().allows(Access::READ) || ring_ctl.len < 32 {
            return Err(Error::protocol(&self.peer, "push ring descriptions lack the rights they need"));
        }
        let peer = PeerAddr { qpn: remote.qpn, psn: remote.psn, lid: remote.lid, gid: remote.gid, mtu: remote.mtu };
        let mut params = st.rdma.params();
        params.max_rd_atomic = params.max_rd_atomic.min(16);
        let peer_mtu = remote.mtu.min(st.rdma.mtu);
        st.qp.connect(&PeerAddr { mtu: peer_mtu, ..peer }, st.local_psn, params)?;
        let staging = Ring::anon(ring.len as usize)?;
        if staging.capacity() != ring.len {
            return Err(Error::protocol(
                &self.peer,
                format!("a push ring of {} bytes is not a valid ring size", ring.len),
            ));
        }
        let region = staging.region().expect("anonymous ring").clone();
        let len = region.len_bytes();
        let mr = st.rdma.mr(region, 0, len, AccessFlags::LOCAL_WRITE)?;
        st.ring = Some(RingLink { staging, mr, data: ring, ctl: ring_ctl, frames: 0 });
        TOTAL_LINKS.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }

    /// See [`Rdma::word_atomic`].
    pub fn word_atomic(&self) -> bool {
        self.st.lock().rdma.word_atomic
    }

    /// The error that ended this link, if one did.
    pub fn failure(&self) -> Option<Error> {
        self.st.lock().failed.clone()
    }

    /// The largest read one [`Link::read`] call takes, in words.
    pub fn max_read_words(&self) -> usize {
        self.st.lock().pull.len() / 8
    }

    /// Reads word `progress_word` of `header` (when given), then (fenced,
    /// so not earlier) `words` words from word `at` of `slots`, into the
    /// pull buffer, and calls `f(progress, slot words)` (progress `u64::MAX`
    /// when not read).
    pub fn read<R>(
        &self,
        progress: Option<(&RegionDesc, usize)>,
        slots: &RegionDesc,
        at: usize,
        words: usize,
        f: impl FnOnce(u64, &[std::sync::atomic::AtomicU64]) -> R,
    ) -> Result<R> {
        let fits = |d: &RegionDesc, w: usize, n: usize| {
            d.access().allows(Access::READ) && w.checked_add(n).is_some_and(|e| e as u64 * 8 <= d.len)
        };
        if !progress.is_none_or(|(h, w)| fits(h, w, 1)) || !fits(slots, at, words) || words == 0 {
            return Err(Error::Config(format!(
                "read of words {at}..+{words} is outside the regions {} offered",
                self.peer
            )));
        }
        let mut st = self.st.lock();
        let st = &mut *st;
        st.usable(&self.peer)?;
        if words * 8 > st.pull.len() {
            return Err(Error::Config(format!("a read of {words} words exceeds the pull buffer")));
        }
        let piece = (READ_PIECE / 8).min(st.rdma.max_msg as usize / 8).max(1);
        let pieces = words.div_ceil(piece);
        st.reserve(&self.peer, 1 + pieces as u64)?;
        // The progress word first, unsignaled (the fenced READ after it
        // completes only once it has).
        if let Some((header, word)) = progress {
            let sge = st.ctl.sge(0, 1).expect("ctl has a word");
            let id = st.next_id(false);
            st.post(&self.peer, |qp| qp.post_read(id, sge, header.id + word as u64 * 8, header.rkey, false, false))?;
        }
        let mut last = 0;
        for p in 0..pieces {
            let w0 = p * piece;
            let n = piece.min(words - w0);
            let sge = st.pull.sge(w0, n).expect("checked against the buffer");
            let signaled = p + 1 == pieces;
            let id = st.next_id(signaled);
            let remote = slots.id + (at + w0) as u64 * 8;
            let fence = p == 0 && progress.is_some();
            st.post(&self.peer, |qp| qp.post_read(id, sge, remote, slots.rkey, signaled, fence))?;
            last = id;
        }
        st.wait_done(&self.peer, last, Instant::now() + OP_DEADLINE)?;
        self.stats.reads.fetch_add(pieces as u64, Ordering::Relaxed);
        self.stats.bytes_read.fetch_add(words as u64 * 8, Ordering::Relaxed);
        TOTAL_BYTES_READ.fetch_add(words as u64 * 8, Ordering::Relaxed);
        // Acquire: the completion (and the provider's read barrier in
        // poll_cq) ordered the device's stores before it.
        let progress = match progress {
            Some(_) => st.ctl.words()[0].load(Ordering::Acquire),
            None => u64::MAX,
        };
        Ok(f(progress, &st.pull.words()[..words]))
    }

    /// For tests only (`tests/security.rs`): one RDMA READ (`write` false,
    /// into `buf`) or plain WRITE (`write` true, of `buf`, without a
    /// doorbell) of `buf.len()` words at `remote_addr` with `rkey`, posted
    /// as given, without the checks [`Link::read`] and [`Link::send`] make
    /// against the rights a [`RegionDesc`] states: what a worker that
    /// misused the addresses and rkeys it was handed could post. Waits for
    /// the completion. A failed one (for memory not registered for the
    /// access: the device's "remote access error") fails the link, as it
    /// fails the queue pair.
    #[doc(hidden)]
    pub fn unchecked_transfer_for_test(&self, write: bool, remote_addr: u64, rkey: u32, buf: &mut [u64]) -> Result<()> {
        let mut st = self.st.lock();
        let st = &mut *st;
        st.usable(&self.peer)?;
        let n = buf.len();
        let Some(sge) = st.pull.sge(0, n) else {
            return Err(Error::Config(format!("a transfer of {n} words does not fit the pull buffer")));
        };
        if write {
            for (w, x) in st.pull.words()[..n].iter().zip(buf.iter()) {
                w.store(*x, Ordering::Relaxed);
            }
        }
        st.reserve(&self.peer, 1)?;
        let id = st.next_id(true);
        if write {
            st.post(&self.peer, |qp| qp.post_write(id, sge, remote_addr, rkey, true))?;
        } else {
            st.post(&self.peer, |qp| qp.post_read(id, sge, remote_addr, rkey, true, false))?;
        }
        st.wait_done(&self.peer, id, Instant::now() + OP_DEADLINE)?;
        if !write {
            for (x, w) in buf.iter_mut().zip(&st.pull.words()[..n]) {
                *x = w.load(Ordering::Acquire);
            }
        }
        Ok(())
    }

    /// Writes `frame` into the server's push ring and rings its doorbell.
    /// `Ok(false)`: the frame is larger than the ring (send it over TCP; the
    /// sequence numbers keep the order). Waits while the ring is full.
    pub fn send(&self, frame: &Frame) -> Result<bool> {
        let mut st = self.st.lock();
        let st = &mut *st;
        st.usable(&self.peer)?;
        let len = frame.wire_len();
        let Some(ring) = st.ring.as_ref() else {
            return Err(Error::Config(format!("the RDMA link to {} has no push ring yet", self.peer)));
        };
        if len > ring.staging.capacity() || len / 8 > u64::from(u32::MAX) {
            return Ok(false);
        }
        let deadline = Instant::now() + OP_DEADLINE;
        let mut idle = 0u32;
        loop {
            let ring = st.ring.as_mut().expect("checked");
            let consumed = ring.staging.header_word(RING_CONSUMED);
            let credit = ring.frames - consumed < u64::from(RECV_DEPTH - RECV_BATCH);
            if credit && let Some((pos, wlen)) = ring.staging.write(frame) {
                let at = pos % ring.staging.capacity();
                let first = RING_DATA_BYTE / 8 + (at / 8) as usize;
                let sge = ring.mr.sge(first, (wlen / 8) as usize).expect("inside the staging ring");
                let (remote, rkey) = (ring.data.id + at, ring.data.rkey);
                ring.frames += 1;
                st.reserve(&self.peer, 1)?;
                let signaled = st.posted + 1 - st.last_signaled >= SIGNAL_EVERY;
                let id = st.next_id(signaled);
                st.post(&self.peer, |qp| qp.post_write_imm(id, sge, remote, rkey, (wlen / 8) as u32, signaled))?;
                self.stats.frames.fetch_add(1, Ordering::Relaxed);
                TOTAL_FRAMES.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes_written.fetch_add(wlen, Ordering::Relaxed);
                return Ok(true);
            }
            // No room or no credit: read the server's head and frame count
            // into the staging header (a READ whose completion also retires
            // every earlier write, freeing the staging copy below the head).
            let before = (ring.staging.header_word(RING_HEAD), consumed);
            let sge = ring.mr.sge(RING_HEAD, 2).expect("header words");
            let remote = ring.ctl.id + RING_HEAD as u64 * 8;
            let rkey = ring.ctl.rkey;
            st.reserve(&self.peer, 1)?;
            let id = st.next_id(true);
            st.post(&self.peer, |qp| qp.post_read(id, sge, remote, rkey, true, false))?;
            st.wait_done(&self.peer, id, deadline)?;
            let ring = st.ring.as_ref().expect("checked");
            let after = (ring.staging.header_word(RING_HEAD), ring.staging.header_word(RING_CONSUMED));
            if after == before {
                idle += 1;
                if Instant::now() >= deadline {
                    return Err(st.fail(
                        &self.peer,
                        format!("the server has not taken frames from its push ring for {OP_DEADLINE:?}"),
                    ));
                }
                // The server is busy applying: back off (up to 1 ms), no spinning.
                std::thread::sleep(Duration::from_micros((20u64 << idle.min(6)).min(1000)));
            } else {
                idle = 0;
            }
        }
    }
}

impl LinkState {
    fn usable(&self, peer: &str) -> Result<()> {
        match &self.failed {
            Some(e) => Err(Error::Disconnected(format!("{peer} (RDMA link failed earlier: {e})"))),
            None => Ok(()),
        }
    }

    fn fail(&mut self, peer: &str, why: String) -> Error {
        let e = Error::Disconnected(format!("{peer}: RDMA queue pair failed: {why}"));
        self.failed.get_or_insert(e.clone());
        let _ = self.qp.set_error();
        e
    }

    fn next_id(&mut self, signaled: bool) -> u64 {
        self.posted += 1;
        if signaled {
            self.last_signaled = self.posted;
        }
        self.posted
    }

    fn post(&mut self, peer: &str, f: impl FnOnce(&Qp) -> Result<()>) -> Result<()> {
        match f(&self.qp) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(peer, e.to_string())),
        }
    }

    /// Makes room for `n` more requests in the send queue.
    fn reserve(&mut self, peer: &str, n: u64) -> Result<()> {
        let depth = u64::from(self.cq.capacity() - 16);
        if self.posted - self.done + n <= depth {
            return Ok(());
        }
        // The last signaled request retires everything before it; there is
        // one within the last SIGNAL_EVERY posts.
        let target = self.last_signaled;
        if target <= self.done {
            return Err(self.fail(peer, "send queue full without a signaled request".into()));
        }
        self.wait_done(peer, target, Instant::now() + OP_DEADLINE)
    }

    /// Waits until request `id` (signaled) has completed.
    fn wait_done(&mut self, peer: &str, id: u64, deadline: Instant) -> Result<()> {
        let mut spins = 0u32;
        loop {
            self.reap(peer)?;
            if self.done >= id {
                return Ok(());
            }
            if spins < SPIN_POLLS {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            // Sleep until the device says something: arm, poll once more
            // (a completion that came before arming raises no event), wait.
            if let Err(e) = self.cq.arm() {
                return Err(self.fail(peer, e.to_string()));
            }
            self.reap(peer)?;
            if self.done >= id {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let state = self.qp.state().map(|s| format!("{s:?}")).unwrap_or_else(|e| e.to_string());
                return Err(self.fail(peer, format!("no completion within {OP_DEADLINE:?} (queue pair {state})")));
            }
            match self.channel.wait(left.min(Duration::from_millis(200))) {
                Ok(true) => while let Ok(Some(_)) = self.channel.take_event() {},
                Ok(false) => {
                    // A timeout: a queue pair the device moved to error
                    // would have flushed its requests; check anyway.
                    if matches!(self.qp.state(), Ok(QpState::Error)) {
                        self.reap(peer)?;
                        return Err(self.fail(peer, "the queue pair is in the error state".into()));
                    }
                }
                Err(e) => return Err(self.fail(peer, e.to_string())),
            }
        }
    }

    /// Takes finished completions; the first failure fails the link.
    fn reap(&mut self, peer: &str) -> Result<()> {
        let mut wcs = std::mem::take(&mut self.wcs);
        let r = self.cq.poll(&mut wcs, 32);
        let mut err = None;
        if let Ok(n) = r {
            for w in &wcs[..n] {
                if let Some(text) = w.error_text() {
                    err.get_or_insert(format!("{:?} request {} failed: {text}", w.opcode, w.wr_id));
                } else {
                    self.done = self.done.max(w.wr_id);
                }
            }
        }
        self.wcs = wcs;
        if let Err(e) = r {
            return Err(self.fail(peer, e.to_string()));
        }
        match err {
            Some(e) => Err(self.fail(peer, e)),
            None => Ok(()),
        }
    }
}

/// What a server gets for each frame a link's doorbell announced (or the
/// error that ended the link): `(token, frame)`, on the inbox's thread.
pub type Deliver = Box<dyn Fn(u64, Result<Frame>) + Send + Sync>;

/// The server's side of every link: queue pairs, push rings, and the
/// thread that takes doorbells.
pub struct Inbox {
    shared: Arc<InboxShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct InboxShared {
    rdma: Arc<Rdma>,
    channel: Arc<CompChannel>,
    conns: Mutex<HashMap<u64, Arc<InConn>>>,
    stop: AtomicBool,
    limits: Limits,
}

struct InConn {
    // Drop order: queue pair, then the memory it writes.
    qp: Qp,
    cq: Arc<Cq>,
    ring: Ring,
    _data: Mr,
    _ctl: Mr,
    closing: AtomicBool,
    /// Receive requests posted so far and doorbells taken (inbox thread only).
    counts: Mutex<(u64, u64)>,
}

/// What a server answers a link request with.
pub struct Accepted {
    pub info: ConnInfo,
    /// The push ring's data (remote WRITE) and control words (remote READ).
    pub ring: RegionDesc,
    pub ring_ctl: RegionDesc,
}

impl Inbox {
    /// Starts the inbox thread; frames go to `deliver`.
    pub fn start(rdma: Arc<Rdma>, limits: Limits, deliver: Deliver) -> Result<Inbox> {
        let channel = rdma.ctx.comp_channel()?;
        let shared = Arc::new(InboxShared {
            rdma,
            channel,
            conns: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
            limits,
        });
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("pserver-rdma-inbox".into())
            .spawn(move || sh.run(&deliver))
            .map_err(|e| Error::io("spawning the RDMA inbox thread", e))?;
        Ok(Inbox { shared, thread: Some(thread) })
    }

    pub fn rdma(&self) -> &Arc<Rdma> {
        &self.shared.rdma
    }

    /// Accepts a link from the worker behind connection `token`: a queue
    /// pair connected to `remote`, with receive requests posted, and a push
    /// ring of about `ring_bytes` registered for that worker alone.
    pub fn accept(&self, token: u64, remote: &ConnInfo, ring_bytes: usize) -> Result<Accepted> {
        let rdma = &self.shared.rdma;
        if self.shared.conns.lock().contains_key(&token) {
            return Err(Error::Config("this connection already has an RDMA link".into()));
        }
        let cq = Cq::new(&rdma.ctx, &self.shared.channel, RECV_DEPTH + 16, token)?;
        let qp = Qp::new(
            &rdma.pd,
            &cq,
            QpCaps { send_wr: 16, recv_wr: RECV_DEPTH },
            rdma.port,
            rdma.gid_index,
            AccessFlags::REMOTE_READ | AccessFlags::REMOTE_WRITE | AccessFlags::LOCAL_WRITE,
        )?;
        let ring = Ring::anon(ring_bytes)?;
        let region = ring.region().expect("anonymous ring").clone();
        let cap = ring.capacity() as usize;
        let data =
            rdma.mr(region.clone(), RING_DATA_BYTE, cap, AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE)?;
        let ctl = rdma.mr(region, 0, RING_DATA_BYTE, AccessFlags::REMOTE_READ)?;
        qp.post_recvs(0, RECV_DEPTH as usize)?;
        let psn = random_psn();
        let peer = PeerAddr {
            qpn: remote.qpn,
            psn: remote.psn,
            lid: remote.lid,
            gid: remote.gid,
            mtu: remote.mtu.min(rdma.mtu),
        };
        qp.connect(&peer, psn, rdma.params())?;
        cq.arm()?;
        let info = rdma.conn_info(&qp, psn);
        let accepted = Accepted { info, ring: desc_of(&data, Access::WRITE), ring_ctl: desc_of(&ctl, Access::READ) };
        let conn = InConn {
            qp,
            cq,
            ring,
            _data: data,
            _ctl: ctl,
            closing: AtomicBool::new(false),
            counts: Mutex::new((u64::from(RECV_DEPTH), 0)),
        };
        self.shared.conns.lock().insert(token, Arc::new(conn));
        Ok(accepted)
    }

    /// Ends the link of connection `token` (the inbox thread releases it).
    pub fn close(&self, token: u64) {
        if let Some(c) = self.shared.conns.lock().get(&token) {
            c.closing.store(true, Ordering::Release);
            let _ = c.qp.set_error();
        }
    }

    /// Links open now.
    pub fn links(&self) -> usize {
        self.shared.conns.lock().len()
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.shared.conns.lock().clear();
    }
}

impl InboxShared {
    fn run(&self, deliver: &Deliver) {
        let mut wcs = Vec::with_capacity(64);
        let mut ready = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            // Blocks until a CQ has news (or 100 ms, to notice stop and
            // closed links): no spinning core.
            match self.channel.wait(Duration::from_millis(100)) {
                Ok(true) => loop {
                    match self.channel.take_event() {
                        Ok(Some(token)) => ready.push(token),
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "RDMA inbox: reading completion events failed");
                            break;
                        }
                    }
                },
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "RDMA inbox: waiting for completions failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            ready.sort_unstable();
            ready.dedup();
            for token in ready.drain(..) {
                let conn = self.conns.lock().get(&token).cloned();
                if let Some(c) = conn {
                    self.drain(token, &c, &mut wcs, deliver);
                }
            }
            // Released here, on the thread that takes events, so no event of
            // a destroyed CQ is ever taken.
            self.conns.lock().retain(|_, c| !c.closing.load(Ordering::Acquire));
        }
    }

    /// Re-arms a link's CQ and takes everything on it.
    fn drain(&self, token: u64, c: &InConn, wcs: &mut Vec<Wc>, deliver: &Deliver) {
        if c.closing.load(Ordering::Acquire) {
            return;
        }
        let fail = |why: String| {
            c.closing.store(true, Ordering::Release);
            let _ = c.qp.set_error();
            deliver(token, Err(Error::Disconnected(format!("RDMA link: {why}"))));
        };
        if let Err(e) = c.cq.arm() {
            return fail(e.to_string());
        }
        loop {
            match c.cq.poll(wcs, 64) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) => return fail(e.to_string()),
            }
            for w in wcs.iter() {
                if let Some(text) = w.error_text() {
                    return fail(format!("{:?} request {} failed: {text}", w.opcode, w.wr_id));
                }
                let (WcOpcode::RecvWithImm, Some(words)) = (w.opcode, w.imm) else {
                    return fail(format!("unexpected completion {:?}", w.opcode));
                };
                let frame = c.ring.read_next(u64::from(words) * 8, &self.limits);
                let bad = frame.is_err();
                // Receive requests go back in batches, before the frame count
                // the worker's flow control reads can pass them.
                {
                    let mut n = c.counts.lock();
                    n.1 += 1;
                    if n.0 - n.1 <= u64::from(RECV_DEPTH - RECV_BATCH) {
                        if let Err(e) = c.qp.post_recvs(n.0, RECV_BATCH as usize) {
                            drop(n);
                            return fail(e.to_string());
                        }
                        n.0 += u64::from(RECV_BATCH);
                    }
                }
                deliver(token, frame);
                if bad {
                    c.closing.store(true, Ordering::Release);
                    let _ = c.qp.set_error();
                    return;
                }
            }
        }
    }
}
