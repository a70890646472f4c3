//! torn_read: writers hammer slots while readers copy them the way one-sided
//! transports do (word by word, in any order, with no fence) and validate
//! through the store's one validation path. No torn value may ever be
//! accepted. Run it alone with `cargo test --release torn_read`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pserver::store::shard::KeyRun;
use pserver::store::slot::{self, SlotLayout, Torn};
use pserver::store::{KeyRange, Region, Shard, ShardConfig};
use pserver::updater::Rules;
use pserver::{Init, Storage, UpdaterSpec};

/// The value bits of coordinate `i` in the `n`-th state a writer publishes:
/// a normal float in [1, 2) whose mantissa depends on both, so a copy mixing
/// two states shows up as a coordinate that does not match the version.
fn pattern(n: u32, i: usize) -> f32 {
    let m = n.wrapping_mul(2_654_435_761) ^ (i as u32).wrapping_mul(0x9E37_79B9);
    f32::from_bits(0x3f80_0000 | (m & 0x007f_ffff))
}

/// How a reader copies a slot: in order, in reverse, or slowly (spinning
/// between words so that writes land mid-copy).
#[derive(Clone, Copy)]
enum Copy {
    Forward,
    Reverse,
    Slow,
}

fn copy(src: &[std::sync::atomic::AtomicU64], dst: &mut [u64], how: Copy) {
    match how {
        Copy::Forward => slot::copy_words(src, dst),
        Copy::Reverse => {
            for i in (0..src.len()).rev() {
                dst[i] = src[i].load(Ordering::Relaxed);
            }
        }
        Copy::Slow => {
            for i in 0..src.len() {
                dst[i] = src[i].load(Ordering::Relaxed);
                for _ in 0..20 {
                    std::hint::spin_loop();
                }
            }
        }
    }
}

struct Target {
    chunks: Vec<Arc<Region>>,
    layout: SlotLayout,
    slots: Vec<(usize, usize)>,
}

#[derive(Default)]
struct Tally {
    accepted: AtomicU64,
    rejected: AtomicU64,
    wrong: AtomicU64,
    writes: AtomicU64,
}

fn make_shard(dim: u32, keys: u64) -> Shard {
    let rule = Rules::default().resolve(&UpdaterSpec::Assign).unwrap();
    let cfg = ShardConfig {
        table: 1,
        range: KeyRange::new(0, keys),
        dim,
        storage: Storage::Dense,
        init: Init::Zeros,
        workers: 1,
        files: None,
        waits_for_lost: false,
    };
    Shard::new(cfg, rule).unwrap()
}

