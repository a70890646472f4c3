//! The `pserver` binary: one executable, a subcommand per role or tool
//! (DESIGN section 8). Every option can also be set through its `PSERVER_*`
//! environment variable, so launchers only set variables.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use pserver::bench::{self, Baseline, Case, Memcpy, Op, PlainTcp};
use pserver::job::{self, JobConfig, LaunchEnv, transport_named};
use pserver::scheduler::{SchedulerConfig, SchedulerNode};
use pserver::server::{ServerConfig, ServerNode};
use pserver::transport::tcp::Tcp;

#[derive(Parser)]
#[command(name = "pserver", version, about = "A parameter server for distributed machine learning")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a job's scheduler (control plane).
    Scheduler(SchedulerArgs),
    /// Run a server node.
    Server(ServerArgs),
    /// Measure push, pull, push-pull, sparse and latency against a same-run baseline.
    Bench(BenchArgs),
    /// Smoke-test a job: push known values from every worker and verify the sums.
    Check(CheckArgs),
}

#[derive(Args)]
struct CheckArgs {
    /// Keys per table.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Values per key.
    #[arg(long, default_value_t = 3)]
    dim: u32,
    /// Push rounds per worker.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Transport (embedded: inproc by default; launched: tcp).
    #[arg(long, env = "PSERVER_TRANSPORT")]
    transport: Option<String>,
    #[command(flatten)]
    job: EmbeddedArgs,
}

#[derive(Args)]
struct SchedulerArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "PSERVER_SCHEDULER_BIND", default_value = "127.0.0.1:0")]
    bind: String,
    /// Servers the job waits for.
    #[arg(long, env = "PSERVER_NUM_SERVERS")]
    servers: u32,
    /// Workers the job waits for.
    #[arg(long, env = "PSERVER_NUM_WORKERS")]
    workers: u32,
    /// Ring tokens per server.
    #[arg(long, env = "PSERVER_VNODES", default_value_t = SchedulerConfig::default().vnodes)]
    vnodes: u32,
    /// Write the address nodes should use into this file once listening.
    #[arg(long)]
    addr_file: Option<PathBuf>,
}

#[derive(Args)]
struct ServerArgs {
    /// The scheduler's address.
    #[arg(long, env = "PSERVER_SCHEDULER")]
    scheduler: String,
    /// Address to listen on (default: loopback when the scheduler is local,
    /// all interfaces otherwise; port 0 picks a free port).
    #[arg(long, env = "PSERVER_SERVER_BIND")]
    bind: Option<String>,
    /// Transport for workers' requests.
    #[arg(long, env = "PSERVER_TRANSPORT", default_value = "auto")]
    transport: String,
    /// Lanes (independently locked shard sets).
    #[arg(long, env = "PSERVER_LANES", default_value_t = ServerConfig::default().lanes)]
    lanes: usize,
    /// Requested rank.
    #[arg(long, env = "PSERVER_RANK")]
    rank: Option<u32>,
    /// Refuse tables beyond this many bytes of shard memory (e.g. 8GiB).
    #[arg(long, env = "PSERVER_MAX_MEMORY")]
    max_memory: Option<String>,
    /// Seconds to wait for the whole job to register.
    #[arg(long, env = "PSERVER_JOIN_TIMEOUT", default_value_t = 300)]
    join_timeout: u64,
    /// Write the address workers reach this server at into this file.
    #[arg(long)]
    addr_file: Option<PathBuf>,
}

/// The shape of an embedded job (used when no launcher set PSERVER_ROLE).
#[derive(Args, Clone)]
struct EmbeddedArgs {
    /// Servers of the embedded job.
    #[arg(long, env = "PSERVER_NUM_SERVERS", default_value_t = 2)]
    servers: u32,
    /// Workers of the embedded job.
    #[arg(long, env = "PSERVER_NUM_WORKERS", default_value_t = 2)]
    workers: u32,
    /// Lanes per server (independently locked sets of shards).
    #[arg(long, env = "PSERVER_LANES", default_value_t = ServerConfig::default().lanes)]
    lanes: usize,
}

