//! The io_uring back end: one event-loop thread per endpoint.
//!
//! The loop owns the ring and, per connection, a receive buffer and the
//! batch of frames being sent. Buffers handed to the kernel belong to the
//! loop's per-connection state (`LoopConn`) and are not touched, moved out or
//! freed until their completion arrives: a closed connection is kept until
//! its last operation completes. Other threads talk to the loop through a
//! command queue and an eventfd.
//!
//! An accepted stream is authenticated on a short-lived thread (the
//! handshake blocks, within its deadline) and adopted by the loop only once
//! it passed; the loop itself never waits on a peer. A connection whose
//! unsent bytes exceed `Limits::max_queued_bytes` gets no new receive until
//! they drain to half that.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use bytes::BytesMut;
use crossbeam::queue::SegQueue;
use io_uring::{IoUring, opcode, types};
use rustc_hash::FxHashMap;

use super::{Auth, Conn, Endpoint, PeerId, frame_iovecs};
use crate::error::{Error, Result};
use crate::transport::frame::{self, Decoder, Frame};

const RING_ENTRIES: u32 = 256;
/// Frames gathered into one sendmsg.
const MAX_BATCH_FRAMES: usize = 64;
/// The kernel's limit on iovecs per sendmsg.
const MAX_IOV: usize = 1024;

const OP_ACCEPT: u64 = 1;
const OP_WAKE: u64 = 2;
const OP_RECV: u64 = 3;
const OP_SEND: u64 = 4;

fn user_data(token: u64, op: u64) -> u64 {
    token << 8 | op
}

/// A ring for the loop thread: single issuer with deferred task work (the
/// kernel runs completions when the loop asks for them, which is cheaper per
/// wake-up), falling back to a plain ring on kernels without those flags.
fn new_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(RING_ENTRIES)
        .or_else(|_| IoUring::builder().setup_coop_taskrun().build(RING_ENTRIES))
        .or_else(|_| IoUring::new(RING_ENTRIES))
}

/// Whether io_uring can be set up here with every operation the loop uses.
pub(super) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let Ok(ring) = IoUring::new(8) else { return false };
        let mut probe = io_uring::Probe::new();
        if ring.submitter().register_probe(&mut probe).is_err() {
            return false;
        }
        [opcode::Accept::CODE, opcode::Recv::CODE, opcode::SendMsg::CODE, opcode::Read::CODE]
            .iter()
            .all(|&c| probe.is_supported(c))
    })
}

enum Cmd {
    Adopt(Arc<Conn>),
    Flush(PeerId),
    Stop,
}

struct Commands {
    queue: SegQueue<Cmd>,
    eventfd: OwnedFd,
}

impl Commands {
    fn send(&self, cmd: Cmd) -> io::Result<()> {
        self.queue.push(cmd);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to an eventfd we own.
        let r = unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if r == 8 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }
}

/// Handle to a running event loop.
pub(super) struct Loop {
    cmds: Arc<Commands>,
    thread: Option<JoinHandle<()>>,
}

impl Loop {
    pub fn start(ep: Arc<Endpoint>, listener: TcpListener) -> Result<Loop> {
        // SAFETY: plain syscall; the result is checked before use.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(Error::io("creating an eventfd", io::Error::last_os_error()));
        }
        // SAFETY: eventfd returned a fresh descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        let cmds = Arc::new(Commands { queue: SegQueue::new(), eventfd });
        let cmds2 = cmds.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<io::Result<()>>(1);
        let thread = std::thread::Builder::new()
            .name("pserver-uring".into())
            .spawn(move || {
                // Built on the loop thread, which it never leaves (the ring
                // may be single-issuer: only its creator submits).
                let ring = match new_ring() {
                    Ok(r) => {
                        let _ = ready_tx.send(Ok(()));
                        r
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let state = LoopState {
                    ring,
                    ep,
                    listener,
                    cmds: cmds2,
                    conns: FxHashMap::default(),
                    wake_buf: Box::new(0),
                    in_flight: 0,
                    stopping: false,
                    completions: Vec::with_capacity(RING_ENTRIES as usize),
                };
                state.run()
            })
            .map_err(|e| Error::io("spawning the io_uring loop", e))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Error::io("setting up io_uring", e)),
            Err(_) => return Err(Error::Config("the io_uring loop thread died at start".into())),
        }
        Ok(Loop { cmds, thread: Some(thread) })
    }

    pub fn adopt(&self, conn: Arc<Conn>) -> io::Result<()> {
        self.cmds.send(Cmd::Adopt(conn))
    }

    pub fn flush(&self, peer: PeerId) -> io::Result<()> {
        self.cmds.send(Cmd::Flush(peer))
    }

    pub fn is_loop_thread(&self) -> bool {
        self.thread.as_ref().is_some_and(|h| h.thread().id() == std::thread::current().id())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = self.cmds.send(Cmd::Stop);
        if let Some(h) = self.thread.take()
            && h.thread().id() != std::thread::current().id()
        {
            let _ = h.join();
        }
    }
}

