//! The embedded job (DESIGN section 8): scheduler, servers and workers as
//! threads of one process, connected by a transport exactly as separate
//! processes would be (the in-process transport by default).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::scheduler::{SchedulerConfig, SchedulerNode};
use crate::server::{ServerConfig, ServerNode};
use crate::transport::Transport;
use crate::transport::inproc::Inproc;
use crate::updater::Rules;
use crate::worker::{Worker, WorkerConfig};

/// Shape of an embedded job.
#[derive(Clone)]
pub struct JobConfig {
    pub servers: u32,
    pub workers: u32,
    pub vnodes: u32,
    /// Lanes per server.
    pub lanes: usize,
    pub rules: Rules,
    pub max_memory: Option<u64>,
    pub worker: WorkerConfig,
    pub transport: Arc<dyn Transport>,
    /// Address the scheduler binds (empty: any).
    pub scheduler_addr: String,
    /// Address each server binds (empty: any).
    pub server_addr: String,
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            servers: 2,
            workers: 2,
            vnodes: SchedulerConfig::default().vnodes,
            lanes: ServerConfig::default().lanes,
            rules: Rules::default(),
            max_memory: None,
            worker: WorkerConfig::default(),
            transport: Arc::new(Inproc::new()),
            scheduler_addr: String::new(),
            server_addr: String::new(),
        }
    }
}

impl JobConfig {
    pub fn servers(mut self, n: u32) -> Self {
        self.servers = n;
        self
    }
    pub fn workers(mut self, n: u32) -> Self {
        self.workers = n;
        self
    }
    pub fn rules(mut self, rules: Rules) -> Self {
        self.rules = rules;
        self
    }
    pub fn transport(mut self, t: Arc<dyn Transport>) -> Self {
        self.transport = t;
        self
    }
}

/// Runs `work` on every worker of a fresh embedded job and returns the
/// workers' results in rank order. The job ends when every worker returned;
/// the first failure (an error or a panic of any worker) is the result.
pub fn run<T, F>(cfg: JobConfig, work: F) -> Result<Vec<T>>
where
    T: Send,
    F: Fn(&Worker) -> Result<T> + Sync,
{
    let t = cfg.transport.as_ref();
    let sched_cfg = SchedulerConfig { servers: cfg.servers, workers: cfg.workers, vnodes: cfg.vnodes };
    let sched = SchedulerNode::start(t, &cfg.scheduler_addr, sched_cfg)?;
    let saddr = sched.addr();
    let server_cfg = ServerConfig { lanes: cfg.lanes, rules: cfg.rules.clone(), max_memory: cfg.max_memory };
    let servers = (0..cfg.servers)
        .map(|_| ServerNode::start(t, &cfg.server_addr, &saddr, server_cfg.clone()))
        .collect::<Result<Vec<_>>>()?;
    let results: Vec<(bool, Result<T>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..cfg.workers)
            .map(|rank| {
                let (work, saddr, wcfg) = (&work, saddr.clone(), cfg.worker.clone());
                std::thread::Builder::new()
                    .name(format!("pserver-worker-{rank}"))
                    .spawn_scoped(scope, move || {
                        let wcfg = WorkerConfig { rank: Some(rank), ..wcfg };
                        let w = match Worker::connect(t, &saddr, wcfg) {
                            Ok(w) => w,
                            Err(e) => return (false, Err(e)),
                        };
                        let r = match catch_unwind(AssertUnwindSafe(|| work(&w))) {
                            Ok(r) => r,
                            Err(p) => Err(Error::Remote { peer: format!("worker {rank}"), message: panic_message(&p) }),
                        };
                        let fin = w.finish(r.as_ref().err().map(|e| e.to_string()));
                        (true, r.and_then(|v| fin.map(|()| v)))
                    })
                    .expect("spawning a worker thread")
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| (false, Err(Error::ShuttingDown)))).collect()
    });
    // The scheduler has seen every worker finish only if they all joined.
    let all_joined = results.iter().all(|(joined, _)| *joined);
    let job = if all_joined { sched.wait() } else { Ok(()) };
    drop(servers);
    let mut out = Vec::with_capacity(results.len());
    for (_, r) in results {
        out.push(r?);
    }
    job?;
    Ok(out)
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else if let Some(s) = p.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked".into()
    }
}
