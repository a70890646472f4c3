//! The `pserver` binary: one executable, a subcommand per role or tool
//! (DESIGN section 8). Every option can also be set through its `PSERVER_*`
//! environment variable, so launchers only set variables.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use pserver::bench::{self, Case, Memcpy, Op};
use pserver::job::{self, JobConfig};

#[derive(Parser)]
#[command(name = "pserver", version, about = "A parameter server for distributed machine learning")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Measure push, pull, push-pull, sparse and latency against a same-run baseline.
    Bench(BenchArgs),
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
    #[arg(long, env = "PSERVER_LANES", default_value_t = 4)]
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
    /// Transport between workers and servers.
    #[arg(long, env = "PSERVER_TRANSPORT", default_value = "inproc")]
    transport: String,
    /// Print one JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    job: EmbeddedArgs,
}

fn main() -> ExitCode {
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
        Cmd::Bench(a) => bench_cmd(a),
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

fn bench_cmd(a: BenchArgs) -> Result<()> {
    let cases = bench_cases(&a)?;
    if !(a.seconds > 0.0 && a.seconds.is_finite()) {
        bail!("--seconds must be positive");
    }
    if a.transport != "inproc" {
        bail!("transport {:?} is not available in this build (inproc)", a.transport);
    }
    let cfg = JobConfig { servers: a.job.servers, workers: a.job.workers, lanes: a.job.lanes, ..JobConfig::default() };
    if !a.json {
        eprintln!(
            "pserver bench: embedded job, {} servers, {} workers, transport {}, {} s per case",
            cfg.servers, cfg.workers, a.transport, a.seconds
        );
    }
    let transport = a.transport.clone();
    let out = job::run(cfg, |w| bench::run(w, &cases, a.seconds, &transport, &mut Memcpy))?;
    let results = out.into_iter().next().unwrap_or_default();
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