/// A batch of frames in one sendmsg, kept alive until its completion.
struct Sending {
    frames: Vec<Frame>,
    prefixes: Vec<Vec<u8>>,
    /// Bytes of the first frame already written before this batch.
    skip: usize,
    /// Bytes of this batch written so far.
    written: usize,
    total: usize,
    iov: Vec<libc::iovec>,
    msg: Box<libc::msghdr>,
}

struct LoopConn {
    conn: Arc<Conn>,
    buf: BytesMut,
    decoder: Decoder,
    recv_in_flight: bool,
    /// Not receiving: the peer has too many unsent replies waiting.
    recv_paused: bool,
    sending: Option<Sending>,
    dead: bool,
}

struct LoopState {
    ring: IoUring,
    ep: Arc<Endpoint>,
    listener: TcpListener,
    cmds: Arc<Commands>,
    conns: FxHashMap<u64, LoopConn>,
    wake_buf: Box<u64>,
    in_flight: usize,
    stopping: bool,
    completions: Vec<(u64, i32)>,
}

impl LoopState {
    fn run(mut self) {
        self.submit_accept();
        self.submit_wake();
        loop {
            if self.stopping && self.in_flight == 0 {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "io_uring loop failed; closing the endpoint");
                    break;
                }
            }
            self.completions.clear();
            self.completions.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            let done = std::mem::take(&mut self.completions);
            for &(ud, res) in &done {
                self.in_flight -= 1;
                let (token, op) = (ud >> 8, ud & 0xff);
                match op {
                    OP_ACCEPT => self.on_accept(res),
                    OP_WAKE => self.on_wake(),
                    OP_RECV => self.on_recv(token, res),
                    OP_SEND => self.on_send(token, res),
                    _ => unreachable!("unknown user_data {ud:#x}"),
                }
            }
            self.completions = done;
        }
        // Every buffer the kernel knew of has completed; close what is left.
        for (_, lc) in self.conns.drain() {
            self.ep.drop_conn(&lc.conn, "event loop stopped");
        }
    }

    fn push(&mut self, sqe: &io_uring::squeue::Entry) {
        loop {
            // SAFETY: every entry pushed here points only at buffers owned by
            // `self` (wake_buf) or by a LoopConn that is kept alive, and not
            // touched, until this entry's completion is processed.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                self.in_flight += 1;
                return;
            }
            if let Err(e) = self.ring.submit() {
                tracing::error!(error = %e, "io_uring submit failed");
            }
        }
    }

    fn submit_accept(&mut self) {
        let sqe = opcode::Accept::new(types::Fd(self.listener.as_raw_fd()), std::ptr::null_mut(), std::ptr::null_mut())
            .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            .build()
            .user_data(user_data(0, OP_ACCEPT));
        self.push(&sqe);
    }

    fn submit_wake(&mut self) {
        let ptr = (&mut *self.wake_buf as *mut u64).cast::<u8>();
        let sqe = opcode::Read::new(types::Fd(self.cmds.eventfd.as_raw_fd()), ptr, 8)
            .build()
            .user_data(user_data(0, OP_WAKE));
        self.push(&sqe);
    }

    fn on_accept(&mut self, res: i32) {
        if self.stopping {
            if res >= 0 {
                // SAFETY: a descriptor the kernel just gave us; closing it.
                drop(unsafe { OwnedFd::from_raw_fd(res) });
            }
            return;
        }
        if res >= 0 {
            // SAFETY: accept returned a new descriptor nothing else owns.
            let stream = unsafe { std::net::TcpStream::from_raw_fd(res) };
            if let Some(hs) = self.ep.begin_handshake(&stream) {
                match &self.ep.auth {
                    // No handshake: admitting only checks the connection limit.
                    Auth::Insecure => {
                        if let Some(conn) = self.ep.admit_accepted(stream, hs) {
                            self.insert(conn);
                        }
                    }
                    Auth::Token(_) => {
                        let ep = self.ep.clone();
                        let spawned = std::thread::Builder::new().name("pserver-auth".into()).spawn(move || {
                            if let Some(conn) = ep.admit_accepted(stream, hs) {
                                let _ = ep.adopt(&conn);
                            }
                        });
                        if let Err(e) = spawned {
                            self.ep.handshaking.lock().remove(&hs);
                            tracing::warn!(error = %e, "no thread to authenticate an accepted connection");
                        }
                    }
                }
            }
        } else {
            tracing::warn!(error = %io::Error::from_raw_os_error(-res), "accept failed");
        }
        self.submit_accept();
    }

    fn insert(&mut self, conn: Arc<Conn>) {
        let token = conn.id.0;
        let lc = LoopConn {
            conn,
            buf: BytesMut::with_capacity(64 << 10),
            decoder: Decoder::new(self.ep.limits),
            recv_in_flight: false,
            recv_paused: false,
            sending: None,
            dead: false,
        };
        self.conns.insert(token, lc);
        self.submit_recv(token);
        // Frames may have been queued before the loop knew the connection.
        self.start_send(token);
    }

    fn on_wake(&mut self) {
        while let Some(cmd) = self.cmds.queue.pop() {
            match cmd {
                Cmd::Adopt(conn) => {
                    if self.stopping {
                        self.ep.drop_conn(&conn, "endpoint stopping");
                    } else {
                        self.insert(conn)
                    }
                }
                Cmd::Flush(peer) => self.start_send(peer.0),
                Cmd::Stop => self.stopping = true,
            }
        }
        if self.stopping {
            // Pending accepts and receives complete once their sockets are shut down.
            // SAFETY: shutting down a listening socket we own.
            unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
            let conns: Vec<Arc<Conn>> = self.conns.values().map(|c| c.conn.clone()).collect();
            for c in conns {
                self.ep.drop_conn(&c, "endpoint stopping");
            }
            let dead: Vec<u64> = self.conns.keys().copied().collect();
            for t in dead {
                if let Some(lc) = self.conns.get_mut(&t) {
                    lc.dead = true;
                }
                self.reap(t);
            }
        } else {
            self.submit_wake();
        }
    }

    fn submit_recv(&mut self, token: u64) {
        let Some(lc) = self.conns.get_mut(&token) else { return };
        if lc.dead || lc.recv_in_flight {
            return;
        }
        let want = lc.decoder.wanted(lc.buf.len()).max(16 << 10);
        lc.buf.reserve(want);
        let spare = (lc.buf.capacity() - lc.buf.len()).min(u32::MAX as usize) as u32;
        // SAFETY (pointer arithmetic): `len` is within the allocation.
        let ptr = unsafe { lc.buf.as_mut_ptr().add(lc.buf.len()) };
        let sqe = opcode::Recv::new(types::Fd(lc.conn.fd()), ptr, spare).build().user_data(user_data(token, OP_RECV));
        lc.recv_in_flight = true;
        self.push(&sqe);
    }

    fn on_recv(&mut self, token: u64, res: i32) {
        let Some(lc) = self.conns.get_mut(&token) else { return };
        lc.recv_in_flight = false;
        if res <= 0 || lc.dead || lc.conn.closed.load(Ordering::Acquire) {
            let why = match res {
                0 => "peer closed".to_string(),
                r if r < 0 => format!("receive failed: {}", io::Error::from_raw_os_error(-r)),
                _ => "closed".into(),
            };
            lc.dead = true;
            let conn = lc.conn.clone();
            self.ep.drop_conn(&conn, &why);
            self.reap(token);
            return;
        }
        // SAFETY: the kernel wrote exactly `res` bytes at the end of `buf`
        // (the spare capacity we handed it), so they are initialized.
        unsafe { lc.buf.set_len(lc.buf.len() + res as usize) };
        let conn = lc.conn.clone();
        loop {
            let lc = self.conns.get_mut(&token).expect("present");
            match lc.decoder.decode(&mut lc.buf) {
                Ok(Some(frame)) => self.ep.deliver(&conn, frame),
                Ok(None) => break,
                Err(e) => {
                    super::refuse_stream(&conn, &e.to_string());
                    self.conns.get_mut(&token).expect("present").dead = true;
                    self.ep.drop_conn(&conn, &format!("corrupt stream: {e}"));
                    self.reap(token);
                    return;
                }
            }
        }
        if conn.send.lock().unsent > self.ep.limits.max_queued_bytes {
            // Backpressure: the peer's replies pile up unread. Receive again
            // once they drained (see on_send).
            tracing::debug!(peer = %conn.peer, "not reading from a peer that does not read its replies");
            self.conns.get_mut(&token).expect("present").recv_paused = true;
            return;
        }
        self.submit_recv(token);
    }

    /// Starts sending what is queued on `token`, unless a send is in flight.
    fn start_send(&mut self, token: u64) {
        let Some(lc) = self.conns.get_mut(&token) else { return };
        if lc.sending.is_some() || lc.dead {
            return;
        }
        let (frames, skip) = {
            let mut q = lc.conn.send.lock();
            if q.frames.is_empty() {
                q.loop_owns = false;
                return;
            }
            q.loop_owns = true;
            let n = q.frames.len().min(MAX_BATCH_FRAMES);
            let skip = std::mem::take(&mut q.head_written);
            (q.frames.drain(..n).collect::<Vec<_>>(), skip)
        };
        let prefixes: Vec<Vec<u8>> = frames
            .iter()
            .map(|f| {
                let mut p = Vec::with_capacity(64);
                frame::encode_prefix(f, &mut p);
                p
            })
            .collect();
        let total = frames.iter().map(|f| f.wire_len() as usize).sum::<usize>() - skip;
        // SAFETY: an all-zero msghdr is valid (no name, no control data).
        let msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        let mut s = Sending { frames, prefixes, skip, written: 0, total, iov: Vec::new(), msg };
        let fd = lc.conn.fd();
        fill_iov(&mut s);
        lc.sending = Some(s);
        self.submit_send(token, fd);
    }

    fn submit_send(&mut self, token: u64, fd: RawFd) {
        let lc = self.conns.get_mut(&token).expect("present");
        let s = lc.sending.as_mut().expect("a batch is being sent");
        s.msg.msg_iov = s.iov.as_mut_ptr();
        s.msg.msg_iovlen = s.iov.len().min(MAX_IOV) as _;
        let sqe = opcode::SendMsg::new(types::Fd(fd), &*s.msg as *const libc::msghdr)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(user_data(token, OP_SEND));
        self.push(&sqe);
    }

    fn on_send(&mut self, token: u64, res: i32) {
        let Some(lc) = self.conns.get_mut(&token) else { return };
        if res < 0 && -res == libc::EAGAIN {
            let fd = lc.conn.fd();
            self.submit_send(token, fd);
            return;
        }
        if res < 0 || lc.dead {
            lc.sending = None;
            lc.dead = true;
            let conn = lc.conn.clone();
            let why = format!("send failed: {}", io::Error::from_raw_os_error(-res.min(0)));
            self.ep.drop_conn(&conn, &why);
            self.reap(token);
            return;
        }
        let resume = {
            let mut q = lc.conn.send.lock();
            q.unsent = q.unsent.saturating_sub(res as u64);
            lc.recv_paused && q.unsent <= self.ep.limits.max_queued_bytes / 2
        };
        if resume {
            lc.recv_paused = false;
            self.submit_recv(token);
        }
        let Some(lc) = self.conns.get_mut(&token) else { return };
        let s = lc.sending.as_mut().expect("a batch is being sent");
        s.written += res as usize;
        if s.written < s.total {
            fill_iov(s);
            let fd = lc.conn.fd();
            self.submit_send(token, fd);
            return;
        }
        lc.sending = None;
        self.start_send(token);
    }

    /// Frees a dead connection once the kernel holds none of its buffers.
    fn reap(&mut self, token: u64) {
        if let Some(lc) = self.conns.get(&token)
            && lc.dead
            && !lc.recv_in_flight
            && lc.sending.is_none()
        {
            self.conns.remove(&token);
        }
    }
}

/// Rebuilds the iovecs of a batch from where it stands.
fn fill_iov(s: &mut Sending) {
    s.iov.clear();
    let mut skip = s.skip + s.written;
    for (f, p) in s.frames.iter().zip(&s.prefixes) {
        let len = f.wire_len() as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        frame_iovecs(f, p, skip, &mut s.iov);
        skip = 0;
        if s.iov.len() >= MAX_IOV {
            break;
        }
    }
}
