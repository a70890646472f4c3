//! The `pserver` binary: one executable, a subcommand per role or tool
//! (DESIGN section 8). Every option can also be set through its `PSERVER_*`
//! environment variable, so launchers only set variables.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use pserver::apps::Rows;
use pserver::apps::lr::{self, Iteration, LrConfig};
use pserver::apps::rica::{self, RicaConfig};
use pserver::bench::{self, Baseline, Case, Memcpy, Op, PlainTcp, RawRdma};
use pserver::data::{CtrConfig, FeatureMode, LabelModel, Shard, Source};
use pserver::job::{self, JobConfig, LaunchEnv, transport_named};
use pserver::metrics::MetricsServer;
use pserver::scheduler::{SchedulerConfig, SchedulerNode};
use pserver::server::{ServerConfig, ServerNode};
use pserver::transport::Limits;
use pserver::transport::auth::Auth;
use pserver::transport::tcp::{IoMode, Tcp};
use pserver::worker::{OneSided, ShmMode, WorkerConfig};

#[derive(Parser)]
#[command(name = "pserver", version, about = "A parameter server for distributed machine learning")]
struct Cli {
    #[command(flatten)]
    auth: AuthArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

/// How a node proves it belongs to the job. The token itself is read from
/// PSERVER_TOKEN (hex) or a file, never from the command line, where `ps`
/// would show it.
#[derive(Args)]
struct AuthArgs {
    /// File with the job token in hex, readable only by its owner (PSERVER_TOKEN takes precedence).
    #[arg(long, global = true, env = "PSERVER_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Without a token, accept and make unauthenticated connections (trusted networks only).
    #[arg(long, global = true, env = "PSERVER_INSECURE", value_parser = clap::builder::BoolishValueParser::new())]
    insecure: bool,
}

impl AuthArgs {
    /// The job token (or `--insecure`); an error saying how to set one when
    /// there is neither.
    fn resolve(&self) -> Result<Auth> {
        Ok(Auth::resolve(self.token_file.as_deref(), self.insecure)?)
    }
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
    /// Train a model (L1 logistic regression, Reconstruction ICA).
    #[command(subcommand)]
    Train(TrainApp),
    /// Generate synthetic data.
    #[command(subcommand)]
    Gen(GenWhat),
    /// Show a running job: nodes, health, key ranges, clocks, traffic.
    Status(StatusArgs),
}

#[derive(Args)]
struct StatusArgs {
    /// The scheduler's address.
    #[arg(long, env = "PSERVER_SCHEDULER")]
    scheduler: String,
    /// Print the status as one JSON object.
    #[arg(long)]
    json: bool,
    /// Seconds to wait for the scheduler's answer.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

#[derive(Subcommand)]
enum GenWhat {
    /// Click-through-like LIBSVM data: power-law features, a planted sparse model, label noise.
    Ctr(GenCtrArgs),
}

#[derive(Args)]
struct GenCtrArgs {
    #[arg(long)]
    rows: u64,
    /// Size of the feature space.
    #[arg(long)]
    features: u64,
    #[arg(long, default_value_t = 20)]
    nnz_per_row: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output file (LIBSVM text).
    #[arg(long)]
    out: PathBuf,
    /// Also hold out this many rows of the same model into --test-out.
    #[arg(long, requires = "test_out")]
    test_rows: Option<u64>,
    #[arg(long)]
    test_out: Option<PathBuf>,
    /// Power-law exponent of feature popularity.
    #[arg(long, default_value_t = 1.1)]
    alpha: f64,
    /// Probability of flipping a label (noise).
    #[arg(long, default_value_t = 0.05)]
    flip: f64,
}

#[derive(Subcommand)]
enum TrainApp {
    /// L1-regularized logistic regression by delayed block proximal gradient.
    Lr(TrainLrArgs),
    /// Reconstruction ICA on natural image patches.
    Rica(TrainRicaArgs),
}

#[derive(Args)]
struct TrainLrArgs {
    /// LIBSVM training data: one file (workers read byte ranges) or several (workers read whole files).
    #[arg(long, num_args = 1.., required_unless_present = "synthetic")]
    data: Vec<PathBuf>,
    /// LIBSVM test data (accuracy and AUC each iteration).
    #[arg(long)]
    test: Option<PathBuf>,
    /// Generate click-through-like data (train and held-out test) instead of reading files.
    #[arg(long, conflicts_with = "data")]
    synthetic: bool,
    /// Synthetic rows (10% held out for testing).
    #[arg(long, default_value_t = 200_000)]
    rows: u64,
    /// Synthetic feature space.
    #[arg(long, default_value_t = 100_000)]
    features: u64,
    #[arg(long, default_value_t = 20)]
    nnz_per_row: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where synthetic data goes (default: a temporary directory, removed afterwards).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 1.0)]
    lambda: f32,
    /// Maximal delay in clocks (0: sequential).
    #[arg(long, default_value_t = 0)]
    tau: u32,
    /// Maximal passes over the data.
    #[arg(long, default_value_t = 100)]
    iters: u32,
    /// Stop when a pass improves the objective by less than this (relative).
    #[arg(long, default_value_t = 1e-5)]
    tol: f64,
    /// Features per block (one block per clock).
    #[arg(long, default_value_t = 2048)]
    block_size: u64,
    /// Add a bias feature (regularized like the others, as liblinear -B 1 does).
    #[arg(long)]
    bias: bool,
    /// Hash feature indices into 2^BITS ids.
    #[arg(long)]
    hash_bits: Option<u32>,
    /// Keep a binary cache of parsed data here (much faster reloads).
    #[arg(long, env = "PSERVER_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// KKT filter margin delta.
    #[arg(long, default_value_t = 1e-3)]
    kkt_delta: f32,
    #[arg(long)]
    no_kkt: bool,
    #[arg(long)]
    no_key_cache: bool,
    /// Refresh weights with plain pulls instead of version-filtered ones.
    #[arg(long)]
    no_version_pull: bool,
    /// Write the final figures as one JSON object.
    #[arg(long)]
    summary_json: Option<PathBuf>,
    /// Write objective against time as SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Write the weights (one per line, feature order; the bias last).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, env = "PSERVER_TRANSPORT")]
    transport: Option<String>,
    #[command(flatten)]
    job: EmbeddedArgs,
}

