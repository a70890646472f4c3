//! Helpers shared by the multi-process tests: processes killed on drop,
//! temporary directories, and a scheduler with its servers.
#![allow(dead_code)]

pub mod via;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_pserver");
pub const DEADLINE: Duration = Duration::from_secs(120);

/// A child process killed on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd.stdin(Stdio::null()).spawn().unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Proc { name: name.into(), child }
    }

    /// Waits for exit until `deadline`; panics on timeout.
    pub fn wait(&mut self, deadline: Instant) -> ExitStatus {
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "{} did not finish in time", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pserver-mp-{tag}-{}-{:?}", std::process::id(), Instant::now()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn read_addr(path: &Path, owner: &mut Proc, deadline: Instant) -> String {
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && !s.trim().is_empty()
        {
            return s.trim().to_string();
        }
        if let Some(st) = owner.child.try_wait().unwrap() {
            panic!("{} exited ({st}) before writing its address", owner.name);
        }
        assert!(Instant::now() < deadline, "{} never wrote its address", owner.name);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The RDMA device, or `None` after printing why the test is SKIPPED;
/// with `PSERVER_TEST_REQUIRE_RDMA` set (CI inside the soft-RoCE VM) a
/// missing device fails the test instead.
pub fn rdma_device_or_skip() -> Option<std::sync::Arc<pserver::transport::rdma::Rdma>> {
    match pserver::transport::rdma::device() {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(
                std::env::var_os("PSERVER_TEST_REQUIRE_RDMA").is_none(),
                "PSERVER_TEST_REQUIRE_RDMA is set, but: {e}"
            );
            eprintln!("SKIPPED: no usable RDMA device: {e}");
            None
        }
    }
}

pub fn uring_works() -> bool {
    pserver::transport::tcp::Tcp::new(pserver::transport::tcp::IoMode::Auto, Default::default()).resolved_mode()
        == pserver::transport::tcp::IoMode::Uring
}

/// A fresh job token in hex, as tools/launch makes one.
pub fn new_token() -> String {
    pserver::transport::auth::Token::generate().unwrap().to_hex()
}

pub struct Job {
    pub dir: PathBuf,
    pub io: &'static str,
    /// The job's secret: every process of the job gets it as PSERVER_TOKEN.
    pub token: String,
    pub scheduler: Proc,
    pub servers: Vec<Proc>,
    pub addr: String,
    pub server_addrs: Vec<String>,
    /// What the servers were started with (a server added later gets it too).
    server_args: Vec<String>,
    server_env: Vec<(String, String)>,
}

pub fn start_job(io: &'static str, servers: u32, workers: u32, tag: &str, deadline: Instant) -> Job {
    start_job_args(io, servers, workers, tag, deadline, &[], &[])
}

/// [`start_job`] with servers started with `--transport transport`.
pub fn start_job_over(
    io: &'static str,
    transport: Option<&str>,
    servers: u32,
    workers: u32,
    tag: &str,
    deadline: Instant,
) -> Job {
    let args: Vec<&str> = transport.map(|t| ["--transport", t]).into_iter().flatten().collect();
    start_job_args(io, servers, workers, tag, deadline, &[], &args)
}

/// [`start_job_over`] with more arguments for the scheduler.
pub fn start_job_with(
    io: &'static str,
    transport: Option<&str>,
    servers: u32,
    workers: u32,
    tag: &str,
    deadline: Instant,
    scheduler_args: &[&str],
) -> Job {
    let args: Vec<&str> = transport.map(|t| ["--transport", t]).into_iter().flatten().collect();
    start_job_args(io, servers, workers, tag, deadline, scheduler_args, &args)
}

/// A job whose scheduler and servers get extra arguments.
pub fn start_job_args(
    io: &'static str,
    servers: u32,
    workers: u32,
    tag: &str,
    deadline: Instant,
    scheduler_args: &[&str],
    server_args: &[&str],
) -> Job {
    start_job_env(io, servers, workers, tag, deadline, scheduler_args, server_args, &[])
}

