use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use super::*;
use crate::transport::auth;
use crate::transport::frame::{self, Frame};

/// Records frames; echoes kind-1 frames back with kind 2.
#[derive(Default)]
struct Rec {
    got: Mutex<Vec<(PeerId, Frame)>>,
    gone: Mutex<Vec<PeerId>>,
    cv: Condvar,
}

impl Handler for Rec {
    fn on_frame(&self, net: &Arc<dyn Messenger>, from: PeerId, frame: Frame) {
        if frame.kind == 1 {
            let mut reply = frame.clone();
            reply.kind = 2;
            let _ = net.send(from, reply);
        }
        self.got.lock().push((from, frame));
        self.cv.notify_all();
    }
    fn on_disconnect(&self, _: &Arc<dyn Messenger>, peer: PeerId) {
        self.gone.lock().push(peer);
        self.cv.notify_all();
    }
}

impl Rec {
    fn wait_frames(&self, n: usize) -> Vec<(PeerId, Frame)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut g = self.got.lock();
        while g.len() < n {
            assert!(!self.cv.wait_until(&mut g, deadline).timed_out(), "only {} of {n} frames arrived", g.len());
        }
        g.clone()
    }
    fn wait_gone(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut g = self.gone.lock();
        while g.len() < n {
            assert!(!self.cv.wait_until(&mut g, deadline).timed_out(), "disconnect not reported");
        }
    }
}

fn modes() -> Vec<IoMode> {
    let mut m = vec![IoMode::Std];
    if uring::available() {
        m.push(IoMode::Uring);
    } else {
        eprintln!("io_uring unavailable here: testing the std back end only");
    }
    m
}

fn frame(kind: u16, id: u64, seg: Vec<u8>) -> Frame {
    Frame::new(kind, id, Bytes::from_static(b"meta")).with_segment(Bytes::from(seg))
}

#[test]
fn frames_arrive_in_order_and_replies_route_back() {
    for mode in modes() {
        let t = Tcp::new(mode, Limits::default());
        let (hs, hc) = (Arc::new(Rec::default()), Arc::new(Rec::default()));
        let server = t.bind("127.0.0.1:0", hs.clone()).unwrap();
        let client = t.bind("127.0.0.1:0", hc.clone()).unwrap();
        let p = client.connect(&server.local_addr()).unwrap();
        for id in 0..200u64 {
            client.send(p, frame(1, id, vec![id as u8; (id as usize * 37) % 5000])).unwrap();
        }
        let got = hs.wait_frames(200);
        for (i, (_, f)) in got.iter().enumerate() {
            assert_eq!(f.id, i as u64, "{mode:?}");
            assert_eq!(f.segments[0].len(), (i * 37) % 5000);
            assert!(f.segments[0].iter().all(|&b| b == i as u8));
            assert_eq!(&f.meta[..], b"meta");
        }
        let back = hc.wait_frames(200);
        assert!(back.iter().enumerate().all(|(i, (from, f))| *from == p && f.id == i as u64 && f.kind == 2));
        client.shutdown();
        hs.wait_gone(1);
        server.shutdown();
    }
}

#[test]
fn a_large_frame_arrives_intact() {
    for mode in modes() {
        let t = Tcp::new(mode, Limits::default());
        let hs = Arc::new(Rec::default());
        let server = t.bind("127.0.0.1:0", hs.clone()).unwrap();
        let client = t.bind("127.0.0.1:0", Arc::new(Rec::default())).unwrap();
        let p = client.connect(&server.local_addr()).unwrap();
        let big: Vec<u8> = (0..(24 << 20) + 3).map(|i| (i * 7 % 251) as u8).collect();
        client.send(p, frame(3, 9, big.clone())).unwrap();
        let got = hs.wait_frames(1);
        assert_eq!(got[0].1.segments[0].as_ref(), &big[..], "{mode:?}");
        client.shutdown();
        server.shutdown();
    }
}