#[derive(Args)]
struct TrainRicaArgs {
    /// JPEG or PNG images, or directories of them.
    #[arg(long, num_args = 1.., required = true)]
    images: Vec<PathBuf>,
    /// Write the learned filters as a PNG grid.
    #[arg(long)]
    filters_png: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    patch: usize,
    #[arg(long, default_value_t = 64)]
    filters: usize,
    /// Training patches per worker.
    #[arg(long, default_value_t = 5000)]
    patches: usize,
    #[arg(long, default_value_t = 0.3)]
    lambda: f32,
    #[arg(long, default_value_t = 500)]
    iters: u32,
    #[arg(long, default_value_t = 0.05)]
    learning_rate: f32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long)]
    summary_json: Option<PathBuf>,
    #[arg(long)]
    plot: Option<PathBuf>,
    #[arg(long, env = "PSERVER_TRANSPORT")]
    transport: Option<String>,
    #[command(flatten)]
    job: EmbeddedArgs,
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
    /// Counting mode, for fault injection: every round adds 1 to every
    /// counter and waits for the acknowledgement; at the end every counter
    /// must equal the pushes acknowledged by all workers.
    #[arg(long)]
    counting: bool,
    /// Counting mode: pause between rounds, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pace_ms: u64,
    /// Counting mode: the dense table's pushes wait under bounded delay of
    /// this many clocks (default: eventual consistency).
    #[arg(long)]
    tau: Option<u32>,
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
    /// Copies of every key range besides its owner's, on the next servers of
    /// the ring; a push is acknowledged once they have it, and a server that
    /// dies is replaced by them (default: 1 with at least 2 servers).
    #[arg(long, env = "PSERVER_REPLICAS")]
    replicas: Option<u32>,
    #[command(flatten)]
    checkpoints: CheckpointArgs,
    /// Seconds the rank of a worker that died mid-job (connection dropped or
    /// heartbeats stopped) waits for a new worker to take it (started with
    /// the same PSERVER_RANK) before the job fails; 0 fails at once.
    #[arg(long, env = "PSERVER_WORKER_RESTART_TIMEOUT", default_value_t = SchedulerConfig::default().worker_restart_timeout.as_secs_f64())]
    worker_restart_timeout: f64,
    /// Worker seats: the job starts with --workers, and a worker started
    /// later (without a PSERVER_RANK, or with a free one) takes a free seat
    /// and joins at the job's clock (default: --workers, no free seat).
    #[arg(long, env = "PSERVER_MAX_WORKERS")]
    max_workers: Option<u32>,
    /// Write the address nodes should use into this file once listening.
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// Accepted connections at once (nodes and `pserver status`).
    #[arg(long, env = "PSERVER_MAX_CONNECTIONS", default_value_t = pserver::transport::frame::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Serve Prometheus metrics of the whole job at http://HOST:PORT/metrics.
    #[arg(long, env = "PSERVER_SCHEDULER_METRICS_BIND")]
    metrics_bind: Option<String>,
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
    /// Accepted connections at once.
    #[arg(long, env = "PSERVER_MAX_CONNECTIONS", default_value_t = pserver::transport::frame::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Keys one request may carry; larger requests are refused.
    #[arg(long, env = "PSERVER_MAX_KEYS_PER_REQUEST", default_value_t = pserver::server::MAX_KEYS_PER_REQUEST)]
    max_keys_per_request: u64,
    /// Unanswered requests one connection may have; more are refused.
    #[arg(long, env = "PSERVER_MAX_PENDING_REQUESTS", default_value_t = pserver::server::MAX_PENDING_REQUESTS)]
    max_pending_requests: usize,
    /// Serve Prometheus metrics of this server at http://HOST:PORT/metrics.
    #[arg(long, env = "PSERVER_SERVER_METRICS_BIND")]
    metrics_bind: Option<String>,
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
    /// Copies of every key range besides its owner's (default: 1 with at
    /// least 2 servers).
    #[arg(long, env = "PSERVER_REPLICAS")]
    replicas: Option<u32>,
    #[command(flatten)]
    checkpoints: CheckpointArgs,
}

