//! The key-value API as users see it, on embedded jobs, over every
//! transport: in process, and TCP with each I/O back end. Each test states a
//! property of the API; `kv_tests!` runs it once per transport.

mod common;

use std::sync::Arc;

use pserver::transport::Transport;
use pserver::transport::inproc::Inproc;
use pserver::transport::rdma::RdmaMode;
use pserver::transport::tcp::{IoMode, Tcp};
use pserver::updater::{Rules, rule_fn};
use pserver::worker::ShmMode;
use pserver::{Error, Init, JobConfig, KeyList, TableSpec, UpdaterSpec, job};

/// A transport, and whether workers and servers share memory or use RDMA
/// beside it.
#[derive(Clone)]
struct T(Arc<dyn Transport>, ShmMode, RdmaMode);

fn cfg(t: &T, servers: u32, workers: u32) -> JobConfig {
    let mut c = JobConfig::default().servers(servers).workers(workers).transport(t.0.clone());
    c.worker.shm = t.1;
    c.worker.rdma = t.2;
    c
}

/// TCP plus RDMA, or `None` (and SKIPPED) without a usable device. Run
/// inside `tools/rxe-vm` with `--test-threads 1`: each test then checks that
/// its own frames went through RDMA push rings.
fn rdma_or_skip() -> Option<T> {
    common::rdma_device_or_skip()?;
    let t = Tcp::new(IoMode::Std, Default::default());
    Some(T(Arc::new(t), ShmMode::Off, RdmaMode::Require))
}

macro_rules! kv_tests {
    ($($name:ident),* $(,)?) => {
        mod inproc {
            $( #[test] fn $name() { super::$name(&super::T(std::sync::Arc::new(super::Inproc::new()), super::ShmMode::Off, super::RdmaMode::Off)) } )*
        }
        mod tcp_std {
            $( #[test] fn $name() {
                super::$name(&super::T(std::sync::Arc::new(super::Tcp::new(super::IoMode::Std, Default::default())), super::ShmMode::Off, super::RdmaMode::Off))
            } )*
        }
        mod shm {
            $( #[test] fn $name() {
                if !pserver::transport::shm::available() {
                    eprintln!("SKIPPED: no usable shared-memory directory");
                    return;
                }
                super::$name(&super::T(std::sync::Arc::new(super::Tcp::new(super::IoMode::Auto, Default::default())), super::ShmMode::Require, super::RdmaMode::Off))
            } )*
        }
        mod tcp_uring {
            $( #[test] fn $name() {
                let t = super::Tcp::new(super::IoMode::Auto, Default::default());
                if t.resolved_mode() != super::IoMode::Uring {
                    eprintln!("SKIPPED: io_uring is not available on this machine");
                    return;
                }
                super::$name(&super::T(std::sync::Arc::new(t), super::ShmMode::Off, super::RdmaMode::Off))
            } )*
        }
        mod rdma {
            $( #[test] fn $name() {
                let Some(t) = super::rdma_or_skip() else { return };
                let before = pserver::transport::rdma::totals();
                super::$name(&t);
                let after = pserver::transport::rdma::totals();
                assert!(after.links > before.links, "the job opened no RDMA link");
                // Every test that moves data moved some of it by RDMA.
                if stringify!($name) != "a_failing_worker_fails_the_job_without_hanging_the_others" {
                    assert!(
                        after.frames > before.frames || after.bytes_read > before.bytes_read,
                        "nothing went through RDMA (no READ, no frame in a push ring)"
                    );
                }
            } )*
        }
    };
}

kv_tests!(
    pull_after_push_sees_it,
    pull_after_many_unwaited_pushes_sees_all_of_them,
    several_workers_sum_into_shared_keys,
    dims_above_one_keep_each_keys_vector_together,
    push_pull_returns_the_values_after_the_push,
    zero_copy_variants_move_buffers_and_reuse_the_output,
    updaters_run_on_the_server,
    bad_requests_are_errors_not_panics_and_change_nothing,
    wait_reports_each_operations_outcome,
    many_threads_of_one_worker_push_and_pull_at_once,
    clocks_advance_and_barriers_hold_everyone,
    a_failing_worker_fails_the_job_without_hanging_the_others,
    stateful_updaters_and_init_work_end_to_end,
    traffic_counts_what_was_sent_and_received,
    frames_larger_than_a_push_ring_keep_their_place_in_order,
    pulls_after_acknowledged_pushes_are_one_sided_where_the_transport_allows,
);

