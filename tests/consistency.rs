//! Consistency models (DESIGN section 3), over inproc and TCP. Workers are
//! slowed at random; every pull records the shard progress it was served at
//! and the values it saw, and the tests check the invariant: an operation
//! issued at clock t completes only when every worker's pushes of clocks
//! < t - tau have been applied. No assertion depends on timing.

mod common;
use common::via::transports;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pserver::{Consistency, TableSpec, job};

/// Sets a flag when dropped, so a panicking worker still releases the
/// others (a failing test must fail, not hang).
struct SetOnDrop(Arc<AtomicBool>);
impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A deterministic pseudo-random sleep in 0..max_ms, skewed by rank.
fn nap(rank: u32, t: u32, max_ms: u64) {
    let h = (u64::from(rank) * 0x9E37_79B9 + u64::from(t) * 0x85EB_CA6B).wrapping_mul(0xC2B2_AE35) >> 17;
    let ms = (h % max_ms) * u64::from(rank + 1) / 2;
    std::thread::sleep(Duration::from_millis(ms));
}

#[test]
fn staleness_never_exceeds_tau() {
    let (workers, clocks, keys) = (3u32, 10u32, 64u64);
    for (name, t) in transports() {
        for (tau, c) in
            [(0, Consistency::Sequential), (1, Consistency::BoundedDelay(1)), (3, Consistency::BoundedDelay(3))]
        {
            let cfg = t.job().servers(2).workers(workers);
            let shm_pulls = job::run(cfg, |w| {
                w.create_table(TableSpec::dense(1, keys, 1).consistency(c))?;
                w.barrier()?;
                let all: Vec<u64> = (0..keys).collect();
                for clock in 0..clocks {
                    nap(w.rank(), clock, 8);
                    let p = w.pull(1, &all)?;
                    assert_eq!(p.clock(), clock);
                    let vals = p.wait()?;
                    // Pushes of clocks < clock - tau from every worker are in.
                    let need = u64::from(clock.saturating_sub(tau));
                    let min_seen = vals.iter().cloned().fold(f32::INFINITY, f32::min);
                    assert!(
                        min_seen >= (need * u64::from(workers)) as f32,
                        "{name} tau {tau}: worker {} at clock {clock} saw {min_seen}, needed >= {}",
                        w.rank(),
                        need * u64::from(workers)
                    );
                    w.push(1, &all, &vec![1.0; keys as usize])?;
                    nap(w.rank(), clock + 100, 5);
                    w.clock()?;
                }
                Ok(w.traffic().shm_pulls)
            })
            .unwrap();
            if name == "shm" {
                let one_sided: u64 = shm_pulls.iter().sum();
                assert!(one_sided > 0, "tau {tau}: no pull was served from shared memory");
            }
        }
    }
}

#[test]
fn observed_progress_is_reported_and_respects_tau() {
    for (name, t) in transports() {
        let tau = 2u32;
        let cfg = t.job().servers(2).workers(3);
        job::run(cfg, |w| {
            w.create_table(TableSpec::dense(1, 16, 1).consistency(Consistency::BoundedDelay(tau)))?;
            let keys: Vec<u64> = (0..16).collect();
            for clock in 0..8u32 {
                nap(w.rank(), clock, 10);
                let (_, progress) = w.pull(1, &keys)?.wait_observed()?;
                let need = u64::from(clock.saturating_sub(tau));
                assert!(progress >= need, "{name}: clock {clock} served at progress {progress} < {need}");
                w.push(1, &keys, &[1.0; 16])?;
                w.clock()?;
            }
            Ok(())
        })
        .unwrap();
    }
}

/// The values a worker `r` pushes at clock `t` to key `k`: integers, so
/// every sum is exact in f32.
fn f(r: u32, t: u32, k: u64) -> f32 {
    ((r + 1) * (t + 1) * (k as u32 % 5 + 1)) as f32
}

