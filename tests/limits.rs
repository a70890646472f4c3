//! Every resource a client can make a server spend is bounded (DESIGN
//! section 10): each limit is hit here, gives a clear error, and the server
//! keeps serving everyone else. Jobs run in process over authenticated TCP
//! (the transport's own limits, frame size and connections, are tested in
//! `transport::tcp`).

use std::sync::Arc;

use pserver::scheduler::{SchedulerConfig, SchedulerNode};
use pserver::server::{ServerConfig, ServerNode};
use pserver::transport::Transport;
use pserver::transport::tcp::{IoMode, Tcp};
use pserver::worker::{Worker, WorkerConfig};
use pserver::{Consistency, Error, TableSpec};

/// A scheduler and `servers` servers configured by `cfg`, over one TCP network.
struct Job {
    t: Arc<dyn Transport>,
    sched: SchedulerNode,
    servers: Vec<ServerNode>,
}

fn job(servers: u32, workers: u32, cfg: ServerConfig) -> Job {
    let t: Arc<dyn Transport> = Arc::new(Tcp::new(IoMode::Auto, Default::default()));
    let sched = SchedulerNode::start(
        t.as_ref(),
        "127.0.0.1:0",
        SchedulerConfig { servers, workers, ..SchedulerConfig::default() },
    )
    .unwrap();
    let servers = (0..servers)
        .map(|_| ServerNode::start(t.as_ref(), "127.0.0.1:0", &sched.addr(), cfg.clone()).unwrap())
        .collect();
    Job { t, sched, servers }
}

impl Job {
    /// Runs `f` on each of `workers` workers, in threads; returns their results by rank.
    fn run<T: Send>(&self, workers: u32, f: impl Fn(&Worker) -> pserver::Result<T> + Sync) -> Vec<T> {
        let addr = self.sched.addr();
        let mut out: Vec<(u32, T)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..workers)
                .map(|rank| {
                    let (f, addr, t) = (&f, addr.clone(), self.t.clone());
                    s.spawn(move || {
                        let cfg = WorkerConfig { rank: Some(rank), ..WorkerConfig::default() };
                        let w = Worker::connect(t.as_ref(), &addr, cfg).unwrap();
                        let r = f(&w);
                        w.finish(r.as_ref().err().map(|e| e.to_string())).unwrap();
                        (rank, r.unwrap())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        out.sort_by_key(|(r, _)| *r);
        self.sched.wait().unwrap();
        out.into_iter().map(|(_, v)| v).collect()
    }
}

#[test]
fn a_request_over_the_key_limit_is_refused_and_smaller_ones_are_served() {
    let j = job(1, 2, ServerConfig { max_keys_per_request: 1000, ..ServerConfig::default() });
    j.run(2, |w| {
        w.create_table(TableSpec::dense(1, 10_000, 1))?;
        let keys: Vec<u64> = (0..1001).map(|k| k * 3).collect();
        let e = w.push(1, &keys, &vec![1.0; keys.len()]).and_then(|ts| w.wait(ts)).unwrap_err();
        assert!(e.to_string().contains("at most 1000 keys per request"), "{e}");
        let e = w.pull(1, &keys)?.wait().unwrap_err();
        assert!(e.to_string().contains("1001 keys"), "{e}");
        // Within the limit, everyone is served and nothing of the refused push landed.
        w.barrier()?;
        let ts = w.push(1, &keys[..1000], &vec![1.0; 1000])?;
        w.wait(ts)?;
        w.barrier()?;
        let got = w.pull(1, &keys[..1000])?.wait()?;
        assert!(got.iter().all(|&v| v == 2.0), "two workers pushed 1 each: {:?}", &got[..4]);
        Ok(())
    });
    assert!(j.servers[0].report().refused >= 4);
}

#[test]
fn a_table_over_the_memory_budget_is_refused_clearly_and_the_server_keeps_serving() {
    let j = job(2, 1, ServerConfig { max_memory: Some(4 << 20), ..ServerConfig::default() });
    j.run(1, |w| {
        // 10M keys take at least 40 MB per server: refused, not an OOM kill.
        let e = w.create_table(TableSpec::dense(1, 10_000_000, 1)).unwrap_err().to_string();
        assert!(e.contains("out of memory budget") && e.contains("4194304 byte budget"), "{e}");
        // A table that fits is created and served.
        w.create_table(TableSpec::dense(2, 10_000, 4))?;
        let keys: Vec<u64> = (0..10_000).collect();
        w.push(2, &keys, &vec![0.5; 40_000])?;
        let got = w.pull(2, &keys)?.wait()?;
        assert!(got.iter().all(|&v| v == 0.5));
        // The budget counts what is in use: a second table that would exceed it is refused too.
        let e = w.create_table(TableSpec::dense(3, 1_200_000, 1)).unwrap_err().to_string();
        assert!(e.contains("in use"), "{e}");
        Ok(())
    });
    let r = j.servers[0].report();
    assert!(r.memory_used > 0 && r.memory_used <= 4 << 20, "{r:?}");
    assert_eq!(r.memory_limit, Some(4 << 20));
}

#[test]
fn a_connection_with_too_many_unanswered_requests_is_refused_beyond_the_limit() {
    // Sequential pulls at clock 1 wait (in the server) until every worker
    // finished clock 0; worker 1 holds back while worker 0 pipelines 20 of
    // them on a server that keeps at most 8 per connection.
    let j = job(1, 2, ServerConfig { max_pending: 8, ..ServerConfig::default() });
    j.run(2, |w| {
        let spec = TableSpec::dense(1, 100, 1).consistency(Consistency::Sequential);
        w.create_table(spec)?;
        w.barrier()?;
        if w.rank() == 0 {
            w.clock()?;
            let pulls: Vec<_> = (0..20).map(|_| w.pull(1, &[1, 2, 3])).collect::<pserver::Result<_>>()?;
            let mut pulls = pulls.into_iter();
            let held: Vec<_> = pulls.by_ref().take(8).collect();
            for p in pulls {
                let e = p.wait().unwrap_err().to_string();
                assert!(e.contains("8 requests waiting for their replies"), "{e}");
            }
            w.barrier()?; // lets worker 1 finish its clock
            for p in held {
                assert_eq!(p.wait()?, vec![0.0; 3], "the requests within the limit are answered");
            }
        } else {
            w.barrier()?;
            w.clock()?;
        }
        w.barrier()?;
        // Afterwards the connection is served as usual.
        let got = w.pull(1, &[7])?.wait()?;
        assert_eq!(got, vec![0.0]);
        Ok(())
    });
    assert!(j.servers[0].report().refused >= 12);
}

#[test]
fn refusals_name_the_limit_and_leave_other_workers_alone() {
    // Another worker's work is unaffected by one worker hitting a limit.
    let j = job(1, 2, ServerConfig { max_keys_per_request: 10, ..ServerConfig::default() });
    let out = j.run(2, |w| {
        w.create_table(TableSpec::dense(1, 100, 1))?;
        if w.rank() == 1 {
            let keys: Vec<u64> = (0..50).collect();
            for _ in 0..20 {
                match w.pull(1, &keys)?.wait() {
                    Err(Error::Remote { message, .. }) => assert!(message.contains("--max-keys-per-request")),
                    other => panic!("expected a refusal, got {other:?}"),
                }
            }
        }
        let mut sum = 0.0;
        for k in 0..10u64 {
            let ts = w.push(1, &[k], &[1.0])?;
            w.wait(ts)?;
            sum += w.pull(1, &[k])?.wait()?[0];
        }
        Ok(sum)
    });
    assert!(out.iter().all(|&s| s >= 10.0), "{out:?}");
}