#[derive(Args)]
struct BenchArgs {
    /// push | pull | pushpull | sparse | latency (all cases when omitted).
    #[arg(long, env = "PSERVER_BENCH_OP")]
    op: Option<String>,
    /// Value bytes per request for push, pull and pushpull (e.g. 4KiB, 1MiB).
    #[arg(long)]
    size: Option<String>,
    /// Keys per sparse request.
    #[arg(long, default_value_t = 100_000)]
    keys: usize,
    /// Seconds measured per case.
    #[arg(long, default_value_t = 0.5)]
    seconds: f64,
    /// Transport between workers and servers: inproc (embedded only), tcp, auto.
    #[arg(long, env = "PSERVER_TRANSPORT")]
    transport: Option<String>,
    /// Print one JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    job: EmbeddedArgs,
}

/// Keeps freed large buffers (frames of megabytes come and go at a high
/// rate) in the heap instead of returning them to the kernel, which would
/// make every new buffer page-fault again. glibc only; a no-op elsewhere.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Scheduler(a) => scheduler_cmd(a),
        Cmd::Server(a) => server_cmd(a),
        Cmd::Bench(a) => bench_cmd(a),
        Cmd::Check(a) => check_cmd(a),
    }
}

fn scheduler_cmd(a: SchedulerArgs) -> Result<()> {
    let t = Tcp::from_env()?;
    let cfg =
        SchedulerConfig { servers: a.servers, workers: a.workers, vnodes: a.vnodes, ..SchedulerConfig::default() };
    let node =
        SchedulerNode::start(&t, &a.bind, cfg).with_context(|| format!("starting the scheduler on {}", a.bind))?;
    let addr = node.addr();
    if let Some(path) = &a.addr_file {
        write_atomically(path, &addr)?;
    }
    tracing::info!(%addr, servers = a.servers, workers = a.workers, "scheduler listening");
    node.wait().context("the job failed")?;
    Ok(())
}

/// Writes `line` to `path` via a temporary file and a rename, so readers
/// never see a partial address.
fn write_atomically(path: &std::path::Path, line: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{line}\n")).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn check_cmd(a: CheckArgs) -> Result<()> {
    if a.keys == 0 || a.dim == 0 || a.rounds == 0 {
        bail!("--keys, --dim and --rounds must be positive");
    }
    let launched = LaunchEnv::worker_from_env()?;
    let name = a.transport.clone().unwrap_or_else(|| if launched.is_some() { "tcp" } else { "inproc" }.into());
    let transport = transport_named(&name, launched.is_none())?;
    let reports = match launched {
        Some(env) => {
            let w = env.connect(transport.as_ref())?;
            let r = pserver::check::run(&w, a.keys, a.dim, a.rounds);
            w.finish(r.as_ref().err().map(|e| e.to_string()))?;
            vec![(w.rank(), r?)]
        }
        None => {
            let cfg = JobConfig {
                servers: a.job.servers,
                workers: a.job.workers,
                lanes: a.job.lanes,
                transport,
                ..JobConfig::default()
            };
            job::run(cfg, |w| pserver::check::run(w, a.keys, a.dim, a.rounds).map(|r| (w.rank(), r)))?
        }
    };
    for (rank, r) in reports {
        println!("check passed on worker {rank}: {} values verified after {} pushes", r.keys_checked, r.pushes);
    }
    Ok(())
}

