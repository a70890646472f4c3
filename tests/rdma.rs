//! The RDMA transport below the KV API: a worker link and a server inbox in
//! one process, connected through the device (soft-RoCE in the VM of
//! `tools/rxe-vm`). Without a usable device every test prints `SKIPPED:
//! <reason>` and returns; `.ci/run` runs this binary inside the VM, where
//! the tests assert that traffic really went through RDMA.
//!
//! `tools/rxe-vm -- target/release/deps/rdma-<hash> --test-threads 1`

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

mod common;

use bytes::Bytes;
use parking_lot::Mutex;
use pserver::store::Region;
use pserver::transport::frame::{Frame, Limits};
use pserver::transport::rdma::{ConnInfo, Inbox, Link, Rdma};
use pserver::transport::{Access, RegionDesc};

type Got = Arc<Mutex<Vec<Result<Frame, String>>>>;

/// An inbox whose frames land in a vector, and a link connected to it.
fn pair(dev: &Arc<Rdma>, ring: usize) -> (Inbox, Link, Got) {
    let got: Got = Arc::default();
    let sink = got.clone();
    let inbox = Inbox::start(
        dev.clone(),
        Limits::default(),
        Box::new(move |_token, f| sink.lock().push(f.map_err(|e| e.to_string()))),
    )
    .unwrap();
    let (link, info) = Link::new(dev, "test server").unwrap();
    let wire = ConnInfo::from_bytes(&info.to_bytes()).unwrap();
    let acc = inbox.accept(7, &wire, ring).unwrap();
    link.establish(&acc.info, acc.ring, acc.ring_ctl).unwrap();
    (inbox, link, got)
}

fn wait_for(got: &Got, n: usize) -> Vec<Result<Frame, String>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.lock().len() < n {
        assert!(Instant::now() < deadline, "only {} of {n} frames arrived", got.lock().len());
        std::thread::sleep(Duration::from_millis(2));
    }
    std::mem::take(&mut *got.lock())
}

#[test]
fn rdma_read_returns_the_registered_words_and_the_progress_word_first() {
    let Some(dev) = common::rdma_device_or_skip() else { return };
    println!("{}", dev.describe());
    let (_inbox, link, _) = pair(&dev, 1 << 16);
    let header = Arc::new(Region::anon(64).unwrap());
    let slots = Arc::new(Region::anon(1 << 20).unwrap());
    for (i, w) in slots.words().iter().enumerate() {
        w.store(i as u64 * 3 + 1, Ordering::Relaxed);
    }
    header.words()[4].store(42, Ordering::Release);
    let h = dev.register(header.clone(), Access::READ).unwrap();
    let s = dev.register(slots.clone(), Access::READ).unwrap();
    // Several pieces (the pull buffer is read 256 KiB at a time).
    let words = 100_000;
    let sum = link
        .read(Some((&h.desc(), 4)), &s.desc(), 1000, words, |progress, w| {
            assert_eq!(progress, 42);
            assert_eq!(w.len(), words);
            w.iter().enumerate().all(|(i, x)| x.load(Ordering::Relaxed) == (1000 + i as u64) * 3 + 1)
        })
        .unwrap();
    assert!(sum, "the words read differ from the registered ones");
    assert!(link.stats().bytes_read.load(Ordering::Relaxed) >= words as u64 * 8);
    // Outside the region, or without the right: refused before posting.
    assert!(link.read(Some((&h.desc(), 4)), &s.desc(), (1 << 17) - 10, 20, |_, _| ()).is_err());
    let no_read = RegionDesc { access: Access::WRITE.bits(), ..s.desc() };
    assert!(link.read(Some((&h.desc(), 4)), &no_read, 0, 1, |_, _| ()).is_err());
}

#[test]
fn frames_written_into_the_ring_arrive_in_order_and_intact_across_laps() {
    let Some(dev) = common::rdma_device_or_skip() else { return };
    let (inbox, link, got) = pair(&dev, 1 << 16);
    let n = 600u64; // more than the receive depth and several laps of the ring
    let mut sent = Vec::new();
    for id in 0..n {
        let f =
            Frame::new(16, id, Bytes::from(vec![id as u8; 8]))
                .with_segment(Bytes::from(vec![id as u8; (id as usize * 37) % 5000]));
        assert!(link.send(&f).unwrap(), "frame {id} fits the ring");
        sent.push(f);
    }
    let big = Frame::new(16, 1, Bytes::new()).with_segment(Bytes::from(vec![0u8; 1 << 17]));
    assert!(!link.send(&big).unwrap(), "a frame larger than the ring is refused, not split");
    let frames = wait_for(&got, n as usize);
    for (i, (g, s)) in frames.iter().zip(&sent).enumerate() {
        assert_eq!(g.as_ref().unwrap(), s, "frame {i}");
    }
    assert_eq!(link.stats().frames.load(Ordering::Relaxed), n);
    assert_eq!(inbox.links(), 1);
}

#[test]
fn a_queue_pair_error_fails_operations_instead_of_hanging() {
    let Some(dev) = common::rdma_device_or_skip() else { return };
    let (inbox, link, _got) = pair(&dev, 1 << 16);
    let header = Arc::new(Region::anon(64).unwrap());
    let h = dev.register(header, Access::READ).unwrap();
    link.read(Some((&h.desc(), 0)), &h.desc(), 0, 8, |_, _| ()).unwrap();
    // The server side goes away: its queue pair stops answering.
    inbox.close(7);
    let t0 = Instant::now();
    let r = link.read(Some((&h.desc(), 0)), &h.desc(), 0, 8, |_, _| ());
    let e = r.expect_err("a read from a dead peer must fail").to_string();
    println!("failed after {:?}: {e}", t0.elapsed());
    assert!(e.contains("RDMA"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(90));
    // Later operations fail at once with the same cause.
    let t1 = Instant::now();
    assert!(link.send(&Frame::new(16, 1, Bytes::new())).is_err());
    assert!(t1.elapsed() < Duration::from_secs(1));
    assert!(link.failure().is_some());
}