#[derive(Args, Clone)]
struct CheckpointArgs {
    /// Directory of checkpoints: the newest one there is restored when the
    /// job starts (a damaged one is refused), and new ones are written there.
    #[arg(long, env = "PSERVER_CHECKPOINT_DIR")]
    checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every this many clocks (with --checkpoint-dir; 0: never).
    #[arg(long, env = "PSERVER_CHECKPOINT_EVERY", default_value_t = 0)]
    checkpoint_every: u32,
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
    /// Transport between workers and servers: inproc (embedded only), tcp, shm, rdma, auto.
    #[arg(long, env = "PSERVER_TRANSPORT")]
    transport: Option<String>,
    /// Print one JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
    /// Values per key of the dense cases' tables (1: scalar keys).
    #[arg(long, default_value_t = 1)]
    dim: u32,
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
        // Warnings, and the transport each node chose (target "transport").
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,transport=info,membership=info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
    let auth = &cli.auth;
    match cli.cmd {
        Cmd::Scheduler(a) => scheduler_cmd(a, auth),
        Cmd::Server(a) => server_cmd(a, auth),
        Cmd::Bench(a) => bench_cmd(a, auth),
        Cmd::Check(a) => check_cmd(a, auth),
        Cmd::Train(TrainApp::Lr(a)) => train_lr_cmd(a, auth),
        Cmd::Train(TrainApp::Rica(a)) => train_rica_cmd(a, auth),
        Cmd::Gen(GenWhat::Ctr(a)) => gen_ctr_cmd(a),
        Cmd::Status(a) => status_cmd(a, auth),
    }
}

fn limits(max_connections: usize) -> Result<Limits> {
    if max_connections == 0 {
        bail!("--max-connections must be positive");
    }
    Ok(Limits { max_connections, ..Limits::default() })
}

/// Serves metrics at `bind` when asked to, saying where on stderr.
fn metrics(bind: Option<&str>, render: impl Fn() -> String + Send + 'static) -> Result<Option<MetricsServer>> {
    let Some(bind) = bind else { return Ok(None) };
    let m = MetricsServer::start(bind, render)?;
    eprintln!("metrics at http://{}/metrics", m.addr());
    Ok(Some(m))
}