fn frames_larger_than_a_push_ring_keep_their_place_in_order(t: &T) {
    job::run(cfg(t, 2, 1), |w| {
        // 12 MiB of values in one frame: more than an RDMA push ring holds,
        // so it travels by TCP between two frames that go through the ring.
        let n = 3u64 << 20;
        w.create_table(TableSpec::dense(1, n, 1))?;
        let all = KeyList::range(0, n);
        let small = [1u64, n - 1];
        w.push(1, &small, &[1.0, 1.0])?;
        w.push_with(1, &all, vec![2.0f32; n as usize])?;
        w.push(1, &small, &[4.0, 4.0])?;
        w.clock()?;
        assert_eq!(w.pull(1, &[0, 1, n - 1])?.wait()?, vec![2.0, 7.0, 7.0]);
        Ok(())
    })
    .unwrap();
}

fn pulls_after_acknowledged_pushes_are_one_sided_where_the_transport_allows(t: &T) {
    job::run(cfg(t, 2, 1), |w| {
        w.create_table(TableSpec::dense(1, 10_000, 3))?;
        let keys: Vec<u64> = (0..10_000).step_by(3).collect();
        let vals: Vec<f32> = (0..keys.len() * 3).map(|i| i as f32).collect();
        w.wait(w.push(1, &keys, &vals)?)?;
        let before = w.traffic();
        for _ in 0..3 {
            assert_eq!(w.pull(1, &keys)?.wait()?, vals);
        }
        let all: Vec<u64> = (0..10_000).collect();
        let got = w.pull(1, &all)?.wait()?;
        assert_eq!(&got[9..12], &vals[3..6]);
        let after = w.traffic();
        if t.2 == RdmaMode::Require {
            assert_eq!(after.rdma_pulls - before.rdma_pulls, 4, "pulls served by RDMA READ");
            assert!(after.rdma_bytes_read - before.rdma_bytes_read >= 10_000 * 16);
        }
        if t.1 == ShmMode::Require {
            assert_eq!(after.shm_pulls - before.shm_pulls, 4, "pulls served from shared memory");
        }
        Ok(())
    })
    .unwrap();
}

fn traffic_counts_what_was_sent_and_received(t: &T) {
    job::run(cfg(t, 2, 1), |w| {
        w.create_table(TableSpec::sparse(1, u64::MAX, 2))?;
        let before = w.traffic();
        let keys: Vec<u64> = (0..1000).map(|k| k * 3).collect();
        w.wait(w.push(1, &keys, &vec![1.0; 2000])?)?;
        let _ = w.pull(1, &keys)?.wait()?;
        let after = w.traffic();
        assert_eq!(after.keys_sent - before.keys_sent, 2000);
        // Pushed keys and values, pulled keys; pulled values back.
        assert_eq!(after.bytes_sent - before.bytes_sent, 1000 * 8 + 2000 * 4 + 1000 * 8);
        assert_eq!(after.bytes_received - before.bytes_received, 2000 * 4);
        assert!(after.requests - before.requests >= 2);
        Ok(())
    })
    .unwrap();
}

fn pull_after_push_sees_it(t: &T) {
    job::run(cfg(t, 2, 1), |w| {
        w.create_table(TableSpec::dense(1, 1000, 1))?;
        let keys: Vec<u64> = (0..1000).collect();
        let vals: Vec<f32> = keys.iter().map(|&k| k as f32).collect();
        w.push(1, &keys, &vals)?; // no wait: ordering alone must guarantee it
        let got = w.pull(1, &keys)?.wait()?;
        assert_eq!(got, vals);
        Ok(())
    })
    .unwrap();
}

fn pull_after_many_unwaited_pushes_sees_all_of_them(t: &T) {
    job::run(cfg(t, 3, 1), |w| {
        w.create_table(TableSpec::sparse(7, u64::MAX, 1))?;
        let keys = [3u64, 1 << 20, 1 << 40, u64::MAX - 1];
        for _ in 0..100 {
            w.push(7, &keys, &[1.0; 4])?;
        }
        assert_eq!(w.pull(7, &keys)?.wait()?, vec![100.0; 4]);
        Ok(())
    })
    .unwrap();
}

fn several_workers_sum_into_shared_keys(t: &T) {
    let workers = 4;
    let results = job::run(cfg(t, 2, workers), |w| {
        w.create_table(TableSpec::dense(1, 64, 1))?;
        w.create_table(TableSpec::dense(2, 64, 1).updater(UpdaterSpec::Assign))?;
        let keys: Vec<u64> = (0..64).collect();
        for _ in 0..10 {
            w.push(1, &keys, &[1.0; 64])?;
        }
        // Table 2: each worker assigns its own key.
        w.push(2, &[u64::from(w.rank())], &[w.rank() as f32 + 0.5])?;
        w.wait_all()?;
        w.barrier()?;
        let sums = w.pull(1, &keys)?.wait()?;
        let own = w.pull(2, &(0..u64::from(w.num_workers())).collect::<Vec<_>>())?.wait()?;
        Ok((sums, own))
    })
    .unwrap();
    for (sums, own) in results {
        assert!(sums.iter().all(|&s| s == 10.0 * workers as f32), "{sums:?}");
        assert_eq!(own, (0..workers).map(|r| r as f32 + 0.5).collect::<Vec<_>>());
    }
}

