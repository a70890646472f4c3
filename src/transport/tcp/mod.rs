//! TCP transport: frames over TCP, driven by an io_uring event loop, with a
//! plain-socket fallback that behaves the same.
//!
//! Back ends (`PSERVER_IO=uring|std|auto`, default auto):
//! * **uring**: one event-loop thread per endpoint owns an io_uring. It
//!   accepts, receives into per-connection buffers (a large frame is received
//!   straight into its final buffer: the decoder reserves the whole body as
//!   soon as the header is checked), decodes frames and hands them to the
//!   handler, and sends whatever is queued with one `sendmsg` per connection
//!   gathering many frames (batched submissions, one `io_uring_enter` for
//!   every ready connection).
//! * **std**: a thread per connection blocks on reads; sends are blocking
//!   `sendmsg` calls. Used when io_uring cannot be set up (old kernel, a
//!   container's seccomp profile), or when forced.
//!
//! Sending: a frame is written directly by the sending thread, without a
//! hand-off, when nothing is queued on that connection and the socket takes
//! it whole (the common case for small frames). Otherwise it is queued and
//! the event loop (uring) or the sender (std, blocking) completes it. Waking
//! another thread costs tens of microseconds on small virtual machines, which
//! would otherwise dominate a one-key round trip. Order per connection is
//! preserved by the connection's send lock.
//!
//! Every frame is checked by [`Decoder`] under [`Limits`] before its body is
//! allocated; a corrupt stream closes that connection only.

mod blocking;
mod uring;

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use rustc_hash::FxHashMap;

use super::frame::{self, Frame, Limits};
use super::{Handler, Messenger, PeerId, Transport};
use crate::error::{Error, Result};

/// Which I/O back end to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    /// io_uring when available, else std (logged).
    Auto,
    Uring,
    Std,
}

impl IoMode {
    /// From `PSERVER_IO` (`uring`, `std`, `auto`; unset means auto).
    pub fn from_env() -> Result<IoMode> {
        match std::env::var("PSERVER_IO").as_deref() {
            Err(_) | Ok("") | Ok("auto") => Ok(IoMode::Auto),
            Ok("uring") => Ok(IoMode::Uring),
            Ok("std") => Ok(IoMode::Std),
            Ok(other) => Err(Error::Config(format!("PSERVER_IO={other:?}: expected uring, std or auto"))),
        }
    }
}

/// The TCP transport.
#[derive(Clone, Debug)]
pub struct Tcp {
    mode: IoMode,
    limits: Limits,
}

impl Tcp {
    pub fn new(mode: IoMode, limits: Limits) -> Tcp {
        Tcp { mode, limits }
    }

    /// A transport configured from the environment (`PSERVER_IO`).
    pub fn from_env() -> Result<Tcp> {
        Ok(Tcp::new(IoMode::from_env()?, Limits::default()))
    }

    /// The back end `bind` will use.
    pub fn resolved_mode(&self) -> IoMode {
        match self.mode {
            IoMode::Auto => {
                if uring::available() {
                    IoMode::Uring
                } else {
                    IoMode::Std
                }
            }
            m => m,
        }
    }
}

impl Transport for Tcp {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn bind(&self, addr: &str, handler: Arc<dyn Handler>) -> Result<Arc<dyn Messenger>> {
        let addr = if addr.is_empty() { "127.0.0.1:0" } else { addr };
        let listener = TcpListener::bind(addr).map_err(|e| Error::io(format!("binding {addr}"), e))?;
        let local = listener.local_addr().map_err(|e| Error::io("reading the bound address", e))?;
        let mode = match self.mode {
            IoMode::Std => IoMode::Std,
            IoMode::Uring => {
                if !uring::available() {
                    return Err(Error::Config("PSERVER_IO=uring, but io_uring cannot be set up here".into()));
                }
                IoMode::Uring
            }
            IoMode::Auto => {
                if uring::available() {
                    IoMode::Uring
                } else {
                    tracing::info!("io_uring is not available; using plain sockets");
                    IoMode::Std
                }
            }
        };
        let ep = Arc::new_cyclic(|me| Endpoint {
            me: me.clone(),
            local,
            mode,
            limits: self.limits,
            handler: RwLock::new(Some(handler)),
            conns: RwLock::new(FxHashMap::default()),
            next_peer: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            driver: Mutex::new(None),
        });
        let driver = match mode {
            IoMode::Uring => Driver::Uring(uring::Loop::start(ep.clone(), listener)?),
            _ => Driver::Std(blocking::Acceptor::start(ep.clone(), listener)?),
        };
        *ep.driver.lock() = Some(driver);
        tracing::debug!(addr = %local, ?mode, "tcp endpoint bound");
        Ok(ep)
    }
}