/// [`start_job_args`] with more environment for the servers (`RUST_LOG`, say).
#[allow(clippy::too_many_arguments)]
pub fn start_job_env(
    io: &'static str,
    servers: u32,
    workers: u32,
    tag: &str,
    deadline: Instant,
    scheduler_args: &[&str],
    server_args: &[&str],
    server_env: &[(&str, &str)],
) -> Job {
    let dir = tempdir(tag);
    let token = new_token();
    let af = dir.join("scheduler.addr");
    let mut scheduler = Proc::spawn(
        "scheduler",
        Command::new(BIN)
            .args(["scheduler", "--bind", "127.0.0.1:0", "--servers", &servers.to_string()])
            .args(["--workers", &workers.to_string(), "--addr-file"])
            .arg(&af)
            .args(scheduler_args)
            .env("PSERVER_IO", io)
            .env("PSERVER_TOKEN", &token)
            .stderr(std::fs::File::create(dir.join("scheduler.log")).unwrap()),
    );
    let addr = read_addr(&af, &mut scheduler, deadline);
    let mut job = Job {
        dir,
        io,
        token,
        scheduler,
        servers: Vec::new(),
        addr,
        server_addrs: Vec::new(),
        server_args: server_args.iter().map(|s| s.to_string()).collect(),
        server_env: server_env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    };
    for _ in 0..servers {
        job.add_server(deadline);
    }
    job
}

impl Job {
    /// Starts one more server registering with the scheduler (while the job
    /// runs: it joins); its log is `server{i}.log`. Returns its index.
    pub fn add_server(&mut self, deadline: Instant) -> usize {
        self.add_server_with(deadline, &[])
    }

    /// [`Job::add_server`] with more arguments for the new server.
    #[allow(dead_code)]
    pub fn add_server_with(&mut self, deadline: Instant, extra: &[&str]) -> usize {
        let i = self.servers.len();
        let f = self.dir.join(format!("server{i}.addr"));
        let mut p = Proc::spawn(
            &format!("server {i}"),
            Command::new(BIN)
                .args(["server", "--scheduler", &self.addr, "--addr-file"])
                .arg(&f)
                .args(&self.server_args)
                .args(extra)
                .envs(self.server_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .env("PSERVER_IO", self.io)
                .env("PSERVER_TOKEN", &self.token)
                .stderr(std::fs::File::create(self.dir.join(format!("server{i}.log"))).unwrap()),
        );
        self.server_addrs.push(read_addr(&f, &mut p, deadline));
        self.servers.push(p);
        i
    }

    /// The command of worker `rank` of `workers`: `pserver ARGS` with the
    /// job's environment, as tools/launch sets it.
    pub fn worker_command(&self, rank: u32, workers: u32, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("PSERVER_IO", self.io)
            .env("PSERVER_TOKEN", &self.token)
            .env("PSERVER_ROLE", "worker")
            .env("PSERVER_RANK", rank.to_string())
            .env("PSERVER_SCHEDULER", &self.addr)
            .env("PSERVER_NUM_SERVERS", self.servers.len().to_string())
            .env("PSERVER_NUM_WORKERS", workers.to_string());
        c
    }

    pub fn worker(&self, rank: u32, workers: u32, args: &[&str]) -> Proc {
        Proc::spawn(&format!("worker {rank}"), &mut self.worker_command(rank, workers, args))
    }

    /// Waits for the workers, then for the scheduler and servers to end by
    /// themselves, and asserts everything exited 0.
    pub fn finish(self, workers: Vec<Proc>, deadline: Instant) {
        let dir = self.dir.clone();
        self.finish_keeping_dir(workers, deadline);
        let _ = std::fs::remove_dir_all(&dir);
    }

    pub fn finish_keeping_dir(mut self, mut workers: Vec<Proc>, deadline: Instant) {
        for w in &mut workers {
            let st = w.wait(deadline);
            assert!(st.success(), "{} failed: {st}", w.name);
        }
        let st = self.scheduler.wait(deadline);
        assert!(st.success(), "scheduler failed: {st}\n{}", self.log("scheduler"));
        for (i, s) in self.servers.iter_mut().enumerate() {
            let st = s.wait(deadline);
            let log = std::fs::read_to_string(self.dir.join(format!("server{i}.log"))).unwrap_or_default();
            assert!(st.success(), "{} failed: {st}\n{log}", s.name);
        }
    }

    /// What a node of the job wrote to stderr so far ("scheduler", "server0", ...).
    pub fn log(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{node}.log"))).unwrap_or_default()
    }
}