fn dims_above_one_keep_each_keys_vector_together(t: &T) {
    job::run(cfg(t, 2, 1), |w| {
        for (id, dim) in [(1u32, 2u32), (2, 3), (3, 16), (4, 257)] {
            w.create_table(TableSpec::dense(id, 500, dim))?;
            let keys: Vec<u64> = (0..500).step_by(3).collect();
            let vals: Vec<f32> =
                keys.iter().flat_map(|&k| (0..dim).map(move |j| k as f32 * 1000.0 + j as f32)).collect();
            w.push(id, &keys, &vals)?;
            assert_eq!(w.pull(id, &keys)?.wait()?, vals, "dim {dim}");
            // Keys never pushed read as zeros.
            assert_eq!(w.pull(id, &[1, 499])?.wait()?, vec![0.0; 2 * dim as usize]);
        }
        Ok(())
    })
    .unwrap();
}

fn push_pull_returns_the_values_after_the_push(t: &T) {
    job::run(cfg(t, 2, 1), |w| {
        w.create_table(TableSpec::dense(1, 100, 2).init(Init::Constant(1.0)))?;
        let got = w.push_pull(1, &[5, 50, 99], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])?.wait()?;
        assert_eq!(got, vec![2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        Ok(())
    })
    .unwrap();
}

fn zero_copy_variants_move_buffers_and_reuse_the_output(t: &T) {
    job::run(cfg(t, 2, 1), |w| {
        w.create_table(TableSpec::dense(1, 10_000, 1))?;
        let keys = KeyList::range(0, 10_000);
        let ts = w.push_with(1, &keys, vec![2.0; 10_000])?;
        w.wait(ts)?;
        let buf = Vec::with_capacity(10_000);
        let p = buf.as_ptr();
        let out = w.pull_with(1, &keys, buf)?.wait()?;
        assert_eq!(out.as_ptr(), p, "the caller's buffer is filled in place");
        assert!(out.iter().all(|&v| v == 2.0));
        let out = w.push_pull_with(1, &keys, vec![1.0; 10_000], out)?.wait()?;
        assert!(out.iter().all(|&v| v == 3.0));
        Ok(())
    })
    .unwrap();
}

fn updaters_run_on_the_server(t: &T) {
    let mut rules = Rules::default();
    rules.register("max", rule_fn(|w, g| w.iter_mut().zip(g).for_each(|(w, g)| *w = w.max(*g))));
    job::run(cfg(t, 2, 1).rules(rules), |w| {
        w.create_table(TableSpec::dense(1, 10, 1).updater(UpdaterSpec::Sgd { lr: 0.5 }))?;
        w.push(1, &[1], &[2.0])?;
        assert_eq!(w.pull(1, &[1])?.wait()?, vec![-1.0]);
        w.create_table(TableSpec::dense(2, 10, 1).updater(UpdaterSpec::Custom("max".into())))?;
        w.push(2, &[3], &[5.0])?;
        w.push(2, &[3], &[4.0])?;
        assert_eq!(w.pull(2, &[3])?.wait()?, vec![5.0]);
        let e = w.create_table(TableSpec::dense(3, 10, 1).updater(UpdaterSpec::Custom("nope".into()))).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        Ok(())
    })
    .unwrap();
}

fn bad_requests_are_errors_not_panics_and_change_nothing(t: &T) {
    job::run(cfg(t, 2, 1), |w| {
        w.create_table(TableSpec::dense(1, 100, 2))?;
        assert!(matches!(w.push(1, &[3, 2], &[0.0; 4]), Err(Error::KeysNotSorted { index: 1, .. })));
        assert!(matches!(w.push(1, &[2, 2], &[0.0; 4]), Err(Error::KeysNotSorted { .. })));
        assert!(matches!(w.pull(1, &[5, 1]), Err(Error::KeysNotSorted { .. })));
        assert!(matches!(w.push(1, &[1, 2], &[0.0; 3]), Err(Error::LengthMismatch { expected: 4, got: 3, .. })));
        assert!(matches!(w.push(1, &[100], &[0.0; 2]), Err(Error::KeyOutOfRange { key: 100, len: 100, .. })));
        assert!(matches!(w.pull(9, &[1]), Err(Error::UnknownTable(9))));
        assert!(matches!(w.push(9, &[1], &[0.0]), Err(Error::UnknownTable(9))));
        assert!(KeyList::new(vec![1, 1]).is_err());
        let keys = KeyList::range(0, 2);
        assert!(matches!(w.push_with(1, &keys, vec![1.0; 3]), Err(Error::LengthMismatch { .. })));
        assert!(matches!(w.create_table(TableSpec::dense(1, 100, 3)), Err(Error::Remote { .. })));
        assert!(matches!(w.create_table(TableSpec::dense(2, 0, 1)), Err(Error::InvalidSpec(_))));
        assert!(matches!(w.wait(pserver::Timestamp(1 << 40)), Err(Error::UnknownTimestamp(_))));
        // Nothing above changed the table.
        assert_eq!(w.pull(1, &(0..100).collect::<Vec<_>>())?.wait()?, vec![0.0; 200]);
        // Re-declaring the identical spec is fine.
        w.create_table(TableSpec::dense(1, 100, 2))?;
        // An empty request completes at once.
        let ts = w.push(1, &[], &[])?;
        w.wait(ts)?;
        assert!(w.pull(1, &[])?.wait()?.is_empty());
        Ok(())
    })
    .unwrap();
}

fn wait_reports_each_operations_outcome(t: &T) {
    job::run(cfg(t, 1, 1), |w| {
        w.create_table(TableSpec::dense(1, 10, 1))?;
        let a = w.push(1, &[1], &[1.0])?;
        let b = w.push(1, &[2], &[1.0])?;
        assert!(b > a);
        w.wait(b)?;
        w.wait(a)?;
        w.wait(a)?; // waiting twice on a finished op is fine
        Ok(())
    })
    .unwrap();
}

fn many_threads_of_one_worker_push_and_pull_at_once(t: &T) {
    job::run(cfg(t, 2, 2), |w| {
        w.create_table(TableSpec::dense(1, 4096, 4))?;
        let threads = 8;
        let rounds = 200;
        std::thread::scope(|s| {
            for t in 0..threads {
                let w = w.clone();
                s.spawn(move || {
                    let keys: Vec<u64> = (0..4096).filter(|k| k % threads == t).collect();
                    for _ in 0..rounds {
                        w.push(1, &keys, &vec![1.0; keys.len() * 4]).unwrap();
                        let got = w.pull(1, &keys).unwrap().wait().unwrap();
                        assert!(got.iter().all(|&v| v >= 1.0));
                    }
                });
            }
        });
        w.wait_all()?;
        w.barrier()?;
        let all = w.pull(1, &(0..4096).collect::<Vec<_>>())?.wait()?;
        let expected = (rounds * w.num_workers() as u64) as f32;
        assert!(all.iter().all(|&v| v == expected), "expected {expected}");
        Ok(())
    })
    .unwrap();
}

fn clocks_advance_and_barriers_hold_everyone(t: &T) {
    let seen = Arc::new(std::sync::atomic::AtomicU32::new(0));
    job::run(cfg(t, 2, 3), |w| {
        w.create_table(TableSpec::dense(1, 3, 1))?;
        for c in 1..=5 {
            w.push(1, &[u64::from(w.rank())], &[1.0])?;
            assert_eq!(w.clock()?, c);
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            w.barrier()?;
            // After the barrier every worker has finished clock c.
            assert!(seen.load(std::sync::atomic::Ordering::SeqCst) >= 3 * c);
        }
        assert_eq!(w.current_clock(), 5);
        Ok(())
    })
    .unwrap();
}

fn a_failing_worker_fails_the_job_without_hanging_the_others(t: &T) {
    let r = job::run(cfg(t, 1, 3), |w| {
        if w.rank() == 1 {
            panic!("boom");
        }
        w.barrier()?; // must not wait forever for the dead worker
        Ok(())
    });
    let e = r.unwrap_err().to_string();
    assert!(e.contains("boom") || e.contains("abandoned"), "{e}");
}

fn stateful_updaters_and_init_work_end_to_end(t: &T) {
    job::run(cfg(t, 2, 1), |w| {
        let spec = TableSpec::sparse(1, 1 << 32, 2)
            .updater(UpdaterSpec::AdaGrad { lr: 1.0, eps: 1e-8, initial_accumulator: 0.0 })
            .init(Init::Uniform { low: 10.0, high: 10.5, seed: 3 });
        w.create_table(spec)?;
        let before = w.pull(1, &[42])?.wait()?;
        assert!(before.iter().all(|v| (10.0..10.5).contains(v)));
        w.push(1, &[42], &[2.0, -2.0])?;
        let after = w.pull(1, &[42])?.wait()?;
        assert!((after[0] - (before[0] - 1.0)).abs() < 1e-5);
        assert!((after[1] - (before[1] + 1.0)).abs() < 1e-5);
        Ok(())
    })
    .unwrap();
}
