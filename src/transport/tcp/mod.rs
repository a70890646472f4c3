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
//!
//! Authentication ([`super::auth`]): every connection, made or accepted,
//! completes the job's challenge-response before a single frame is read or
//! sent. An accepted connection is authenticated on a short-lived thread of
//! its own, with the handshake's deadline, so a slow or silent peer never
//! holds the event loop, the accept thread or anyone else; only then does
//! the connection exist for the endpoint and its handler. A peer that fails
//! is logged with its address and closed. `--insecure` endpoints skip the
//! handshake (and cannot talk to authenticating ones).
//!
//! Limits: at most `Limits::max_connections` accepted connections (and as
//! many handshakes in progress); a peer over the limit is told so and closed.
//! A connection whose unsent replies exceed `Limits::max_queued_bytes` (a
//! peer that sends requests but does not read its replies) is not read from
//! until they drain to half that: backpressure, not unbounded memory.

mod blocking;
mod uring;

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use rustc_hash::FxHashMap;

use super::auth::{self, Auth};
use super::frame::{self, Frame, Limits};
use super::{Handler, Messenger, PeerId, Transport, TransportStats};
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
    auth: Auth,
}

impl Tcp {
    /// A transport whose endpoints authenticate with a token generated here:
    /// they reach each other (clones share the token) and nobody else, like
    /// the nodes of an embedded job. [`Tcp::with_auth`] sets the job's token.
    pub fn new(mode: IoMode, limits: Limits) -> Tcp {
        // Only a broken operating system has no random numbers to give.
        let auth = Auth::generate().expect("the operating system's random number generator failed");
        Tcp { mode, limits, auth }
    }

    /// The same transport authenticating with `auth`.
    pub fn with_auth(mut self, auth: Auth) -> Tcp {
        self.auth = auth;
        self
    }

    /// A transport configured from the environment: the I/O back end
    /// (`PSERVER_IO`) and the job token (`PSERVER_TOKEN`, `PSERVER_TOKEN_FILE`;
    /// an error without one unless `PSERVER_INSECURE=1`).
    pub fn from_env() -> Result<Tcp> {
        Ok(Tcp { mode: IoMode::from_env()?, limits: Limits::default(), auth: Auth::from_env()? })
    }

    /// The same transport under `limits`.
    pub fn with_limits(mut self, limits: Limits) -> Tcp {
        self.limits = limits;
        self
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
            auth: self.auth.clone(),
            accepted: AtomicUsize::new(0),
            handshaking: Mutex::new(FxHashMap::default()),
            next_handshake: AtomicU64::new(0),
            stats: Counters::default(),
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
    /// Bytes queued or in the loop's batch and not yet written.
    unsent: u64,
}

/// One TCP connection, shared by the endpoint, its driver and senders.
pub(crate) struct Conn {
    id: PeerId,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    send: Mutex<SendQueue>,
    closed: AtomicBool,
    /// Accepted (counts towards the connection limit), not made by us.
    accepted: bool,
}

/// An endpoint's counters.
#[derive(Default)]
struct Counters {
    frames_in: AtomicU64,
    frames_out: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    auth_failures: AtomicU64,
    refused: AtomicU64,
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
    auth: Auth,
    /// Accepted connections that passed authentication, open now.
    accepted: AtomicUsize,
    /// Accepted streams still in the handshake (clones, to cut them off at shutdown).
    handshaking: Mutex<FxHashMap<u64, TcpStream>>,
    next_handshake: AtomicU64,
    stats: Counters,
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

