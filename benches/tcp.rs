//! Push and pull over TCP on loopback (1 server, 1 worker, io_uring where
//! available), through the real stack: worker, frames, transport, server,
//! store. `cargo bench --bench tcp`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pserver::scheduler::{SchedulerConfig, SchedulerNode};
use pserver::server::{ServerConfig, ServerNode};
use pserver::transport::Transport;
use pserver::transport::tcp::{IoMode, Tcp};
use pserver::worker::{Worker, WorkerConfig};
use pserver::{KeyList, TableSpec, Values};

struct Job {
    w: Worker,
    _server: ServerNode,
    _sched: SchedulerNode,
}

fn job() -> Job {
    // One process: the transport makes up the job token itself.
    let t: Arc<dyn Transport> = Arc::new(Tcp::new(IoMode::from_env().unwrap(), Default::default()));
    let sched = SchedulerNode::start(
        t.as_ref(),
        "127.0.0.1:0",
        SchedulerConfig { servers: 1, workers: 1, ..SchedulerConfig::default() },
    )
    .unwrap();
    let server = ServerNode::start(t.as_ref(), "127.0.0.1:0", &sched.addr(), ServerConfig::default()).unwrap();
    let w = Worker::connect(t.as_ref(), &sched.addr(), WorkerConfig::default()).unwrap();
    Job { w, _server: server, _sched: sched }
}

fn tcp(c: &mut Criterion) {
    let j = job();
    let w = &j.w;
    let mut g = c.benchmark_group("tcp_loopback");
    g.measurement_time(Duration::from_secs(3));
    for (i, bytes) in [4usize << 10, 64 << 10, 1 << 20].into_iter().enumerate() {
        let n = bytes / 4;
        let table = i as u32 + 1;
        w.create_table(TableSpec::dense(table, n as u64, 1)).unwrap();
        let keys = KeyList::range(0, n as u64);
        let vals: Values = vec![1.0f32; n].into();
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(BenchmarkId::new("push", bytes), |b| {
            b.iter(|| w.wait(w.push_with(table, &keys, vals.clone()).unwrap()).unwrap())
        });
        let mut buf = Vec::new();
        g.bench_function(BenchmarkId::new("pull", bytes), |b| {
            b.iter(|| buf = w.pull_with(table, &keys, std::mem::take(&mut buf)).unwrap().wait().unwrap())
        });
    }
    w.create_table(TableSpec::dense(99, 1, 1)).unwrap();
    g.throughput(Throughput::Elements(1));
    g.bench_function("pull_one_key_round_trip", |b| b.iter(|| w.pull(99, &[0]).unwrap().wait().unwrap()));
    g.finish();
    w.finish(None).unwrap();
}

criterion_group!(benches, tcp);
criterion_main!(benches);