fn scheduler_cmd(a: SchedulerArgs, auth: &AuthArgs) -> Result<()> {
    let t = Tcp::new(IoMode::from_env()?, limits(a.max_connections)?).with_auth(auth.resolve()?);
    let worker_restart_timeout = Duration::try_from_secs_f64(a.worker_restart_timeout).map_err(|_| {
        anyhow::anyhow!("--worker-restart-timeout {}: not a number of seconds >= 0", a.worker_restart_timeout)
    })?;
    let cfg = SchedulerConfig {
        servers: a.servers,
        workers: a.workers,
        vnodes: a.vnodes,
        replicas: a.replicas,
        checkpoint_dir: a.checkpoints.checkpoint_dir.clone(),
        checkpoint_every: a.checkpoints.checkpoint_every,
        worker_restart_timeout,
        max_workers: a.max_workers.unwrap_or(0),
        ..SchedulerConfig::default()
    };
    let node = Arc::new(
        SchedulerNode::start(&t, &a.bind, cfg).with_context(|| format!("starting the scheduler on {}", a.bind))?,
    );
    let n2 = node.clone();
    let _metrics = metrics(a.metrics_bind.as_deref(), move || pserver::metrics::render_job(&n2.status()))?;
    let addr = node.addr();
    if let Some(path) = &a.addr_file {
        write_atomically(path, &addr)?;
    }
    tracing::info!(%addr, servers = a.servers, workers = a.workers, "scheduler listening");
    node.wait().context("the job failed")?;
    Ok(())
}

fn status_cmd(a: StatusArgs, auth: &AuthArgs) -> Result<()> {
    let t = Tcp::new(IoMode::from_env()?, Limits::default()).with_auth(auth.resolve()?);
    let s = pserver::status::query(&t, &a.scheduler, Duration::from_secs(a.timeout.max(1)))
        .with_context(|| format!("asking the scheduler at {} for the job's status", a.scheduler))?;
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        print!("{}", pserver::status::render(&s));
    }
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

fn gen_ctr_cmd(a: GenCtrArgs) -> Result<()> {
    let cfg = CtrConfig {
        rows: a.rows,
        features: a.features,
        nnz_per_row: a.nnz_per_row,
        seed: a.seed,
        alpha: a.alpha,
        labels: LabelModel::Threshold { flip: a.flip },
        ..CtrConfig::default()
    };
    match (a.test_rows, &a.test_out) {
        (Some(t), Some(out)) => {
            let (train, test) = pserver::data::gen_ctr_split(&cfg, t, &a.out, out)?;
            println!("{}: {train}", a.out.display());
            println!("{}: {test}", out.display());
        }
        _ => println!("{}: {}", a.out.display(), pserver::data::gen_ctr_file(&cfg, &a.out)?),
    }
    Ok(())
}

/// How a command runs: as one worker of a launched job, or as an embedded job.
enum Mode {
    Launched(LaunchEnv, OneSided),
    Embedded(JobConfig),
}

/// The transport is `inproc` for an embedded job and `tcp` for a launched
/// worker unless `--transport` (or PSERVER_TRANSPORT) says otherwise. A
/// launched worker authenticates with the job's token; an embedded job over
/// TCP makes up a token of its own.
fn mode(
    transport: &Option<String>,
    job: &EmbeddedArgs,
    auth: &AuthArgs,
) -> Result<(Mode, Arc<dyn pserver::transport::Transport>)> {
    let launched = LaunchEnv::worker_from_env()?;
    let name = transport.clone().unwrap_or_else(|| if launched.is_some() { "tcp" } else { "inproc" }.into());
    let auth = if launched.is_some() { auth.resolve()? } else { Auth::generate()? };
    let (t, shm) = transport_named(&name, launched.is_none(), auth, Limits::default())?;
    Ok(match launched {
        Some(env) => (Mode::Launched(env, shm), t),
        None => (
            Mode::Embedded(JobConfig {
                servers: job.servers,
                workers: job.workers,
                lanes: job.lanes,
                replicas: job.replicas,
                checkpoint_dir: job.checkpoints.checkpoint_dir.clone(),
                checkpoint_every: job.checkpoints.checkpoint_every,
                transport: t.clone(),
                worker: WorkerConfig { shm: shm.shm, rdma: shm.rdma, ..WorkerConfig::default() },
                ..JobConfig::default()
            }),
            t,
        ),
    })
}