    /// Registers a connected stream (accepted or connected). An accepted
    /// one holds a slot of the connection limit, reserved by [`Endpoint::reserve_slot`]
    /// and released here on failure or by `drop_conn`.
    fn add_conn(&self, stream: TcpStream, accepted: bool) -> io::Result<Arc<Conn>> {
        let setup = (|| {
            stream.set_nodelay(true)?;
            Ok::<_, io::Error>((stream.peer_addr()?, stream.local_addr()?))
        })();
        let (peer, local) = match setup {
            Ok(a) => a,
            Err(e) => {
                if accepted {
                    self.release_slot();
                }
                return Err(e);
            }
        };
        let id = PeerId(self.next_peer.fetch_add(1, Ordering::Relaxed));
        let conn = Arc::new(Conn {
            id,
            stream,
            peer,
            local,
            send: Mutex::default(),
            closed: AtomicBool::new(false),
            accepted,
        });
        let mut conns = self.conns.write();
        // Checked under the lock `shutdown` takes its snapshot with: a
        // connection is either in that snapshot (and closed by it) or refused.
        if self.closed.load(Ordering::Acquire) {
            drop(conns);
            if accepted {
                self.release_slot();
            }
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "endpoint is shutting down"));
        }
        conns.insert(id.0, conn.clone());
        Ok(conn)
    }

    /// Takes one of the accepted-connection slots, or says why not.
    fn reserve_slot(&self) -> std::result::Result<(), String> {
        let max = self.limits.max_connections;
        self.accepted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .map(|_| ())
            .map_err(|_| format!("this node is at its limit of {max} connections (--max-connections)"))
    }

    fn release_slot(&self) {
        self.accepted.fetch_sub(1, Ordering::AcqRel);
    }

    /// On the accepting thread, before anything is read: registers the
    /// handshake `stream` is about to run (so that shutdown can cut it off),
    /// or refuses it when as many handshakes as connections are allowed are
    /// already running, or the endpoint is closing.
    fn begin_handshake(&self, stream: &TcpStream) -> Option<u64> {
        let hs = self.next_handshake.fetch_add(1, Ordering::Relaxed);
        if matches!(self.auth, Auth::Insecure) {
            return Some(hs);
        }
        let mut pending = self.handshaking.lock();
        // Under the lock `shutdown` sweeps: either it cuts this stream off,
        // or this sees the endpoint closed.
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        if pending.len() >= self.limits.max_connections {
            drop(pending);
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            let peer = stream.peer_addr().map_or_else(|_| "an unknown peer".to_string(), |a| a.to_string());
            tracing::warn!(peer = %peer, "refused a connection: too many handshakes in progress");
            return None;
        }
        match stream.try_clone() {
            Ok(clone) => {
                pending.insert(hs, clone);
                Some(hs)
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not set up an accepted connection");
                None
            }
        }
    }

    /// Authenticates an accepted stream (registered by `begin_handshake` as
    /// `hs`) and admits it under the connection limit; runs on a thread of
    /// its own, since the handshake blocks (within its deadline). `None` when
    /// the peer failed, was refused, or the endpoint is closing; every
    /// refusal is logged with the peer's address.
    fn admit_accepted(&self, stream: TcpStream, hs: u64) -> Option<Arc<Conn>> {
        let peer = stream.peer_addr().map_or_else(|_| "an unknown peer".to_string(), |a| a.to_string());
        let result = match &self.auth {
            Auth::Insecure => self.reserve_slot().map_err(|reason| {
                refuse_insecure(&stream, &reason);
                Error::LimitExceeded(reason)
            }),
            Auth::Token(token) => {
                let r = stream
                    .set_nonblocking(false)
                    .map_err(|e| Error::io("authentication: socket", e))
                    .and_then(|()| auth::server(&stream, token, || self.reserve_slot()));
                self.handshaking.lock().remove(&hs);
                r
            }
        };
        if let Err(e) = result {
            match e {
                Error::LimitExceeded(_) => self.stats.refused.fetch_add(1, Ordering::Relaxed),
                _ => self.stats.auth_failures.fetch_add(1, Ordering::Relaxed),
            };
            if !self.closed.load(Ordering::Acquire) {
                tracing::warn!(peer = %peer, local = %self.local, error = %e, "refused a connection");
            }
            return None;
        }
        match self.add_conn(stream, true) {
            Ok(conn) => Some(conn),
            Err(e) => {
                tracing::debug!(peer = %peer, error = %e, "could not set up an accepted connection");
                None
            }
        }
    }

    /// Hands a connection to the driver, which starts receiving on it.
    fn adopt(&self, conn: &Arc<Conn>) -> io::Result<()> {
        let r = match self.driver.lock().as_ref() {
            Some(Driver::Uring(l)) => l.adopt(conn.clone()),
            Some(Driver::Std(a)) => a.adopt(conn.clone()),
            None => Err(io::Error::new(io::ErrorKind::ConnectionAborted, "endpoint is shutting down")),
        };
        if let Err(e) = &r {
            self.drop_conn(conn, &format!("not adopted: {e}"));
        }
        r
    }

    /// Delivers a decoded frame to the handler.
    fn deliver(&self, conn: &Conn, frame: Frame) {
        self.stats.frames_in.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_in.fetch_add(frame.wire_len(), Ordering::Relaxed);
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
        if conn.accepted {
            self.release_slot();
        }
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
                    if let Auth::Token(token) = &self.auth {
                        auth::client(&s, token).inspect_err(|e| {
                            tracing::warn!(peer = %t, error = %e, "could not authenticate a connection");
                        })?;
                    }
                    let conn = self.add_conn(s, false).map_err(|e| unreachable(e.to_string()))?;
                    self.adopt(&conn).map_err(|e| unreachable(e.to_string()))?;
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
        let wire = frame.wire_len();
        self.stats.frames_out.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_out.fetch_add(wire, Ordering::Relaxed);
        let result = match self.mode {
            IoMode::Uring => {
                let mut q = conn.send.lock();
                if q.loop_owns || !q.frames.is_empty() {
                    q.frames.push_back(frame);
                    q.unsent += wire;
                    Ok(())
                } else {
                    match write_now(conn.fd(), &frame, 0) {
                        Ok(n) if n as u64 == wire => Ok(()),
                        Ok(n) => {
                            q.frames.push_back(frame);
                            q.unsent += wire - n as u64;
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
        // Handshakes in progress end now rather than at their deadline.
        for s in self.handshaking.lock().values() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        // Dropping the handler breaks the handler -> messenger cycle.
        self.handler.write().take();
        let driver = self.driver.lock().take();
        drop(driver); // stops and joins the driver threads (unless called from one of them)
    }

    fn same_host(&self, peer: PeerId) -> bool {
        self.conns.read().get(&peer.0).is_some_and(|c| c.peer.ip().is_loopback() || c.peer.ip() == c.local.ip())
    }

    fn stats(&self) -> TransportStats {
        let c = &self.stats;
        TransportStats {
            connections: self.conns.read().len() as u64,
            frames_in: c.frames_in.load(Ordering::Relaxed),
            frames_out: c.frames_out.load(Ordering::Relaxed),
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            bytes_out: c.bytes_out.load(Ordering::Relaxed),
            auth_failures: c.auth_failures.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
        }
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

/// Tells an unauthenticated (`--insecure`) peer over the connection limit
/// why it is closed, as a frame it can read (best effort, never blocks).
fn refuse_insecure(stream: &TcpStream, reason: &str) {
    let f = Frame::new(frame::KIND_STREAM_REFUSED, 0, bytes::Bytes::new())
        .with_segment(bytes::Bytes::from(format!("connection refused: {reason}")));
    let _ = write_now(stream.as_raw_fd(), &f, 0);
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
