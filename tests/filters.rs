//! Push filters lose nothing: with integer-valued updates (exact in f32), a
//! job with the significantly-modified filter ends, after its flush, with
//! exactly the model of the same job without filters; the KKT filter leaves
//! an L1 proximal model unchanged. Over inproc and TCP.

mod common;
use common::via::{Via, transports};

use pserver::worker::{FilterStats, Filters, Kkt, Significant};
use pserver::{Consistency, JobConfig, TableSpec, UpdaterSpec, job};

/// Small integers in -2..=2, many of them zero or tiny relative to the
/// threshold, so that the filter holds a lot back.
fn update(r: u32, t: u32, k: u64) -> f32 {
    (((k * 7 + u64::from(t) * 3 + u64::from(r) * 5) % 5) as i64 - 2) as f32
}

/// Runs W workers pushing `update` to sparse keys for T clocks; returns the
/// final model and each worker's filter stats.
fn run(t: &Via, filters: Option<Filters>) -> (Vec<f32>, Vec<FilterStats>) {
    let (workers, clocks) = (3u32, 12u32);
    let keys: Vec<u64> = (0..500u64).map(|i| i * 1_000_003).collect();
    let cfg = t.job().servers(2).workers(workers);
    let out = job::run(cfg, |w| {
        w.create_table(TableSpec::sparse(1, u64::MAX, 2))?;
        if let Some(f) = filters {
            w.set_filters(1, f)?;
        }
        for clock in 0..clocks {
            let vals: Vec<f32> =
                keys.iter().flat_map(|&k| [update(w.rank(), clock, k), update(w.rank(), clock, k + 1)]).collect();
            w.push(1, &keys, &vals)?;
            w.clock()?;
        }
        let stats = w.filter_stats(1);
        w.flush(1)?;
        w.wait_all()?;
        w.barrier()?;
        Ok((w.pull(1, &keys)?.wait()?, stats))
    })
    .unwrap();
    let stats = out.iter().map(|o| o.1).collect();
    (out.into_iter().next().unwrap().0, stats)
}

#[test]
fn significantly_modified_filter_ends_with_the_unfiltered_model_exactly() {
    for (name, t) in transports() {
        let (plain, _) = run(&t, None);
        let f = Filters { significant: Some(Significant::absolute(3.0).decaying(0.8, 0.5)), ..Filters::default() };
        let (filtered, stats) = run(&t, Some(f));
        assert_eq!(filtered, plain, "{name}: the flushed model differs from the unfiltered one");
        let total: u64 = stats.iter().map(|s| s.significant_keys_held).sum();
        let sent: u64 = stats.iter().map(|s| s.push_keys_sent).sum();
        let offered: u64 = stats.iter().map(|s| s.push_keys).sum();
        assert!(total > 0 && sent < offered, "{name}: the filter held nothing back ({stats:?})");
    }
}

#[test]
fn kkt_filter_leaves_an_l1_proximal_model_unchanged() {
    let (eta, lambda) = (0.5f32, 1.0f32);
    let keys: Vec<u64> = (0..200).collect();
    for (name, t) in transports() {
        let run = |filters: Option<Filters>| {
            let cfg = t.job().servers(2).workers(1);
            job::run(cfg, |w| {
                let spec = TableSpec::dense(1, 200, 1)
                    .updater(UpdaterSpec::Proximal { eta, l1: lambda, l2: 0.0 })
                    .consistency(Consistency::Sequential);
                w.create_table(spec)?;
                if let Some(f) = filters {
                    w.set_filters(1, f)?;
                }
                for clock in 0..10u32 {
                    let wts = w.pull(1, &keys)?.wait()?;
                    // A "gradient" mostly inside [-lambda, lambda], sometimes outside.
                    let g: Vec<f32> = keys
                        .iter()
                        .zip(&wts)
                        .map(|(&k, &x)| 0.25 * (((k * 13 + u64::from(clock) * 7) % 11) as f32 - 5.0) - 0.1 * x)
                        .collect();
                    w.push(1, &keys, &g)?;
                    w.clock()?;
                }
                w.wait_all()?;
                Ok((w.pull(1, &keys)?.wait()?, w.filter_stats(1)))
            })
            .unwrap()
            .remove(0)
        };
        let (plain, _) = run(None);
        let (filtered, stats) = run(Some(Filters { kkt: Some(Kkt { lambda, delta: 0.0 }), ..Filters::default() }));
        assert_eq!(filtered, plain, "{name}: KKT changed the model");
        assert!(stats.kkt_keys_skipped > 0, "{name}: nothing was skipped ({stats:?})");
        assert!(plain.iter().any(|&x| x != 0.0) && plain.contains(&0.0), "{name}: a degenerate model");
    }
}

