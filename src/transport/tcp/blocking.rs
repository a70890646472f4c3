//! The plain-socket back end: an accept thread, and a thread per connection
//! blocking on reads. Used when io_uring is unavailable or `PSERVER_IO=std`.
//! An accepted connection's thread first runs the handshake (see
//! [`Endpoint::admit_accepted`]), so the accept thread never waits on a peer.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::BytesMut;
use parking_lot::Mutex;

use super::{Conn, Endpoint};
use crate::error::{Error, Result};
use crate::transport::frame::Decoder;

pub(super) struct Acceptor {
    ep: Arc<Endpoint>,
    /// Written to stop the accept thread.
    wake_tx: OwnedFd,
    accept: Option<JoinHandle<()>>,
    readers: Mutex<Vec<JoinHandle<()>>>,
}

impl Acceptor {
    pub fn start(ep: Arc<Endpoint>, listener: TcpListener) -> Result<Acceptor> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(Error::io("creating a wake-up pipe", io::Error::last_os_error()));
        }
        // SAFETY: pipe2 succeeded, so both are fresh descriptors we own.
        let (wake_rx, wake_tx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let ep2 = ep.clone();
        let accept = std::thread::Builder::new()
            .name("pserver-accept".into())
            .spawn(move || accept_loop(ep2, listener, wake_rx))
            .map_err(|e| Error::io("spawning the accept thread", e))?;
        Ok(Acceptor { ep, wake_tx, accept: Some(accept), readers: Mutex::new(Vec::new()) })
    }

    /// Starts reading a connection.
    pub fn adopt(&self, conn: Arc<Conn>) -> io::Result<()> {
        let h = spawn_reader(self.ep.clone(), conn)?;
        let mut r = self.readers.lock();
        r.retain(|h| !h.is_finished());
        r.push(h);
        Ok(())
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        // SAFETY: writing one byte from a valid buffer to a pipe we own.
        unsafe { libc::write(self.wake_tx.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        let me = std::thread::current().id();
        let readers: Vec<JoinHandle<()>> = self.readers.lock().drain(..).collect();
        for h in self.accept.take().into_iter().chain(readers) {
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
    }
}

fn spawn_reader(ep: Arc<Endpoint>, conn: Arc<Conn>) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("pserver-conn".into()).spawn(move || read_loop(&ep, &conn))
}

/// A thread that authenticates an accepted stream, then reads it.
fn spawn_accepted(ep: Arc<Endpoint>, stream: std::net::TcpStream, hs: u64) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("pserver-conn".into()).spawn(move || {
        if let Some(conn) = ep.admit_accepted(stream, hs) {
            read_loop(&ep, &conn)
        }
    })
}

fn accept_loop(ep: Arc<Endpoint>, listener: TcpListener, wake: OwnedFd) {
    let mut readers: Vec<JoinHandle<()>> = Vec::new();
    loop {
        let mut fds = [
            libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structures.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if fds[1].revents != 0 {
            break;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let Some(hs) = ep.begin_handshake(&stream) else { continue };
                match spawn_accepted(ep.clone(), stream, hs) {
                    Ok(h) => {
                        readers.retain(|h| !h.is_finished());
                        readers.push(h);
                    }
                    Err(e) => {
                        ep.handshaking.lock().remove(&hs);
                        tracing::warn!(error = %e, "no thread for an accepted connection");
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
    for h in readers {
        let _ = h.join();
    }
}

fn read_loop(ep: &Endpoint, conn: &Conn) {
    let mut buf = BytesMut::with_capacity(64 << 10);
    let mut decoder = Decoder::new(ep.limits);
    loop {
        let want = decoder.wanted(buf.len()).max(16 << 10);
        buf.reserve(want);
        let spare = buf.capacity() - buf.len();
        // SAFETY: the pointer is to `spare` bytes of capacity this BytesMut
        // owns past its length; recv writes at most `spare` bytes there.
        let n = unsafe { libc::recv(conn.fd(), buf.as_mut_ptr().add(buf.len()).cast(), spare, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            ep.drop_conn(conn, &format!("read failed: {e}"));
            return;
        }
        if n == 0 {
            ep.drop_conn(conn, "peer closed");
            return;
        }
        // SAFETY: recv initialized exactly `n` more bytes.
        unsafe { buf.set_len(buf.len() + n as usize) };
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => ep.deliver(conn, frame),
                Ok(None) => break,
                Err(e) => {
                    super::refuse_stream(conn, &e.to_string());
                    ep.drop_conn(conn, &format!("corrupt stream: {e}"));
                    return;
                }
            }
        }
        if conn.closed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
    }
}