enum Driver {
    Uring(uring::Loop),
    Std(blocking::Acceptor),
}

/// Frames waiting to be written on a connection.
#[derive(Default)]
struct SendQueue {
    frames: VecDeque<Frame>,
    /// Bytes of the first frame already written.
    head_written: usize,
    /// The event loop is writing this queue; senders only append.
    loop_owns: bool,
}

/// One TCP connection, shared by the endpoint, its driver and senders.
pub(crate) struct Conn {
    id: PeerId,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    send: Mutex<SendQueue>,
    closed: AtomicBool,
}

impl Conn {
    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

pub(crate) struct Endpoint {
    me: Weak<Endpoint>,
    local: SocketAddr,
    mode: IoMode,
    limits: Limits,
    handler: RwLock<Option<Arc<dyn Handler>>>,
    conns: RwLock<FxHashMap<u64, Arc<Conn>>>,
    next_peer: AtomicU64,
    closed: AtomicBool,
    driver: Mutex<Option<Driver>>,
}

impl Endpoint {
    fn messenger(&self) -> Option<Arc<dyn Messenger>> {
        self.me.upgrade().map(|e| e as Arc<dyn Messenger>)
    }

    /// Registers a connected stream (accepted or connected).
    fn add_conn(&self, stream: TcpStream) -> io::Result<Arc<Conn>> {
        stream.set_nodelay(true)?;
        let peer = stream.peer_addr()?;
        let local = stream.local_addr()?;
        let id = PeerId(self.next_peer.fetch_add(1, Ordering::Relaxed));
        let conn = Arc::new(Conn { id, stream, peer, local, send: Mutex::default(), closed: AtomicBool::new(false) });
        let mut conns = self.conns.write();
        // Checked under the lock `shutdown` takes its snapshot with: a
        // connection is either in that snapshot (and closed by it) or refused.
        if self.closed.load(Ordering::Acquire) {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "endpoint is shutting down"));
        }
        conns.insert(id.0, conn.clone());
        Ok(conn)
    }

    /// Delivers a decoded frame to the handler.
    fn deliver(&self, conn: &Conn, frame: Frame) {
        let handler = self.handler.read().clone();
        if let (Some(h), Some(net)) = (handler, self.messenger()) {
            h.on_frame(&net, conn.id, frame);
        }
    }

    /// Forgets a connection (idempotent) and tells the handler.
    fn drop_conn(&self, conn: &Conn, why: &str) {
        if conn.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::debug!(peer = %conn.peer, why, "connection closed");
        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        self.conns.write().remove(&conn.id.0);
        let handler = self.handler.read().clone();
        if let (Some(h), Some(net)) = (handler, self.messenger()) {
            h.on_disconnect(&net, conn.id);
        }
    }

    /// Waits until every connection's send queue is empty, up to `limit`.
    /// Skipped on the event-loop thread itself, which is what drains them.
    fn drain_queues(&self, limit: Duration) {
        let on_loop = match self.driver.lock().as_ref() {
            Some(Driver::Uring(l)) => l.is_loop_thread(),
            _ => true, // the std back end writes synchronously: nothing queued
        };
        if on_loop {
            return;
        }
        let deadline = std::time::Instant::now() + limit;
        loop {
            let busy = self.conns.read().values().any(|c| {
                let q = c.send.lock();
                !c.closed.load(Ordering::Acquire) && (q.loop_owns || !q.frames.is_empty())
            });
            if !busy || std::time::Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn conn(&self, peer: PeerId) -> Result<Arc<Conn>> {
        self.conns.read().get(&peer.0).cloned().ok_or_else(|| Error::Disconnected(format!("{peer}")))
    }
}

impl Messenger for Endpoint {
    fn local_addr(&self) -> String {
        self.local.to_string()
    }

    fn connect(&self, addr: &str) -> Result<PeerId> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let unreachable = |detail: String| Error::Unreachable { addr: addr.into(), detail };
        let targets: Vec<SocketAddr> =
            addr.to_socket_addrs().map_err(|e| unreachable(format!("cannot resolve: {e}")))?.collect();
        let mut last = String::from("no address");
        for t in targets {
            match TcpStream::connect_timeout(&t, Duration::from_secs(10)) {
                Ok(s) => {
                    let conn = self.add_conn(s).map_err(|e| unreachable(e.to_string()))?;
                    match self.driver.lock().as_ref() {
                        Some(Driver::Uring(l)) => l.adopt(conn.clone()),
                        Some(Driver::Std(a)) => a.adopt(conn.clone()),
                        None => return Err(Error::ShuttingDown),
                    }
                    .map_err(|e| unreachable(e.to_string()))?;
                    return Ok(conn.id);
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(unreachable(last))
    }

    fn send(&self, peer: PeerId, frame: Frame) -> Result<()> {
        frame::check_outgoing(&frame, &self.limits).map_err(|e| Error::LimitExceeded(e.to_string()))?;
        let conn = self.conn(peer)?;
        if conn.closed.load(Ordering::Acquire) {
            return Err(Error::Disconnected(conn.peer.to_string()));
        }
        let result = match self.mode {
            IoMode::Uring => {
                let mut q = conn.send.lock();
                if q.loop_owns || !q.frames.is_empty() {
                    q.frames.push_back(frame);
                    Ok(())
                } else {
                    match write_now(conn.fd(), &frame, 0) {
                        Ok(n) if n as u64 == frame.wire_len() => Ok(()),
                        Ok(n) => {
                            q.frames.push_back(frame);
                            q.head_written = n;
                            q.loop_owns = true;
                            drop(q);
                            match self.driver.lock().as_ref() {
                                Some(Driver::Uring(l)) => l.flush(conn.id),
                                _ => Err(io::Error::other("endpoint is shutting down")),
                            }
                        }
                        Err(e) => Err(e),
                    }
                }
            }
            _ => {
                // Blocking back end: the sender writes, holding the queue lock
                // so frames of concurrent senders never interleave.
                let _q = conn.send.lock();
                write_all_blocking(conn.fd(), &frame)
            }
        };
        result.map_err(|e| {
            self.drop_conn(&conn, "write failed");
            Error::Disconnected(format!("{}: {e}", conn.peer))
        })
    }

    fn peer_addr(&self, peer: PeerId) -> String {
        self.conns.read().get(&peer.0).map_or_else(|| format!("{peer} (closed)"), |c| c.peer.to_string())
    }

    fn disconnect(&self, peer: PeerId) {
        if let Ok(c) = self.conn(peer) {
            self.drop_conn(&c, "closed locally");
        }
    }

    fn shutdown(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // Deliver what is queued (a goodbye such as the scheduler's Shutdown
        // is typically the last frame) before closing, within a bound.
        self.drain_queues(Duration::from_secs(5));
        let conns: Vec<Arc<Conn>> = self.conns.write().values().cloned().collect();
        for c in conns {
            self.drop_conn(&c, "endpoint shut down");
        }
        // Dropping the handler breaks the handler -> messenger cycle.
        self.handler.write().take();
        let driver = self.driver.lock().take();
        drop(driver); // stops and joins the driver threads (unless called from one of them)
    }

    fn same_host(&self, peer: PeerId) -> bool {
        self.conns.read().get(&peer.0).is_some_and(|c| c.peer.ip().is_loopback() || c.peer.ip() == c.local.ip())
    }

    fn advertised_addr(&self, via: PeerId) -> String {
        if !self.local.ip().is_unspecified() {
            return self.local.to_string();
        }
        match self.conns.read().get(&via.0) {
            Some(c) => SocketAddr::new(c.local.ip(), self.local.port()).to_string(),
            None => self.local.to_string(),
        }
    }
}

/// Tells a peer whose byte stream could not be decoded why it is being
/// disconnected (best effort: one non-blocking write).
fn refuse_stream(conn: &Conn, reason: &str) {
    tracing::warn!(peer = %conn.peer, reason, "closing a connection with a corrupt stream");
    let f = Frame::new(frame::KIND_STREAM_REFUSED, 0, bytes::Bytes::new())
        .with_segment(bytes::Bytes::from(format!("malformed frame, closing the connection: {reason}")));
    let q = conn.send.lock();
    // Only when nothing else is mid-write: never interleave with a frame.
    if q.frames.is_empty() && !q.loop_owns {
        let _ = write_now(conn.fd(), &f, 0);
    }
}

/// The iovecs of `frame` from byte `skip` on, with `prefix` holding its
/// header, segment table and padded meta.
fn frame_iovecs(frame: &Frame, prefix: &[u8], mut skip: usize, out: &mut Vec<libc::iovec>) {
    let mut push = |bytes: &[u8], skip: &mut usize| {
        if *skip >= bytes.len() {
            *skip -= bytes.len();
            return;
        }
        let b = &bytes[*skip..];
        *skip = 0;
        if !b.is_empty() {
            out.push(libc::iovec { iov_base: b.as_ptr() as *mut libc::c_void, iov_len: b.len() });
        }
    };
    push(prefix, &mut skip);
    for s in &frame.segments {
        push(s, &mut skip);
        push(frame::padding(s.len()), &mut skip);
    }
}

/// One `sendmsg` of as much of `frame` (from byte `skip`) as the socket takes
/// without blocking; returns the bytes of the frame written in total.
fn write_now(fd: RawFd, frame: &Frame, skip: usize) -> io::Result<usize> {
    let mut prefix = Vec::with_capacity(64);
    frame::encode_prefix(frame, &mut prefix);
    let mut iov = Vec::with_capacity(2 + 2 * frame.segments.len());
    frame_iovecs(frame, &prefix, skip, &mut iov);
    match sendmsg(fd, &iov, libc::MSG_DONTWAIT) {
        Ok(n) => Ok(skip + n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(skip),
        Err(e) => Err(e),
    }
}

/// Writes all of `frame` on a blocking socket.
fn write_all_blocking(fd: RawFd, frame: &Frame) -> io::Result<()> {
    let total = frame.wire_len() as usize;
    let mut prefix = Vec::with_capacity(64);
    frame::encode_prefix(frame, &mut prefix);
    let mut done = 0;
    let mut iov = Vec::with_capacity(2 + 2 * frame.segments.len());
    while done < total {
        iov.clear();
        frame_iovecs(frame, &prefix, done, &mut iov);
        done += sendmsg(fd, &iov, 0)?;
    }
    Ok(())
}

/// `sendmsg` without SIGPIPE; at most IOV_MAX iovecs per call.
fn sendmsg(fd: RawFd, iov: &[libc::iovec], flags: libc::c_int) -> io::Result<usize> {
    const IOV_MAX: usize = 1024;
    let n = iov.len().min(IOV_MAX);
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = n as _;
    loop {
        // SAFETY: `msg` points at `n` iovecs that describe live, readable
        // buffers borrowed from the frame for the duration of this call.
        let r = unsafe { libc::sendmsg(fd, &msg, flags | libc::MSG_NOSIGNAL) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests;