#[test]
fn torn_read_no_torn_value_is_ever_accepted() {
    let min_run = Duration::from_secs(2);
    let give_up = Duration::from_secs(30);
    // Two shards, each with its single writer: a wide slot (many words, the
    // case the check exists for) and scalar slots (self-validating words).
    let specs = [(64u32, 4u64), (1, 64)];
    let stop = Arc::new(AtomicBool::new(false));
    let tallies: Vec<Arc<Tally>> = specs.iter().map(|_| Arc::new(Tally::default())).collect();
    let mut targets = Vec::new();
    let mut writers = Vec::new();
    for (&(dim, keys), tally) in specs.iter().zip(&tallies) {
        let mut shard = make_shard(dim, keys);
        targets.push(Arc::new(Target {
            chunks: shard.regions().1.to_vec(),
            layout: shard.layout(),
            slots: (0..keys).map(|k| shard.slot_offset(k).unwrap()).collect(),
        }));
        let (stop, tally) = (stop.clone(), tally.clone());
        writers.push(std::thread::spawn(move || {
            let mut vals = vec![0.0f32; dim as usize];
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                n = n.wrapping_add(1);
                for k in 0..keys {
                    // Every slot's n-th write carries pattern(n, .), at version 2n.
                    for (i, v) in vals.iter_mut().enumerate() {
                        *v = pattern(n, i);
                    }
                    shard.push(KeyRun::List(&[k]), &vals).unwrap();
                }
                tally.writes.fetch_add(keys, Ordering::Relaxed);
            }
        }));
    }
    let mut readers = Vec::new();
    for (r, how) in [Copy::Forward, Copy::Reverse, Copy::Slow].into_iter().enumerate() {
        for (target, tally) in targets.iter().zip(&tallies) {
            let (stop, target, tally) = (stop.clone(), target.clone(), tally.clone());
            readers.push(std::thread::spawn(move || {
                let l = target.layout;
                let mut img = vec![0u64; l.words()];
                let mut out = vec![0.0f32; l.dim()];
                let mut i = r;
                while !stop.load(Ordering::Relaxed) {
                    let (chunk, off) = target.slots[i % target.slots.len()];
                    i += 1;
                    copy(&target.chunks[chunk].words()[off..off + l.words()], &mut img, how);
                    match slot::validate(l, &img, &mut out) {
                        Ok(version) => {
                            tally.accepted.fetch_add(1, Ordering::Relaxed);
                            let n = version / 2;
                            let consistent = if version == 0 {
                                out.iter().all(|&v| v == 0.0)
                            } else {
                                out.iter().enumerate().all(|(c, v)| v.to_bits() == pattern(n, c).to_bits())
                            };
                            if !consistent {
                                tally.wrong.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(Torn) => {
                            tally.rejected.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
    }
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let elapsed = start.elapsed();
        let wide = &tallies[0];
        let enough = tallies
            .iter()
            .all(|t| t.writes.load(Ordering::Relaxed) > 1000 && t.accepted.load(Ordering::Relaxed) > 1000)
            && wide.rejected.load(Ordering::Relaxed) > 0;
        if (elapsed >= min_run && enough) || elapsed >= give_up {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for h in writers.into_iter().chain(readers) {
        h.join().unwrap();
    }
    for ((dim, _), t) in specs.iter().zip(&tallies) {
        let (w, a, r, bad) = (
            t.writes.load(Ordering::Relaxed),
            t.accepted.load(Ordering::Relaxed),
            t.rejected.load(Ordering::Relaxed),
            t.wrong.load(Ordering::Relaxed),
        );
        println!("dim {dim}: {w} writes, {a} reads accepted, {r} torn copies rejected, {bad} torn values accepted");
        assert_eq!(bad, 0, "dim {dim}: a torn value was accepted");
        assert!(w > 1000, "dim {dim}: writers made no progress ({w})");
        assert!(a > 1000, "dim {dim}: readers made no progress ({a})");
    }
    assert!(
        tallies[0].rejected.load(Ordering::Relaxed) > 0,
        "no read ever raced a write of a wide slot: the test did not exercise contention"
    );
}

/// A copy stitched from two published states of one slot, as an unordered
/// one-sided read can return, is refused by the same validation.
#[test]
fn torn_read_a_deliberately_torn_copy_is_rejected() {
    let mut shard = make_shard(64, 1);
    let l = shard.layout();
    let (chunk, off) = shard.slot_offset(0).unwrap();
    let chunks = shard.regions().1.to_vec();
    let image = |chunks: &[Arc<Region>]| {
        let mut img = vec![0u64; l.words()];
        slot::copy_words(&chunks[chunk].words()[off..off + l.words()], &mut img);
        img
    };
    shard.push(KeyRun::List(&[0]), &(0..64).map(|i| pattern(1, i)).collect::<Vec<_>>()).unwrap();
    let a = image(&chunks);
    shard.push(KeyRun::List(&[0]), &(0..64).map(|i| pattern(2, i)).collect::<Vec<_>>()).unwrap();
    let b = image(&chunks);
    let mut out = vec![0.0; 64];
    assert_eq!(slot::validate(l, &a, &mut out), Ok(2));
    assert_eq!(slot::validate(l, &b, &mut out), Ok(4));
    // Old header with some new values, new header with some old values, and
    // a header caught mid-write.
    for split in [1, 2, 10, l.words() - 1] {
        let mut t1 = a.clone();
        t1[split..].copy_from_slice(&b[split..]);
        assert_eq!(slot::validate(l, &t1, &mut out), Err(Torn), "old header, new tail from word {split}");
        let mut t2 = b.clone();
        t2[split..].copy_from_slice(&a[split..]);
        assert_eq!(slot::validate(l, &t2, &mut out), Err(Torn), "new header, old tail from word {split}");
    }
    let mut mid = b.clone();
    mid[0] |= 1;
    assert_eq!(slot::validate(l, &mid, &mut out), Err(Torn), "odd version");
}

/// The reader half of the shared-memory test, run in a child process: maps
/// the shard's slot file read-only and validates slots for the given time.
fn shm_reader(path: &str, dim: u32, keys: usize, seconds: f64) -> (u64, u64, u64) {
    let l = SlotLayout::new(dim).unwrap();
    let m = pserver::transport::shm::Mapped::open(std::path::Path::new(path)).unwrap();
    let (mut accepted, mut rejected, mut wrong) = (0u64, 0u64, 0u64);
    let mut out = vec![0.0f32; l.dim()];
    let mut torn = Vec::new();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut i = 0;
    while Instant::now() < deadline {
        let k = i % keys;
        i += 1;
        torn.clear();
        slot::read_run(l, m.words_at(k * l.words(), l.words()).unwrap(), &mut out, &mut torn);
        if !torn.is_empty() {
            rejected += 1;
            continue;
        }
        accepted += 1;
        // The value says which write it came from; all coordinates agree.
        let ok = out.iter().all(|v| v.to_bits() == out[0].to_bits());
        wrong += u64::from(!ok);
    }
    (accepted, rejected, wrong)
}

#[test]
fn torn_read_over_shared_memory_between_processes() {
    if let Ok(spec) = std::env::var("PSERVER_TORN_CHILD") {
        // Child: "path dim keys seconds".
        let p: Vec<&str> = spec.split(' ').collect();
        let (a, r, w) = shm_reader(p[0], p[1].parse().unwrap(), p[2].parse().unwrap(), p[3].parse().unwrap());
        println!("CHILD accepted={a} rejected={r} wrong={w}");
        return;
    }
    if !pserver::transport::shm::available() {
        eprintln!("SKIPPED: no usable shared-memory directory");
        return;
    }
    let ns = std::sync::Arc::new(pserver::transport::shm::Namespace::new().unwrap());
    let (dim, keys) = (32u32, 4u64);
    let rule = Rules::default().resolve(&UpdaterSpec::Assign).unwrap();
    let cfg = ShardConfig {
        table: 1,
        range: KeyRange::new(0, keys),
        dim,
        storage: Storage::Dense,
        init: Init::Zeros,
        workers: 1,
        files: Some(ns),
        waits_for_lost: false,
    };
    let mut shard = Shard::new(cfg, rule).unwrap();
    let path = shard.regions().1[0].path().unwrap().display().to_string();
    let seconds = 2.5;
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["torn_read_over_shared_memory_between_processes", "--exact", "--nocapture"])
        .env("PSERVER_TORN_CHILD", format!("{path} {dim} {keys} {seconds}"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Writer: every coordinate of a slot carries the same bits per write, so
    // a copy mixing two writes shows up.
    let deadline = Instant::now() + Duration::from_secs_f64(seconds + 1.0);
    let mut writes = 0u64;
    let mut vals = vec![0.0f32; dim as usize];
    while Instant::now() < deadline {
        for k in 0..keys {
            vals.fill(pattern(writes as u32, 0));
            shard.push(KeyRun::List(&[k]), &vals).unwrap();
            writes += 1;
        }
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line =
        text.lines().find(|l| l.starts_with("CHILD ")).unwrap_or_else(|| panic!("no report from the reader: {text}"));
    let num = |k: &str| line.split(' ').find_map(|f| f.strip_prefix(k)).unwrap().parse::<u64>().unwrap();
    let (a, r, w) = (num("accepted="), num("rejected="), num("wrong="));
    println!(
        "shared memory across processes: {writes} writes, {a} reads accepted, {r} torn copies rejected, {w} torn values accepted"
    );
    assert_eq!(w, 0, "a torn value was accepted");
    assert!(writes > 1000 && a > 1000, "no progress: {writes} writes, {a} reads");
}

/// The same property over RDMA READ: writers hammer the slots of shards in
/// registered memory while a link reads them through the device (soft-RoCE
/// splits a READ response into MTU-sized packets copied at different times,
/// so wide slots do tear) and validates every copy with `slot::read_run`.
/// Needs a device: inside `tools/rxe-vm`, else SKIPPED.
#[test]
fn torn_read_over_rdma_read_no_torn_value_is_ever_accepted() {
    use pserver::transport::Access;
    use pserver::transport::frame::Limits;
    use pserver::transport::rdma::{Inbox, Link};
    let Some(dev) = common::rdma_device_or_skip() else { return };
    let inbox = Inbox::start(dev.clone(), Limits::default(), Box::new(|_, _| {})).unwrap();
    // Soft-RoCE in the emulated VM now and then loses a READ for good (the
    // queue pair stays ready, no completion ever comes; the link fails it
    // after its deadline). What this test checks is the validation of the
    // copies, not the device: a failed link is replaced, up to 3 times,
    // and says so.
    let connect = |id: u64| {
        let (link, info) = Link::new(&dev, "torn-read server").unwrap();
        let acc = inbox.accept(id, &info, 1 << 16).unwrap();
        link.establish(&acc.info, acc.ring, acc.ring_ctl).unwrap();
        link
    };
    let mut link = connect(1);
    let mut relinks = 0u64;
    // A wide slot (about 4 KiB, several packets) and scalar slots.
    let specs = [(1000u32, 3u64), (1, 512)];
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    let mut targets = Vec::new();
    let writes: Vec<Arc<AtomicU64>> = specs.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
    for (&(dim, keys), count) in specs.iter().zip(&writes) {
        let mut shard = make_shard(dim, keys);
        let (hdr, chunks) = shard.regions();
        let h = dev.register(hdr.clone(), Access::READ).unwrap();
        let s = dev.register(chunks[0].clone(), Access::READ).unwrap();
        targets.push((shard.layout(), keys, h, s));
        let (stop, count) = (stop.clone(), count.clone());
        writers.push(std::thread::spawn(move || {
            let mut vals = vec![0.0f32; dim as usize];
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                n = n.wrapping_add(1);
                for k in 0..keys {
                    for (i, v) in vals.iter_mut().enumerate() {
                        *v = pattern(n, i);
                    }
                    shard.push(KeyRun::List(&[k]), &vals).unwrap();
                }
                count.fetch_add(keys, Ordering::Relaxed);
                // Soft-RoCE runs in the (emulated, 2-CPU) VM's kernel: two
                // writers spinning without a pause starve it, and a READ's
                // completion can then take longer than the link's deadline.
                if n.is_multiple_of(16) {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        }));
    }
    let start = Instant::now();
    let mut tally = vec![(0u64, 0u64, 0u64); specs.len()]; // accepted, torn, wrong
    let mut torn = Vec::new();
    let mut i = 0usize;
    loop {
        for (t, (layout, keys, h, s)) in targets.iter().enumerate() {
            let l = *layout;
            // Wide: one slot per READ; scalar: the whole run at once.
            let (first, count) = if l.dim() > 1 { ((i as u64 % keys) as usize, 1) } else { (0, *keys as usize) };
            let mut out = vec![0.0f32; count * l.dim()];
            let read = link.read(
                Some((&h.desc(), pserver::store::shard::HEADER_MIN_PROGRESS)),
                &s.desc(),
                first * l.words(),
                count * l.words(),
                |_, src| {
                    torn.clear();
                    slot::read_run(l, src, &mut out, &mut torn);
                    // Versions of the copies, to check the values against.
                    (0..count).map(|j| src[j * l.words()].load(Ordering::Relaxed) as u32).collect::<Vec<u32>>()
                },
            );
            let versions = match read {
                Ok(v) => v,
                Err(e) if relinks < 3 => {
                    relinks += 1;
                    println!("the link failed ({e}); a new one (replacement {relinks} of at most 3)");
                    link = connect(1 + relinks);
                    continue;
                }
                Err(e) => panic!("the link failed a 4th time: {e}"),
            };
            tally[t].1 += torn.len() as u64;
            for (j, (vals, &version)) in out.chunks_exact(l.dim()).zip(&versions).enumerate() {
                if torn.contains(&j) {
                    continue;
                }
                tally[t].0 += 1;
                let n = version / 2;
                let ok = if version == 0 {
                    vals.iter().all(|&v| v == 0.0)
                } else {
                    vals.iter().enumerate().all(|(c, v)| v.to_bits() == pattern(n, c).to_bits())
                };
                tally[t].2 += u64::from(!ok);
            }
        }
        i += 1;
        let elapsed = start.elapsed();
        let enough = tally.iter().all(|t| t.0 > 300) && tally[0].1 > 0 && elapsed > Duration::from_secs(2);
        if enough || elapsed > Duration::from_secs(40) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    for ((dim, _), (t, w)) in specs.iter().zip(tally.iter().zip(&writes)) {
        let w = w.load(Ordering::Relaxed);
        println!(
            "rdma {}, dim {dim}: {w} writes, {} copies accepted, {} torn copies rejected, {} torn values accepted",
            dev.name(),
            t.0,
            t.1,
            t.2
        );
        assert!(t.0 > 300 && w > 1000, "dim {dim}: no progress ({} reads, {w} writes)", t.0);
        if *dim == 1 && !dev.word_atomic() {
            // A scalar slot is one word and trusts the reader to copy it
            // whole. Software RDMA does not (its memcpy may copy bytes at
            // different times), so pulls of scalar tables over such a
            // device are served two-sided; what this measured is why.
            println!(
                "  {} does not copy 8-byte words atomically: scalar tables are not read one-sided over it",
                dev.name()
            );
            continue;
        }
        assert_eq!(t.2, 0, "dim {dim}: a torn value was accepted");
    }
    assert!(link.stats().bytes_read.load(Ordering::Relaxed) > 0, "nothing was read by RDMA");
    assert!(tally[0].1 > 0, "no RDMA READ of a wide slot raced a write: the test did not exercise tearing");
}