#[test]
fn concurrent_senders_never_interleave_frames() {
    for mode in modes() {
        let t = Tcp::new(mode, Limits::default());
        let hs = Arc::new(Rec::default());
        let server = t.bind("127.0.0.1:0", hs.clone()).unwrap();
        let client = t.bind("127.0.0.1:0", Arc::new(Rec::default())).unwrap();
        let p = client.connect(&server.local_addr()).unwrap();
        let (threads, per) = (4u64, 300u64);
        std::thread::scope(|s| {
            for th in 0..threads {
                let client = client.clone();
                s.spawn(move || {
                    for i in 0..per {
                        let len = ((i * 131 + th * 7) % 70_000) as usize;
                        client.send(p, frame(3, th << 32 | i, vec![th as u8; len])).unwrap();
                    }
                });
            }
        });
        let got = hs.wait_frames((threads * per) as usize);
        let mut next = vec![0u64; threads as usize];
        for (_, f) in got {
            let (th, i) = (f.id >> 32, f.id & 0xffff_ffff);
            assert_eq!(i, next[th as usize], "{mode:?}: frames of one sender out of order");
            next[th as usize] += 1;
            assert!(f.segments[0].iter().all(|&b| b == th as u8));
        }
        client.shutdown();
        server.shutdown();
    }
}

#[test]
fn garbage_closes_only_that_connection() {
    for mode in modes() {
        let t = Tcp::new(mode, Limits { max_frame: 1 << 20, ..Limits::default() });
        let hs = Arc::new(Rec::default());
        let server = t.bind("127.0.0.1:0", hs.clone()).unwrap();
        let addr = server.local_addr();
        let good = t.bind("127.0.0.1:0", Arc::new(Rec::default())).unwrap();
        let p = good.connect(&addr).unwrap();
        // Pure garbage, a huge length prefix, and a truncated frame.
        let mut huge: frame::FrameHeader = bytemuck::pod_read_unaligned(&frame::encode(&frame(1, 1, vec![]))[..32]);
        huge.body_len = u64::MAX / 2;
        let cases: Vec<Vec<u8>> = vec![
            b"GET / HTTP/1.1\r\n\r\n".repeat(10),
            bytemuck::bytes_of(&huge).to_vec(),
            frame::encode(&frame(1, 1, vec![5; 100]))[..50].to_vec(),
        ];
        // Also a frame just over the size limit. Every case comes from a
        // peer that authenticated, so it reaches the frame decoder.
        // Only its header: refused from that alone, and nothing is left
        // unread to turn the server's close into a reset that could eat the
        // explanation.
        let over = frame::encode(&frame(3, 1, vec![1; 1 << 20]))[..32].to_vec();
        let cases = cases.into_iter().chain([over]);
        for (i, bytes) in cases.enumerate() {
            let mut raw = std::net::TcpStream::connect(&addr).unwrap();
            auth::client(&raw, &token_of(&t)).unwrap();
            // The server may close before taking it all (a refused header).
            let _ = raw.write_all(&bytes);
            let _ = raw.shutdown(std::net::Shutdown::Write);
            raw.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut sink = Vec::new();
            // The server closes (after an explanation, for a corrupt stream).
            let _ = raw.read_to_end(&mut sink);
            if i == 1 || i == 3 {
                let mut buf = bytes::BytesMut::from(&sink[..]);
                let why = frame::Decoder::default().decode(&mut buf).unwrap().expect("an explanation");
                assert_eq!(why.kind, frame::KIND_STREAM_REFUSED);
                let text = String::from_utf8_lossy(&why.segments[0]).into_owned();
                assert!(text.contains("exceeds the limit of 1048576"), "{mode:?}: {text}");
            }
        }
        good.send(p, frame(1, 77, vec![1, 2, 3])).unwrap();
        let got = hs.wait_frames(1);
        assert_eq!(got[0].1.id, 77, "{mode:?}: the good client must still be served");
        good.shutdown();
        server.shutdown();
    }
}

#[test]
fn sending_to_a_closed_peer_is_an_error_and_disconnect_is_reported() {
    for mode in modes() {
        let t = Tcp::new(mode, Limits::default());
        let hc = Arc::new(Rec::default());
        let server = t.bind("127.0.0.1:0", Arc::new(Rec::default())).unwrap();
        let client = t.bind("127.0.0.1:0", hc.clone()).unwrap();
        let p = client.connect(&server.local_addr()).unwrap();
        server.shutdown();
        hc.wait_gone(1);
        assert!(client.send(p, frame(3, 1, vec![1])).is_err());
        assert!(client.connect(&server.local_addr()).is_err());
        client.shutdown();
    }
}

