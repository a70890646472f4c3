use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use super::*;
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
            net.send(from, reply).unwrap();
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
        for bytes in cases {
            let mut raw = std::net::TcpStream::connect(&addr).unwrap();
            raw.write_all(&bytes).unwrap();
            raw.shutdown(std::net::Shutdown::Write).unwrap();
            raw.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut sink = Vec::new();
            // The server closes (after an explanation, for a corrupt stream).
            let _ = raw.read_to_end(&mut sink);
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
