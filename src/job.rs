//! The embedded job (DESIGN section 8): scheduler, servers and workers as
//! threads of one process, connected by a transport exactly as separate
//! processes would be (the in-process transport by default).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::scheduler::{SchedulerConfig, SchedulerNode};
use crate::server::{ServerConfig, ServerNode};
use crate::transport::Transport;
use crate::transport::auth::Auth;
use crate::transport::inproc::Inproc;
use crate::transport::rdma::RdmaMode;
use crate::updater::Rules;
use crate::worker::{OneSided, ShmMode, Worker, WorkerConfig};

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
    /// Copies of every range besides its owner's (`None`: 1 with at least
    /// 2 servers).
    pub replicas: Option<u32>,
    /// Where checkpoints go (the newest one there is restored at the start).
    pub checkpoint_dir: Option<std::path::PathBuf>,
    /// Checkpoint every this many clocks (0: never).
    pub checkpoint_every: u32,
    /// How long a lost worker's rank waits for a new incarnation (see
    /// [`SchedulerConfig::worker_restart_timeout`]).
    pub worker_restart_timeout: std::time::Duration,
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
            replicas: None,
            checkpoint_dir: None,
            checkpoint_every: 0,
            worker_restart_timeout: crate::scheduler::WORKER_RESTART_TIMEOUT,
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
    pub fn replicas(mut self, k: u32) -> Self {
        self.replicas = Some(k);
        self
    }
    /// Checkpoints into `dir` every `every` clocks, restoring the newest
    /// one found there first.
    pub fn checkpoints(mut self, dir: impl Into<std::path::PathBuf>, every: u32) -> Self {
        self.checkpoint_dir = Some(dir.into());
        self.checkpoint_every = every;
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
    let sched_cfg = SchedulerConfig {
        servers: cfg.servers,
        workers: cfg.workers,
        vnodes: cfg.vnodes,
        replicas: cfg.replicas,
        checkpoint_dir: cfg.checkpoint_dir.clone(),
        checkpoint_every: cfg.checkpoint_every,
        worker_restart_timeout: cfg.worker_restart_timeout,
        ..SchedulerConfig::default()
    };
    let sched = SchedulerNode::start(t, &cfg.scheduler_addr, sched_cfg)?;
    let saddr = sched.addr();
    let server_cfg = ServerConfig {
        lanes: cfg.lanes,
        rules: cfg.rules.clone(),
        max_memory: cfg.max_memory,
        rank: None,
        shm: cfg.worker.shm != ShmMode::Off,
        rdma: cfg.worker.rdma,
        ..ServerConfig::default()
    };
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

/// The environment a launcher gives each worker process (DESIGN section 8).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchEnv {
    pub scheduler: String,
    pub rank: Option<u32>,
    pub servers: Option<u32>,
    pub workers: Option<u32>,
    pub transport: Option<String>,
}

impl LaunchEnv {
    /// Reads `PSERVER_ROLE`, `PSERVER_SCHEDULER`, `PSERVER_RANK`,
    /// `PSERVER_NUM_SERVERS`, `PSERVER_NUM_WORKERS`, `PSERVER_TRANSPORT`.
    /// `None` when no launcher set a role: the command runs an embedded job.
    pub fn worker_from_env() -> Result<Option<LaunchEnv>> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let num = |k: &str| -> Result<Option<u32>> {
            var(k)
                .map(|v| v.parse::<u32>().map_err(|_| Error::Config(format!("{k}={v:?} is not a number"))))
                .transpose()
        };
        match var("PSERVER_ROLE").as_deref() {
            None => Ok(None),
            Some("worker") => Ok(Some(LaunchEnv {
                scheduler: var("PSERVER_SCHEDULER")
                    .ok_or_else(|| Error::Config("PSERVER_ROLE=worker but PSERVER_SCHEDULER is not set".into()))?,
                rank: num("PSERVER_RANK")?,
                servers: num("PSERVER_NUM_SERVERS")?,
                workers: num("PSERVER_NUM_WORKERS")?,
                transport: var("PSERVER_TRANSPORT"),
            })),
            Some(other) => Err(Error::Config(format!(
                "PSERVER_ROLE={other}: this command runs as a worker (use `pserver {other}` for that role)"
            ))),
        }
    }

    /// Joins the job as a worker.
    pub fn connect(&self, transport: &dyn Transport, sides: OneSided) -> Result<Worker> {
        let cfg = WorkerConfig { rank: self.rank, shm: sides.shm, rdma: sides.rdma, ..WorkerConfig::default() };
        let w = Worker::connect(transport, &self.scheduler, cfg)?;
        if let Some(n) = self.workers
            && n != w.num_workers()
        {
            return Err(Error::Config(format!(
                "PSERVER_NUM_WORKERS={n} but the scheduler runs {} workers",
                w.num_workers()
            )));
        }
        // Only a check of the launch: once servers failed, joined or left
        // (a later epoch), or for a restarted worker, the count differs.
        if let Some(n) = self.servers
            && w.epoch() == 1
            && w.restarted().is_none()
            && n as usize != w.num_servers()
        {
            return Err(Error::Config(format!(
                "PSERVER_NUM_SERVERS={n} but the scheduler has {} servers",
                w.num_servers()
            )));
        }
        Ok(w)
    }
}

/// The transport named `name` and the one-sided channels it adds:
/// `inproc` (embedded jobs only), `tcp` (network only), `shm` (TCP plus
/// shared memory, required), `rdma` (TCP plus RDMA, required: fails clearly
/// without a usable device), `auto` (RDMA where a device is usable, else
/// shared memory where a peer is on the same host, else TCP; the choice is
/// logged). TCP connections authenticate with `auth` (an embedded job passes
/// [`Auth::generate`]) under `limits`; the TCP I/O back end comes from
/// `PSERVER_IO`.
pub fn transport_named(
    name: &str,
    embedded: bool,
    auth: Auth,
    limits: crate::transport::Limits,
) -> Result<(Arc<dyn Transport>, OneSided)> {
    let tcp = || -> Result<Arc<dyn Transport>> {
        let mode = crate::transport::tcp::IoMode::from_env()?;
        Ok(Arc::new(crate::transport::tcp::Tcp::new(mode, limits).with_auth(auth.clone())))
    };
    let sides = |shm, rdma| OneSided { shm, rdma };
    match name {
        "inproc" if embedded => Ok((Arc::new(Inproc::new()), OneSided::default())),
        "inproc" => Err(Error::Config("the inproc transport only connects threads of one process".into())),
        "tcp" => Ok((tcp()?, OneSided::default())),
        "shm" => Ok((tcp()?, sides(ShmMode::Require, RdmaMode::Off))),
        "rdma" => {
            // Fail now, with the reason, rather than after joining a job.
            crate::transport::rdma::device().map_err(|e| Error::Config(format!("--transport rdma: {e}")))?;
            Ok((tcp()?, sides(ShmMode::Off, RdmaMode::Require)))
        }
        "auto" => Ok((tcp()?, sides(ShmMode::Auto, RdmaMode::Auto))),
        other => Err(Error::Config(format!("unknown transport {other:?} (inproc, tcp, shm, rdma, auto)"))),
    }
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