#[test]
fn oversized_frames_are_refused_by_the_sender() {
    let t = Tcp::new(IoMode::Std, Limits { max_frame: 4096, ..Limits::default() });
    let server = t.bind("127.0.0.1:0", Arc::new(Rec::default())).unwrap();
    let client = t.bind("127.0.0.1:0", Arc::new(Rec::default())).unwrap();
    let p = client.connect(&server.local_addr()).unwrap();
    assert!(matches!(client.send(p, frame(3, 1, vec![0; 8192])), Err(Error::LimitExceeded(_))));
    client.shutdown();
    server.shutdown();
}

#[test]
fn a_wildcard_bind_advertises_the_address_peers_reach() {
    let t = Tcp::new(IoMode::Std, Limits::default());
    let hs = Arc::new(Rec::default());
    let server = t.bind("127.0.0.1:0", hs.clone()).unwrap();
    let client = t.bind("0.0.0.0:0", Arc::new(Rec::default())).unwrap();
    let p = client.connect(&server.local_addr()).unwrap();
    let adv = client.advertised_addr(p);
    assert!(adv.starts_with("127.0.0.1:"), "{adv}");
    assert_ne!(adv, client.local_addr());
    client.shutdown();
    server.shutdown();
}

fn token_of(t: &Tcp) -> auth::Token {
    match &t.auth {
        Auth::Token(tok) => tok.clone(),
        Auth::Insecure => panic!("an authenticating transport"),
    }
}

#[test]
fn peers_without_the_job_token_are_refused_and_the_job_keeps_being_served() {
    for mode in modes() {
        let t = Tcp::new(mode, Limits::default());
        let hs = Arc::new(Rec::default());
        let server = t.bind("127.0.0.1:0", hs.clone()).unwrap();
        let addr = server.local_addr();
        // Another job's token: refused, and the client says why.
        let other = Tcp::new(mode, Limits::default()).bind("127.0.0.1:0", Arc::new(Rec::default())).unwrap();
        let e = other.connect(&addr).unwrap_err();
        assert!(matches!(e, Error::Unauthenticated { .. }), "{mode:?}: {e}");
        assert!(e.to_string().contains("does not know the job token"), "{e}");
        // No token at all: an --insecure endpoint, and raw frames.
        let insecure = Tcp::new(mode, Limits::default()).with_auth(Auth::Insecure);
        let ins = insecure.bind("127.0.0.1:0", Arc::new(Rec::default())).unwrap();
        if let Ok(p) = ins.connect(&addr) {
            let _ = ins.send(p, frame(1, 66, vec![6]));
        }
        let mut raw = std::net::TcpStream::connect(&addr).unwrap();
        let _ = raw.write_all(&frame::encode(&frame(1, 67, vec![7; 100])));
        raw.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut sink = Vec::new();
        let _ = raw.read_to_end(&mut sink);
        // A client that answers the challenge with a made-up proof.
        let mut forger = std::net::TcpStream::connect(&addr).unwrap();
        forger.write_all(b"PSAUTH01").unwrap();
        forger.write_all(&[9u8; 32]).unwrap();
        let mut reply = [0u8; 72];
        forger.read_exact(&mut reply).unwrap();
        forger.write_all(&[0u8; 32]).unwrap();
        let mut verdict = [0u8; 8];
        forger.read_exact(&mut verdict).unwrap();
        assert_eq!(&verdict, b"PSREFUSE");
        // Nothing of theirs reached the handler; the job's own client is served.
        let good = t.bind("127.0.0.1:0", Arc::new(Rec::default())).unwrap();
        let p = good.connect(&addr).unwrap();
        good.send(p, frame(1, 77, vec![1, 2, 3])).unwrap();
        let got = hs.wait_frames(1);
        assert_eq!(got.len(), 1, "{mode:?}: only the job's own frame arrives");
        assert_eq!(got[0].1.id, 77);
        let stats = server.stats();
        assert!(stats.auth_failures >= 3, "{mode:?}: {stats:?}");
        for ep in [other, ins, good, server] {
            ep.shutdown();
        }
    }
}