#[test]
fn nothing_held_back_is_lost_when_a_worker_finishes_without_flushing() {
    let keys: Vec<u64> = (0..100).collect();
    let cfg = JobConfig::default().servers(2).workers(1);
    job::run(cfg, |w| {
        w.create_table(TableSpec::dense(1, 100, 1))?;
        w.set_filters(1, Filters { significant: Some(Significant::absolute(1e9)), ..Filters::default() })?;
        w.push(1, &keys, &[1.0; 100])?;
        w.push(1, &keys, &[2.0; 100])?;
        assert_eq!(w.filter_stats(1).push_keys_sent, 0);
        Ok(())
    })
    .unwrap();
    // A second job cannot see the first's servers; instead check within one
    // job that finish() flushes: worker 1 waits for worker 0's finish.
    let cfg = JobConfig::default().servers(1).workers(2);
    job::run(cfg, |w| {
        w.create_table(TableSpec::dense(1, 100, 1))?;
        if w.rank() == 0 {
            w.set_filters(1, Filters { significant: Some(Significant::absolute(1e9)), ..Filters::default() })?;
            w.push(1, &keys, &[1.5; 100])?;
            w.finish(None)?; // flushes, then leaves the job
            return Ok(());
        }
        // Worker 1 polls until worker 0's held values arrive.
        for _ in 0..10_000 {
            if w.pull(1, &keys)?.wait()?.iter().all(|&v| v == 1.5) {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("worker 0's held-back values never arrived");
    })
    .unwrap();
}

#[test]
fn version_filtered_pulls_return_exactly_what_plain_pulls_return() {
    for (name, t) in transports() {
        let cfg = t.job().servers(2).workers(2);
        let stats = job::run(cfg, |w| {
            w.create_table(TableSpec::sparse(1, u64::MAX, 3))?;
            let keys: Vec<u64> = (0..300u64).map(|i| i * 7919).collect();
            if w.rank() == 0 {
                w.set_filters(1, Filters { version_pull: true, ..Filters::default() })?;
            }
            let mut last = Vec::new();
            for round in 0..6u64 {
                // Worker 1 changes a different tenth of the keys each round.
                if w.rank() == 1 {
                    let some: Vec<u64> = keys.iter().copied().filter(|k| (k / 7919) % 10 == round).collect();
                    let vals: Vec<f32> = some.iter().flat_map(|&k| [k as f32, round as f32, 1.0]).collect();
                    w.wait(w.push(1, &some, &vals)?)?;
                }
                w.barrier()?;
                // Both pull the same keys (worker 0 version-filtered, worker 1
                // plainly) and must agree; a subset of keys too.
                let got = w.pull(1, &keys)?.wait()?;
                let sub: Vec<u64> = keys.iter().copied().step_by(3).collect();
                let got_sub = w.pull(1, &sub)?.wait()?;
                for (i, k) in keys.iter().enumerate() {
                    if k % 3 == 0 && (k / 7919) % 3 == 0 {
                        let j = (k / 7919 / 3) as usize;
                        assert_eq!(&got[i * 3..i * 3 + 3], &got_sub[j * 3..j * 3 + 3], "{name}");
                    }
                }
                last = got;
                w.barrier()?;
            }
            Ok((last, w.filter_stats(1)))
        })
        .unwrap();
        assert_eq!(stats[0].0, stats[1].0, "{name}: version-filtered and plain pulls disagree");
        let s = stats[0].1;
        assert!(s.version_keys_unchanged > 0, "{name}: nothing was saved ({s:?})");
        assert!(s.bytes_saved() > 0, "{name}: the scheme cost more than it saved ({s:?})");
    }
}

#[test]
fn key_caching_sends_each_list_once_and_changes_no_result() {
    for (name, t) in transports() {
        let run = |cache: bool| {
            let cfg = t.job().servers(2).workers(2);
            job::run(cfg, |w| {
                w.create_table(TableSpec::sparse(1, u64::MAX, 1))?;
                if cache {
                    w.set_filters(1, Filters { key_cache: true, ..Filters::default() })?;
                }
                let keys = pserver::KeyList::new((0..2000u64).map(|i| i * 104_729 + u64::from(w.rank())).collect())?;
                for round in 0..5u32 {
                    w.push_with(1, &keys, vec![round as f32 + 1.0; 2000])?;
                    let _ = w.pull_with(1, &keys, Vec::new())?.wait()?;
                }
                w.wait_all()?;
                w.barrier()?;
                Ok((w.pull_with(1, &keys, Vec::new())?.wait()?, w.filter_stats(1)))
            })
            .unwrap()
        };
        let plain = run(false);
        let cached = run(true);
        for (p, c) in plain.iter().zip(&cached) {
            assert_eq!(p.0, c.0, "{name}: key caching changed a result");
            assert!(c.1.key_cache_bytes_saved >= 8 * 2000 * 8, "{name}: little was saved ({:?})", c.1);
        }
    }
}

#[test]
fn a_server_that_lost_its_key_cache_asks_again_and_order_is_kept() {
    use pserver::scheduler::{SchedulerConfig, SchedulerNode};
    use pserver::server::{ServerConfig, ServerNode};
    use pserver::worker::{ShmMode, Worker, WorkerConfig};
    for (name, t) in transports() {
        let sched = SchedulerNode::start(
            t.0.as_ref(),
            "",
            SchedulerConfig { servers: 2, workers: 1, ..SchedulerConfig::default() },
        )
        .unwrap();
        let servers: Vec<ServerNode> = (0..2)
            .map(|_| {
                ServerNode::start(
                    t.0.as_ref(),
                    "",
                    &sched.addr(),
                    ServerConfig { shm: t.1 != ShmMode::Off, ..ServerConfig::default() },
                )
                .unwrap()
            })
            .collect();
        let w =
            Worker::connect(t.0.as_ref(), &sched.addr(), WorkerConfig { shm: t.1, ..WorkerConfig::default() }).unwrap();
        w.create_table(TableSpec::sparse(1, u64::MAX, 1)).unwrap();
        w.set_filters(1, Filters { key_cache: true, ..Filters::default() }).unwrap();
        let keys = pserver::KeyList::new((0..5000u64).map(|i| i * 15_485_863).collect()).unwrap();
        for _ in 0..3 {
            w.push_with(1, &keys, vec![1.0; 5000]).unwrap();
        }
        w.wait_all().unwrap();
        let hits: u64 =
            servers.iter().map(|s| s.stats().key_cache_hits.load(std::sync::atomic::Ordering::Relaxed)).sum();
        assert!(hits > 0, "{name}: the lists were never named by digest");
        for s in &servers {
            s.forget_key_caches();
        }
        // Pushes naming lost lists, each followed at once by a pull: every
        // pull must see the pushes before it.
        for round in 1..=3 {
            w.push_with(1, &keys, vec![1.0; 5000]).unwrap();
            let got = w.pull_with(1, &keys, Vec::new()).unwrap().wait().unwrap();
            assert!(got.iter().all(|&v| v == 3.0 + round as f32), "{name}: round {round} saw {}", got[0]);
        }
        let misses: u64 =
            servers.iter().map(|s| s.stats().key_cache_misses.load(std::sync::atomic::Ordering::Relaxed)).sum();
        assert!(misses > 0, "{name}: no server asked for the lists again");
        w.finish(None).unwrap();
        sched.wait().unwrap();
    }
}