#[test]
fn sequential_matches_a_single_process_run_exactly() {
    let (workers, clocks, keys) = (3u32, 8u32, 40u64);
    // The single-process result: every push of every worker and clock.
    let exact = |upto: u32, k: u64| -> f32 { (0..upto).flat_map(|t| (0..workers).map(move |r| f(r, t, k))).sum() };
    for (name, t) in transports() {
        let cfg = t.job().servers(2).workers(workers);
        let finals = job::run(cfg, |w| {
            w.create_table(TableSpec::dense(1, keys, 1).consistency(Consistency::Sequential))?;
            w.barrier()?;
            let all: Vec<u64> = (0..keys).collect();
            for clock in 0..clocks {
                nap(w.rank(), clock, 6);
                let vals = w.pull(1, &all)?.wait()?;
                for (k, &v) in all.iter().zip(&vals) {
                    // All of the previous clocks, plus some subset of this
                    // clock's pushes (of workers that already pushed).
                    let extra = v - exact(clock, *k);
                    let ok = (0..1u32 << workers).any(|m| {
                        (0..workers).filter(|r| m >> r & 1 == 1).map(|r| f(r, clock, *k)).sum::<f32>() == extra
                    });
                    assert!(
                        ok,
                        "{name}: worker {} clock {clock} key {k}: {v} is not the state after clock {}",
                        w.rank(),
                        clock
                    );
                }
                let push: Vec<f32> = all.iter().map(|&k| f(w.rank(), clock, k)).collect();
                w.push(1, &all, &push)?;
                w.clock()?;
            }
            w.wait_all()?;
            w.barrier()?;
            w.pull(1, &all)?.wait()
        })
        .unwrap();
        for fin in finals {
            for (k, v) in fin.iter().enumerate() {
                assert_eq!(*v, exact(clocks, k as u64), "{name}: final model differs from the single-process run");
            }
        }
    }
}

#[test]
fn eventual_never_blocks_even_on_a_stalled_worker() {
    for (name, t) in transports() {
        let released = Arc::new(AtomicBool::new(false));
        let cfg = t.job().servers(2).workers(2);
        job::run(cfg, |w| {
            w.create_table(TableSpec::dense(1, 8, 1).consistency(Consistency::Eventual))?;
            w.barrier()?;
            if w.rank() == 1 {
                // Stalled at clock 0 until worker 0 has run far ahead.
                while !released.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return Ok(());
            }
            let _release = SetOnDrop(released.clone());
            for _ in 0..30 {
                let p = w.pull(1, &[0, 1])?;
                p.wait()?;
                w.push(1, &[0], &[1.0])?;
                w.clock()?;
            }
            // And a per-call override makes the same table wait-free too.
            let _ = w.with_consistency(Consistency::Eventual).pull(1, &[0])?.wait()?;
            released.store(true, Ordering::Release);
            let _ = name;
            Ok(())
        })
        .unwrap();
    }
}

#[test]
fn bounded_delay_holds_acks_and_pulls_until_the_slow_worker_catches_up() {
    for (name, t) in transports() {
        let go = Arc::new(AtomicBool::new(false));
        let cfg = t.job().servers(1).workers(2);
        job::run(cfg, |w| {
            w.create_table(TableSpec::dense(1, 4, 1).consistency(Consistency::BoundedDelay(1)))?;
            w.barrier()?;
            if w.rank() == 1 {
                while !go.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(2));
                }
                for _ in 1..=3 {
                    w.push(1, &[1], &[1.0])?;
                    w.clock()?;
                }
                return Ok(());
            }
            let _release = SetOnDrop(go.clone());
            // Worker 0 runs ahead to clock 3 (eventual calls don't wait).
            for _ in 0..3 {
                w.with_consistency(Consistency::Eventual).push(1, &[0], &[1.0])?;
                w.clock()?;
            }
            // At clock 3 with tau 1 a pull needs progress >= 2 from worker 1,
            // which is still at clock 0: it must not complete yet.
            let p = w.pull(1, &[0, 1])?;
            let ts = w.push(1, &[0], &[1.0])?;
            let done = Arc::new(AtomicBool::new(false));
            std::thread::scope(|s| -> pserver::Result<()> {
                let d2 = done.clone();
                let waiter = s.spawn(move || {
                    let v = p.wait();
                    d2.store(true, Ordering::Release);
                    v
                });
                std::thread::sleep(Duration::from_millis(300));
                assert!(!done.load(Ordering::Acquire), "{name}: a pull completed while a worker was 2 clocks behind");
                go.store(true, Ordering::Release);
                let vals = waiter.join().unwrap()?;
                // Served only after worker 1's pushes of clocks 0 and 1.
                assert!(vals[1] >= 2.0, "{name}: saw {vals:?}");
                Ok(())
            })?;
            w.wait(ts)?;
            Ok(())
        })
        .unwrap();
    }
}

#[test]
fn a_worker_that_left_holds_nobody_back() {
    for (name, t) in transports() {
        let cfg = t.job().servers(2).workers(3);
        job::run(cfg, |w| {
            w.create_table(TableSpec::dense(1, 4, 1).consistency(Consistency::Sequential))?;
            w.barrier()?;
            // Worker 2 leaves after two clocks; the others go on, and their
            // sequential pulls must not wait for its clock.
            let clocks = if w.rank() == 2 { 2 } else { 10 };
            for _ in 0..clocks {
                let _ = w.pull(1, &[0, 1, 2, 3])?.wait()?;
                w.push(1, &[u64::from(w.rank())], &[1.0])?;
                w.clock()?;
            }
            let _ = name;
            Ok(())
        })
        .unwrap();
    }
}