/// Runs `work` on this process's workers; returns (rank, result) of each.
fn run_workers<T: Send>(
    mode: Mode,
    t: &dyn pserver::transport::Transport,
    work: impl Fn(&pserver::Worker) -> pserver::Result<T> + Sync,
) -> Result<Vec<(u32, T)>> {
    Ok(match mode {
        Mode::Launched(env, shm) => {
            let w = env.connect(t, shm)?;
            let r = work(&w);
            w.finish(r.as_ref().err().map(|e| e.to_string()))?;
            vec![(w.rank(), r?)]
        }
        Mode::Embedded(cfg) => job::run(cfg, |w| work(w).map(|r| (w.rank(), r)))?,
    })
}

/// Rank 0's result, when rank 0 ran in this process.
fn rank0<T>(v: Vec<(u32, T)>) -> Option<T> {
    v.into_iter().find(|(r, _)| *r == 0).map(|(_, t)| t)
}

fn human_bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GB", b as f64 / 1e9)
    } else if b >= 1 << 20 {
        format!("{:.1} MB", b as f64 / 1e6)
    } else {
        format!("{:.1} kB", b as f64 / 1e3)
    }
}

fn progress(iters: u32) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(u64::from(iters));
    pb.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} passes {elapsed} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb
}

fn train_lr_cmd(a: TrainLrArgs, auth: &AuthArgs) -> Result<()> {
    let (mode, t) = mode(&a.transport, &a.job, auth)?;
    let feature_mode = match a.hash_bits {
        Some(b) => FeatureMode::hashed(b)?,
        None => FeatureMode::Direct,
    };
    // Synthetic data: generated once per process (deterministic by seed).
    let mut tmp = None;
    let (data, test) = if a.synthetic {
        let dir = match &a.out_dir {
            Some(d) => d.clone(),
            None => {
                let d = std::env::temp_dir().join(format!("pserver-lr-{}", std::process::id()));
                tmp = Some(d.clone());
                d
            }
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let cfg = CtrConfig {
            rows: a.rows,
            features: a.features,
            nnz_per_row: a.nnz_per_row,
            seed: a.seed,
            ..CtrConfig::default()
        };
        let (train, test) = (dir.join("train.libsvm"), dir.join("test.libsvm"));
        let (s1, s2) = pserver::data::gen_ctr_split(&cfg, (a.rows / 10).max(1), &train, &test)?;
        eprintln!(
            "generated {} training and {} test rows, {} features ({})",
            s1.rows,
            s2.rows,
            a.features,
            dir.display()
        );
        (vec![train], Some(test))
    } else {
        (a.data.clone(), a.test.clone())
    };
    let source = if data.len() == 1 { Source::File(data[0].clone()) } else { Source::Files(data.clone()) };
    let cfg = LrConfig {
        lambda: a.lambda,
        tau: a.tau,
        iters: a.iters,
        tol: a.tol,
        block_size: a.block_size,
        bias: a.bias,
        kkt_delta: (!a.no_kkt).then_some(a.kkt_delta),
        key_cache: !a.no_key_cache,
        version_pull: !a.no_version_pull,
        ..LrConfig::default()
    };
    let pb = progress(a.iters);
    let printed = std::sync::Mutex::new(());
    let result = run_workers(mode, t.as_ref(), |w| {
        let shard = Shard::new(w.rank(), w.num_workers())?;
        let ds = match &a.cache_dir {
            Some(dir) => pserver::data::load_or_build(&source, shard, feature_mode, dir)?.0,
            None => pserver::data::read(&source, shard, feature_mode)?,
        };
        let test_ds = match (&test, w.rank()) {
            (Some(p), 0) => Some(pserver::data::read(&Source::File(p.clone()), Shard::WHOLE, feature_mode)?),
            _ => None,
        };
        let rows = rows_of(&ds);
        let test_rows = test_ds.as_ref().map(rows_of);
        let mut on_iter = |it: &Iteration| {
            let _g = printed.lock();
            let eval = match (it.accuracy, it.auc) {
                (Some(acc), Some(auc)) => format!("  accuracy {acc:.4}  auc {auc:.4}"),
                _ => String::new(),
            };
            pb.suspend(|| {
                println!(
                    "iter {:3}  objective {:.6e}  nnz {:8}{eval}  {:6.2}s  pushed {}  pulled {}",
                    it.iteration,
                    it.objective,
                    it.nnz,
                    it.seconds,
                    human_bytes(it.bytes_pushed),
                    human_bytes(it.bytes_pulled)
                )
            });
            pb.set_position(u64::from(it.iteration));
            pb.set_message(format!("objective {:.6e}", it.objective));
        };
        if let Some(c) = w.restarted() {
            eprintln!("worker {} took the place of a lost one: training continues from clock {c}", w.rank());
        } else if let Some(c) = w.resumed_from() {
            eprintln!("worker {}: the job was restored from a checkpoint; training continues from clock {c}", w.rank());
        }
        let r = lr::train(w, rows, test_rows, &cfg, &mut on_iter)?;
        Ok((r, w.filter_stats(cfg.table_base + 1)))
    })?;
    let result = rank0(result);
    pb.finish_and_clear();
    if let Some(d) = tmp {
        let _ = std::fs::remove_dir_all(d);
    }
    let Some((r, fstats)) = result else { return Ok(()) };
    let last = r.iterations.last().cloned().unwrap_or_default();
    println!(
        "trained L1 logistic regression: objective {:.6e} after {} passes in {:.2}s ({}), {} non-zero weights{}",
        last.objective,
        last.iteration,
        last.seconds,
        if r.converged { "converged" } else { "pass limit" },
        last.nnz,
        match (last.accuracy, last.auc) {
            (Some(acc), Some(auc)) => format!(", test accuracy {acc:.4}, AUC {auc:.4}"),
            _ => String::new(),
        }
    );
    let kkt: u64 = r.iterations.iter().map(|i| i.kkt_skipped).sum();
    println!(
        "traffic: pushed {}, pulled {}; filters (rank 0): KKT skipped {kkt} feature updates (all workers), \
         key caching saved {}, version-filtered pulls saved {} net",
        human_bytes(last.bytes_pushed),
        human_bytes(last.bytes_pulled),
        human_bytes(fstats.key_cache_bytes_saved),
        human_bytes((fstats.version_bytes_saved as i64 - fstats.version_bytes_overhead as i64).max(0) as u64)
    );
    if let Some(p) = &a.summary_json {
        let j = serde_json::json!({
            "objective": last.objective,
            "nnz": last.nnz,
            "accuracy": last.accuracy,
            "auc": last.auc,
            "seconds": last.seconds,
            "iterations": last.iteration,
            "bytes_pushed": last.bytes_pushed,
            "bytes_pulled": last.bytes_pulled,
            "converged": r.converged,
            "kkt_skipped": kkt,
            "key_cache_bytes_saved_rank0": fstats.key_cache_bytes_saved,
            "version_pull_bytes_saved_rank0": fstats.version_bytes_saved,
            "version_pull_bytes_overhead_rank0": fstats.version_bytes_overhead,
            "lambda": a.lambda,
            "tau": a.tau,
        });
        std::fs::write(p, format!("{j}\n")).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.plot {
        let pts: Vec<(f64, f64)> = r.iterations.iter().map(|i| (i.seconds, i.objective)).collect();
        pserver::apps::plot::write_svg(p, "L1 logistic regression", "seconds", "objective", &pts)?;
    }
    if let (Some(p), Some(wv)) = (&a.model, &r.weights) {
        let text: String = wv.iter().map(|x| format!("{x}\n")).collect();
        std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn rows_of(d: &pserver::data::Dataset) -> Rows<'_> {
    Rows { labels: d.labels(), offsets: d.offsets(), features: d.features(), values: d.values() }
}

fn train_rica_cmd(a: TrainRicaArgs, auth: &AuthArgs) -> Result<()> {
    let (mode, t) = mode(&a.transport, &a.job, auth)?;
    let images = rica::load_images(&a.images)?;
    let cfg = RicaConfig {
        patch: a.patch,
        filters: a.filters,
        patches: a.patches,
        lambda: a.lambda,
        iters: a.iters,
        learning_rate: a.learning_rate,
        seed: a.seed,
        ..RicaConfig::default()
    };
    if cfg.patch == 0 || cfg.filters == 0 || cfg.patches == 0 || cfg.iters == 0 {
        bail!("--patch, --filters, --patches and --iters must be positive");
    }
    let n = cfg.patch * cfg.patch;
    // The same whitening on every worker: from a sample fixed by the seed.
    let common = rica::sample_patches(&images, cfg.patch, 20_000, cfg.seed ^ 0xC0FFEE)?;
    let zca = rica::zca(&common, n);
    eprintln!("{} images; {}x{} patches, {} filters", images.len(), cfg.patch, cfg.patch, cfg.filters);
    let pb = progress(cfg.iters);
    let result = run_workers(mode, t.as_ref(), |w| {
        let mut p =
            rica::sample_patches(&images, cfg.patch, cfg.patches, cfg.seed.wrapping_add(1 + u64::from(w.rank())))?;
        rica::whiten(&mut p, &zca, n);
        let total = cfg.patches * w.num_workers() as usize;
        rica::train(w, &p, total, &cfg, &mut |it| {
            if it.iteration == 1 || it.iteration % 25 == 0 || it.iteration == cfg.iters {
                pb.suspend(|| {
                    println!(
                        "iter {:4}  objective {:.5}  (sparsity {:.5}, reconstruction {:.5})  {:.2}s",
                        it.iteration, it.objective, it.sparsity, it.reconstruction, it.seconds
                    )
                });
            }
            pb.set_position(u64::from(it.iteration));
            pb.set_message(format!("objective {:.5}", it.objective));
        })
    })?;
    let result = rank0(result);
    pb.finish_and_clear();
    let Some(r) = result else { return Ok(()) };
    let last = r.iterations.last().cloned().unwrap_or_default();
    println!(
        "trained RICA: objective {:.5} after {} iterations in {:.2}s",
        last.objective, last.iteration, last.seconds
    );
    if let (Some(p), Some(f)) = (&a.filters_png, &r.filters) {
        rica::write_filters_png(f, cfg.patch, 4, p)?;
        println!("filters written to {}", p.display());
    }
    if let Some(p) = &a.summary_json {
        let j = serde_json::json!({
            "objective": last.objective,
            "sparsity": last.sparsity,
            "reconstruction": last.reconstruction,
            "iterations": last.iteration,
            "seconds": last.seconds,
            "first_objective": r.iterations.first().map(|i| i.objective),
        });
        std::fs::write(p, format!("{j}\n")).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.plot {
        let pts: Vec<(f64, f64)> = r.iterations.iter().map(|i| (i.seconds, i.objective)).collect();
        pserver::apps::plot::write_svg(p, "Reconstruction ICA", "seconds", "objective", &pts)?;
    }
    Ok(())
}

fn check_cmd(a: CheckArgs, auth: &AuthArgs) -> Result<()> {
    if a.keys == 0 || a.dim == 0 || a.rounds == 0 {
        bail!("--keys, --dim and --rounds must be positive");
    }
    let (mode, t) = mode(&a.transport, &a.job, auth)?;
    if a.counting {
        let pace = Duration::from_millis(a.pace_ms);
        let reports = run_workers(mode, t.as_ref(), |w| pserver::check::counting(w, a.keys, a.rounds, pace, a.tau))?;
        for (rank, r) in reports {
            // Restarted workers redo their resume clock's round; its pushes
            // apply only where their predecessor's did not.
            let counters = if r.restarts == 0 {
                format!("every counter = {}", r.counter)
            } else {
                format!("every counter = {} (restarts {}; redone pushes applied once)", r.counter, r.restarts)
            };
            let resumed = match (r.resumed, r.joined) {
                (Some(c), _) => format!("resumed at clock {c}, "),
                (_, Some(c)) => format!("joined at clock {c}, "),
                _ => String::new(),
            };
            let t = &r.traffic;
            println!(
                "counting passed on worker {rank}: {} pushes acknowledged, {counters}, {resumed}\
                 one-sided: shm_pulls={} rdma_pulls={} rdma_frames={} final_pull={}, \
                 slowest acknowledgement {:.1} ms, epoch {}",
                r.acked,
                t.shm_pulls,
                t.rdma_pulls,
                t.rdma_frames,
                if r.final_one_sided { "one-sided" } else { "network" },
                r.slowest_ms,
                r.epoch
            );
        }
        return Ok(());
    }
    let reports = run_workers(mode, t.as_ref(), |w| pserver::check::run(w, a.keys, a.dim, a.rounds))?;
    for (rank, r) in reports {
        let t = &r.traffic;
        println!(
            "check passed on worker {rank}: {} values verified after {} pushes \
             (one-sided: shm_pulls={} rdma_pulls={} rdma_frames={})",
            r.keys_checked, r.pushes, t.shm_pulls, t.rdma_pulls, t.rdma_frames
        );
    }
    Ok(())
}

fn server_cmd(a: ServerArgs, auth: &AuthArgs) -> Result<()> {
    let (t, shm) = transport_named(&a.transport, false, auth.resolve()?, limits(a.max_connections)?)?;
    let local = a.scheduler.starts_with("127.") || a.scheduler.starts_with("localhost:");
    let bind = a.bind.clone().unwrap_or_else(|| if local { "127.0.0.1:0".into() } else { "0.0.0.0:0".into() });
    let max_memory = match &a.max_memory {
        Some(m) => Some(bench::parse_size(m).with_context(|| format!("--max-memory {m:?} is not a size"))? as u64),
        None => None,
    };
    if a.max_keys_per_request == 0 || a.max_pending_requests == 0 {
        bail!("--max-keys-per-request and --max-pending-requests must be positive");
    }
    let cfg = ServerConfig {
        lanes: a.lanes,
        max_memory,
        rank: a.rank,
        shm: shm.shm != ShmMode::Off,
        rdma: shm.rdma,
        max_keys_per_request: a.max_keys_per_request,
        max_pending: a.max_pending_requests,
        ..ServerConfig::default()
    };
    let node = Arc::new(
        ServerNode::start(t.as_ref(), &bind, &a.scheduler, cfg)
            .with_context(|| format!("starting a server registered with {}", a.scheduler))?,
    );
    let n2 = node.clone();
    let _metrics = metrics(a.metrics_bind.as_deref(), move || pserver::metrics::render_server(&n2.report()))?;
    if let Some(path) = &a.addr_file {
        write_atomically(path, &node.addr())?;
    }
    let rank = node.wait_welcome(Duration::from_secs(a.join_timeout))?;
    tracing::info!(rank, addr = %node.addr(), "server running");
    // SIGTERM (and SIGINT): leave the job gracefully, handing the ranges to
    // their replicas, instead of dying.
    let node = std::sync::Arc::new(node);
    let term = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, term.clone()).context("installing the SIGTERM handler")?;
    }
    let watcher = {
        let (node, term) = (node.clone(), term.clone());
        std::thread::spawn(move || {
            while !term.load(std::sync::atomic::Ordering::Acquire) {
                if node.is_stopping() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            tracing::info!(rank, "SIGTERM: leaving the job");
            let r = node.leave(Duration::from_secs(60));
            node.stop();
            r
        })
    };
    node.wait();
    let r = node.report();
    tracing::info!(
        target: "membership",
        rank,
        epoch = r.epoch,
        pushes = r.pushes + r.push_pulls,
        pulls = r.pulls + r.push_pulls,
        "server stopped"
    );
    if let Some(why) = node.failure() {
        bail!("server {rank} stopped: {why}");
    }
    match watcher.join() {
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("leaving the job")),
        _ => Ok(()),
    }
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

fn bench_cmd(a: BenchArgs, auth: &AuthArgs) -> Result<()> {
    let cases = bench_cases(&a)?;
    if !(a.seconds > 0.0 && a.seconds.is_finite()) {
        bail!("--seconds must be positive");
    }
    let name = a
        .transport
        .clone()
        .unwrap_or_else(|| if std::env::var_os("PSERVER_ROLE").is_some() { "tcp" } else { "inproc" }.into());
    let label = if name == "auto" { "tcp".to_string() } else { name.clone() };
    // Shared memory and in-process pulls are measured against memcpy, the
    // network against a plain socket pair.
    let make_baseline = || -> Box<dyn Baseline> {
        match name.as_str() {
            "inproc" | "shm" => Box::new(Memcpy),
            "rdma" => Box::new(RawRdma),
            _ => Box::new(PlainTcp),
        }
    };
    let transport = Some(name.clone());
    let (mode, t) = mode(&transport, &a.job, auth)?;
    if let (Mode::Embedded(cfg), false) = (&mode, a.json) {
        eprintln!(
            "pserver bench: embedded job, {} servers, {} workers, transport {label}, {} s per case",
            cfg.servers, cfg.workers, a.seconds
        );
    }
    let results = rank0(run_workers(mode, t.as_ref(), |w| {
        bench::run(w, &cases, a.seconds, &label, make_baseline().as_mut(), a.dim)
    })?)
    .unwrap_or_default();
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