fn server_cmd(a: ServerArgs) -> Result<()> {
    let t = transport_named(&a.transport, false)?;
    let local = a.scheduler.starts_with("127.") || a.scheduler.starts_with("localhost:");
    let bind = a.bind.clone().unwrap_or_else(|| if local { "127.0.0.1:0".into() } else { "0.0.0.0:0".into() });
    let max_memory = match &a.max_memory {
        Some(m) => Some(bench::parse_size(m).with_context(|| format!("--max-memory {m:?} is not a size"))? as u64),
        None => None,
    };
    let cfg = ServerConfig { lanes: a.lanes, max_memory, rank: a.rank, ..ServerConfig::default() };
    let node = ServerNode::start(t.as_ref(), &bind, &a.scheduler, cfg)
        .with_context(|| format!("starting a server registered with {}", a.scheduler))?;
    if let Some(path) = &a.addr_file {
        write_atomically(path, &node.addr())?;
    }
    let rank = node.wait_welcome(Duration::from_secs(a.join_timeout))?;
    tracing::info!(rank, addr = %node.addr(), "server running");
    node.wait();
    Ok(())
}

fn bench_cases(a: &BenchArgs) -> Result<Vec<Case>> {
    let Some(op) = a.op.as_deref() else {
        return Ok(bench::default_cases());
    };
    let op = Op::parse(op).with_context(|| format!("unknown --op {op:?} (push, pull, pushpull, sparse, latency)"))?;
    Ok(match op {
        Op::Push | Op::Pull | Op::PushPull => {
            let size = a.size.as_deref().with_context(|| "--op push/pull/pushpull needs --size BYTES")?;
            let bytes =
                bench::parse_size(size).with_context(|| format!("--size {size:?} is not a size like 4KiB or 1MiB"))?;
            if bytes % 4 != 0 {
                bail!("--size must be a multiple of 4 bytes (one f32 per key)");
            }
            vec![Case { op, bytes, keys: 0 }]
        }
        Op::Sparse => {
            if a.keys == 0 {
                bail!("--keys must be positive");
            }
            vec![Case { op, bytes: 0, keys: a.keys }]
        }
        Op::Latency => vec![Case { op, bytes: 4, keys: 1 }],
    })
}

fn bench_cmd(a: BenchArgs) -> Result<()> {
    let cases = bench_cases(&a)?;
    if !(a.seconds > 0.0 && a.seconds.is_finite()) {
        bail!("--seconds must be positive");
    }
    let launched = LaunchEnv::worker_from_env()?;
    let name = a.transport.clone().unwrap_or_else(|| if launched.is_some() { "tcp" } else { "inproc" }.into());
    let transport = transport_named(&name, launched.is_none())?;
    let label = if name == "auto" { "tcp".to_string() } else { name.clone() };
    let make_baseline =
        || -> Box<dyn Baseline> { if name == "inproc" { Box::new(Memcpy) } else { Box::new(PlainTcp) } };
    let results = match launched {
        Some(env) => {
            let w = env.connect(transport.as_ref())?;
            let r = bench::run(&w, &cases, a.seconds, &label, make_baseline().as_mut());
            w.finish(r.as_ref().err().map(|e| e.to_string()))?;
            r?
        }
        None => {
            let cfg = JobConfig {
                servers: a.job.servers,
                workers: a.job.workers,
                lanes: a.job.lanes,
                transport: Arc::clone(&transport),
                ..JobConfig::default()
            };
            if !a.json {
                eprintln!(
                    "pserver bench: embedded job, {} servers, {} workers, transport {label}, {} s per case",
                    cfg.servers, cfg.workers, a.seconds
                );
            }
            let out = job::run(cfg, |w| bench::run(w, &cases, a.seconds, &label, make_baseline().as_mut()))?;
            out.into_iter().next().unwrap_or_default()
        }
    };
    if results.is_empty() {
        return Ok(()); // not rank 0: rank 0 prints
    }
    if a.json {
        for r in &results {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        print!("{}", bench::render(&results));
        let all = results.iter().all(|r| r.verified);
        println!("{} cases, every result verified: {}", results.len(), if all { "yes" } else { "NO" });
    }
    Ok(())
}