#[test]
fn a_silent_peer_does_not_hold_up_anyone_else() {
    for mode in modes() {
        let t = Tcp::new(mode, Limits::default());
        let hs = Arc::new(Rec::default());
        let server = t.bind("127.0.0.1:0", hs.clone()).unwrap();
        let addr = server.local_addr();
        // Peers that connect and say nothing, or half a challenge.
        let mut silent: Vec<std::net::TcpStream> =
            (0..20).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
        silent[0].write_all(b"PSAUTH").unwrap();
        let good = t.bind("127.0.0.1:0", Arc::new(Rec::default())).unwrap();
        let p = good.connect(&addr).unwrap();
        good.send(p, frame(1, 5, vec![5])).unwrap();
        assert_eq!(hs.wait_frames(1)[0].1.id, 5);
        // Served while the silent peers still hold their handshakes open (they
        // have 10 s each; serially that would have been 200 s).
        let open = silent
            .iter()
            .filter(|s| {
                s.set_nonblocking(true).unwrap();
                let mut b = [0u8; 80];
                matches!((&**s).read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                    || matches!((&**s).read(&mut b), Ok(n) if n > 0)
            })
            .count();
        assert!(open > 0, "{mode:?}: every silent peer was already dropped");
        // Shutting down does not wait for their deadlines either.
        good.shutdown();
        server.shutdown();
        drop(silent);
    }
}

#[test]
fn connections_over_the_limit_are_refused_with_a_clear_error() {
    for mode in modes() {
        let t = Tcp::new(mode, Limits { max_connections: 2, ..Limits::default() });
        let hs = Arc::new(Rec::default());
        let server = t.bind("127.0.0.1:0", hs.clone()).unwrap();
        let addr = server.local_addr();
        let clients: Vec<_> = (0..3).map(|_| t.bind("127.0.0.1:0", Arc::new(Rec::default())).unwrap()).collect();
        let p0 = clients[0].connect(&addr).unwrap();
        let p1 = clients[1].connect(&addr).unwrap();
        let e = clients[2].connect(&addr).unwrap_err().to_string();
        assert!(e.contains("limit of 2 connections"), "{mode:?}: {e}");
        // The two admitted ones are served meanwhile.
        clients[0].send(p0, frame(1, 1, vec![1])).unwrap();
        clients[1].send(p1, frame(1, 2, vec![2])).unwrap();
        hs.wait_frames(2);
        // A slot freed is a slot available again.
        clients[0].disconnect(p0);
        hs.wait_gone(1);
        let deadline = Instant::now() + Duration::from_secs(30);
        let p2 = loop {
            match clients[2].connect(&addr) {
                Ok(p) => break p,
                Err(e) => assert!(Instant::now() < deadline, "{mode:?}: no slot after a disconnect: {e}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        clients[2].send(p2, frame(1, 3, vec![3])).unwrap();
        assert_eq!(hs.wait_frames(3)[2].1.id, 3);
        assert!(server.stats().refused >= 1);
        for c in clients {
            c.shutdown();
        }
        server.shutdown();
    }
}

#[test]
fn a_peer_that_does_not_read_its_replies_is_not_read_from_either() {
    for mode in modes() {
        let limits = Limits { max_queued_bytes: 4 << 20, ..Limits::default() };
        let t = Tcp::new(mode, limits);
        let hs = Arc::new(Rec::default());
        let server = t.bind("127.0.0.1:0", hs.clone()).unwrap();
        // An authenticated client that sends echo requests of 1 MiB and
        // never reads the echoes.
        let raw = std::net::TcpStream::connect(server.local_addr()).unwrap();
        auth::client(&raw, &token_of(&t)).unwrap();
        raw.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let request = frame::encode(&frame(1, 1, vec![7; 1 << 20]));
        let (mut sent, max) = (0usize, 512usize);
        while sent < max {
            match (&raw).write_all(&request) {
                Ok(()) => sent += 1,
                Err(_) => break, // blocked: the server stopped reading
            }
        }
        assert!(sent < max, "{mode:?}: the server read {sent} MiB of requests whose replies nobody read");
        // Others are still served.
        let good = t.bind("127.0.0.1:0", Arc::new(Rec::default())).unwrap();
        let p = good.connect(&server.local_addr()).unwrap();
        good.send(p, frame(3, 99, vec![1])).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !hs.got.lock().iter().any(|(_, f)| f.id == 99) {
            assert!(Instant::now() < deadline, "{mode:?}: a good client was not served");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(raw);
        good.shutdown();
        server.shutdown();
    }
}
