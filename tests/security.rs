//! Security and operations of a real multi-process job on 127.0.0.1
//! (DESIGN section 10): foreign processes without the job's token get
//! nowhere on any port, a recorded handshake cannot be replayed, shared
//! memory is owner-only and read-only for workers, and `pserver status` and
//! the metrics endpoints show what the job is doing. The job keeps running
//! throughout: a normal worker still gets exact answers afterwards.
//!
//! The `rdma::` tests need an RDMA device: `.ci/run` runs them inside
//! `tools/rxe-vm` (`tools/rxe-vm -- target/release/deps/security-<hash> rdma::
//! --test-threads 1`); elsewhere they print `SKIPPED: <reason>`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod common;

use common::*;

/// Runs `pserver ARGS` with `env` and without the test's PSERVER_* variables.
fn run_pserver(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("PSERVER_") {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().copied());
    let mut child = c
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: every attempt here must fail or finish by itself.
    let deadline = Instant::now() + DEADLINE;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("pserver {args:?} did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A foreign worker of the job at `addr` (rank 0 is what the real one uses).
fn foreign_worker(addr: &str, extra: &[(&str, &str)], args: &[&str]) -> Output {
    let mut env = vec![("PSERVER_ROLE", "worker"), ("PSERVER_RANK", "0"), ("PSERVER_SCHEDULER", addr)];
    env.push(("PSERVER_IO", "std"));
    env.extend_from_slice(extra);
    run_pserver(args, &env)
}

/// Sends `bytes` on a fresh connection and reads until the peer closes.
fn raw(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    let _ = s.write_all(bytes);
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

fn control_frame(c: &pserver::proto::Control) -> Vec<u8> {
    pserver::transport::frame::encode(&c.to_frame(1))
}

#[test]
fn processes_without_the_job_token_cannot_register_push_pull_or_read_status() {
    let deadline = Instant::now() + DEADLINE;
    let job = start_job("std", 1, 1, "foreign", deadline);
    let wrong = new_token();
    let check = ["check", "--keys", "2000"];
    let shm_check = ["check", "--transport", "shm", "--keys", "2000"];

    // A worker with another job's token cannot register, over tcp or shm.
    for args in [&check[..], &shm_check[..]] {
        let o = foreign_worker(&job.addr, &[("PSERVER_TOKEN", &wrong)], args);
        assert!(!o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("does not know the job token"), "{}", text(&o));
    }
    // Without any token it refuses to start, and says how to fix it.
    let o = foreign_worker(&job.addr, &[], &check);
    assert!(!o.status.success());
    assert!(text(&o).contains("no job token") && text(&o).contains("--insecure"), "{}", text(&o));
    // --insecure does not get it in either: the job's nodes still authenticate.
    let o = foreign_worker(&job.addr, &[("PSERVER_INSECURE", "1")], &check);
    assert!(!o.status.success(), "{}", text(&o));
    // Status needs the token too.
    for env in [&[("PSERVER_TOKEN", wrong.as_str())][..], &[][..]] {
        let o = run_pserver(&["status", "--scheduler", &job.addr], env);
        assert!(!o.status.success(), "{}", text(&o));
    }
    // Raw frames, as a foreign program would send them: a registration and a
    // status request to the scheduler, a table creation, a push and a pull
    // straight to the server's data port. Each connection is closed without
    // an answer frame.
    use pserver::proto::{Control, DataHeader, RunHeader, kind, run_form};
    let register = control_frame(&Control::Register {
        role: pserver::proto::Role::Worker,
        addr: "127.0.0.1:1".into(),
        rank: Some(0),
    });
    let h = DataHeader {
        table: 0xC4EC_0001,
        worker: 0,
        clock: 0,
        epoch: 1,
        runs: 1,
        flags: 0,
        seq: 1,
        tau: u32::MAX,
        reserved: 0,
    };
    let run = RunHeader { run: 0, form: run_form::RANGE, first: 0, count: 4, digest: 0, seq: 1 };
    let meta = pserver::proto::build_meta(&h, &[run]);
    let push =
        pserver::transport::Frame::new(kind::PUSH, 1, meta.clone()).with_segment(bytes::Bytes::from(vec![0u8; 16]));
    let pull = pserver::transport::Frame::new(kind::PULL, 2, meta);
    let create = control_frame(&Control::CreateTable(pserver::TableSpec::dense(5, 10, 1)));
    for (addr, bytes) in [
        (&job.addr, register.clone()),
        (&job.addr, control_frame(&Control::Status)),
        (&job.server_addrs[0], create),
        // Shared-memory file names and push rings are only handed out here.
        (&job.server_addrs[0], control_frame(&Control::ShardMap { table: 0xC4EC_0001 })),
        (&job.server_addrs[0], control_frame(&Control::OpenRing { bytes: 1 << 20 })),
        (&job.server_addrs[0], register),
        (&job.server_addrs[0], pserver::transport::frame::encode(&push)),
        (&job.server_addrs[0], pserver::transport::frame::encode(&pull)),
    ] {
        let got = raw(addr, &bytes);
        assert!(!got.windows(4).any(|w| w == b"PSRV"), "a frame came back to an unauthenticated peer from {addr}");
    }
    // The job is intact: its own worker registers and verifies exact sums.
    let w = job.worker(0, 1, &check);
    let dir = job.dir.clone();
    job.finish_keeping_dir(vec![w], deadline);
    let slog = std::fs::read_to_string(dir.join("scheduler.log")).unwrap_or_default();
    let vlog = std::fs::read_to_string(dir.join("server0.log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    // Each refusal was logged with the peer's address.
    assert!(slog.contains("refused a connection") && slog.contains("peer=127.0.0.1:"), "{slog}");
    assert!(vlog.contains("refused a connection"), "{vlog}");
}

/// Forwards one connection to `target`, recording what the client sent.
fn recording_proxy(target: String) -> (String, std::thread::JoinHandle<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut s = TcpStream::connect(&target).unwrap();
        let (mut c2, mut s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut s2, &mut c2);
            let _ = c2.shutdown(std::net::Shutdown::Both);
        });
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    seen.extend_from_slice(&buf[..n]);
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = s.shutdown(std::net::Shutdown::Both);
        let _ = back.join();
        seen
    });
    (addr, h)
}

#[test]
fn a_recorded_handshake_replayed_to_a_running_node_is_refused() {
    let deadline = Instant::now() + DEADLINE;
    let job = start_job("std", 1, 1, "replay", deadline);
    // An operator's `pserver status` goes through a recording proxy: it
    // authenticates for real and gets its answer.
    let (proxy, recorded) = recording_proxy(job.addr.clone());
    let o = run_pserver(&["status", "--scheduler", &proxy, "--json"], &[("PSERVER_TOKEN", &job.token)]);
    assert!(o.status.success(), "{}", text(&o));
    let seen = recorded.join().unwrap();
    assert!(seen.len() >= 72 && seen.starts_with(b"PSAUTH01"));
    // Replaying its challenge and proof on a new connection: the scheduler
    // answers with a fresh nonce, so the old proof is wrong.
    let mut s = TcpStream::connect(&job.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(&seen[..40]).unwrap();
    let mut reply = [0u8; 72];
    s.read_exact(&mut reply).unwrap();
    s.write_all(&seen[40..72]).unwrap();
    // And then the status request that followed it, for good measure.
    let _ = s.write_all(&seen[72..]);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.starts_with(b"PSREFUSE"), "the replay was not refused: {:?}", &rest[..rest.len().min(16)]);
    assert!(!rest.windows(4).any(|w| w == b"PSRV"), "a frame answered the replay");
    // The job goes on.
    let w = job.worker(0, 1, &["check", "--keys", "1000"]);
    job.finish(vec![w], deadline);
}

/// An HTTP GET of `path` from `addr`; (status line, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (head.lines().next().unwrap_or("").to_string(), body.to_string())
}

/// The value of the sample `name{labels}` (labels as written, in order).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}

fn metrics_addr(log: &str) -> Option<String> {
    log.lines().find_map(|l| l.strip_prefix("metrics at http://")).map(|a| a.trim_end_matches("/metrics").to_string())
}

#[test]
fn status_and_metrics_show_nodes_ranges_clocks_and_traffic() {
    let deadline = Instant::now() + DEADLINE;
    let m = ["--metrics-bind", "127.0.0.1:0"];
    let job = start_job_args("std", 2, 1, "status", deadline, &m, &m);
    // A worker that keeps pushing and clocking until stopped.
    let mut w = Proc::spawn(
        "worker 0",
        Command::new(BIN)
            .args(["check", "--keys", "1000", "--rounds", "10000000"])
            .env("PSERVER_IO", "std")
            .env("PSERVER_TOKEN", &job.token)
            .env("PSERVER_ROLE", "worker")
            .env("PSERVER_RANK", "0")
            .env("PSERVER_SCHEDULER", &job.addr)
            .env("PSERVER_HEARTBEAT_MS", "100"),
    );
    // Status, once the servers have reported the check's tables and clocks.
    let status = loop {
        let o = run_pserver(&["status", "--scheduler", &job.addr, "--json"], &[("PSERVER_TOKEN", &job.token)]);
        assert!(o.status.success(), "{}", text(&o));
        let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let ready =
            s["nodes"].as_array().unwrap().iter().any(|n| {
                n["server"]["tables"].as_array().is_some_and(|t| t.len() == 2)
                    && n["server"]["tables"][0]["clocks"][0].as_u64().unwrap_or(0) >= 2
            }) && s["nodes"].as_array().unwrap().iter().all(|n| n["role"] != "Server" || !n["server"].is_null());
        if ready {
            break s;
        }
        assert!(w.child.try_wait().unwrap().is_none(), "the worker ended early");
        assert!(Instant::now() < deadline, "the servers never reported: {s}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status["phase"], "running");
    assert_eq!(status["epoch"], 1);
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{status}");
    let servers: Vec<&serde_json::Value> = nodes.iter().filter(|n| n["role"] == "Server").collect();
    assert_eq!(servers.len(), 2);
    let mut covered = 0u64;
    for s in &servers {
        assert_eq!(s["state"], "running");
        assert!(s["last_heartbeat_s"].as_f64().unwrap() < 60.0);
        let r = &s["server"];
        assert!(r["pushes"].as_u64().unwrap() > 0, "{r}");
        assert!(r["bytes_received"].as_u64().unwrap() > 0, "{r}");
        let dense = r["tables"].as_array().unwrap().iter().find(|t| t["id"] == 0xC4EC_0001u32).unwrap();
        assert_eq!(dense["keys"], 1000);
        assert_eq!(dense["storage"], "dense");
        covered += dense["ranges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r[1].as_u64().unwrap() - r[0].as_u64().unwrap())
            .sum::<u64>();
    }
    assert_eq!(covered, 1000, "the servers' ranges cover the key space exactly");
    let worker = nodes.iter().find(|n| n["role"] == "Worker").unwrap();
    assert_eq!(worker["rank"], 0);
    assert!(worker["worker"]["clock"].as_u64().unwrap() >= 1, "{worker}");

    // The human rendering names the same things.
    let o = run_pserver(&["status", "--scheduler", &job.addr], &[("PSERVER_TOKEN", &job.token)]);
    let human = text(&o);
    for word in ["job: running", "server", "worker", "table 3303800833", "staleness", "pushes/s", "last heartbeat"] {
        assert!(human.to_lowercase().contains(&word.to_lowercase()), "{word:?} missing from:\n{human}");
    }

    // Metrics: the scheduler's and each server's endpoint, scraped over HTTP.
    let sched_metrics = metrics_addr(&job.log("scheduler")).expect("the scheduler prints its metrics address");
    let (code, body) = http_get(&sched_metrics, "/metrics");
    assert!(code.contains("200"), "{code}");
    assert_eq!(sample(&body, "pserver_up{role=\"scheduler\"}"), Some(1.0), "{body}");
    assert_eq!(sample(&body, "pserver_job_epoch"), Some(1.0));
    assert_eq!(sample(&body, "pserver_job_nodes{role=\"server\",state=\"running\"}"), Some(2.0), "{body}");
    assert!(sample(&body, "pserver_server_requests_total{server=\"0\",kind=\"push\"}").unwrap() > 0.0, "{body}");
    assert!(sample(&body, "pserver_worker_clock{worker=\"0\"}").unwrap() >= 1.0, "{body}");
    assert!(body.contains("# TYPE pserver_server_requests_total counter"));
    assert!(body.contains("pserver_table_staleness{server=\"1\",table=\"3303800833\"}"), "{body}");
    assert!(http_get(&sched_metrics, "/nothing").0.contains("404"));
    for i in 0..2 {
        let addr = metrics_addr(&job.log(&format!("server{i}"))).expect("servers print their metrics address");
        let (code, body) = http_get(&addr, "/metrics");
        assert!(code.contains("200"), "{code}");
        assert_eq!(sample(&body, "pserver_up{role=\"server\"}"), Some(1.0));
        let pushes = sample(&body, &format!("pserver_server_requests_total{{server=\"{i}\",kind=\"push\"}}"));
        assert!(pushes.unwrap() > 0.0, "{body}");
        assert!(sample(&body, &format!("pserver_transport_connections{{server=\"{i}\"}}")).unwrap() >= 1.0);
        assert!(sample(&body, &format!("pserver_table_clock_min{{server=\"{i}\",table=\"3303800833\"}}")).is_some());
    }
    let _ = w.child.kill();
    w.wait(deadline);
}

#[test]
fn nodes_started_without_a_token_refuse_unless_insecure() {
    for role in [&["scheduler", "--servers", "1", "--workers", "1"][..], &["server", "--scheduler", "127.0.0.1:9"][..]]
    {
        let o = run_pserver(role, &[]);
        assert!(!o.status.success());
        let t = text(&o);
        assert!(t.contains("no job token") && t.contains("PSERVER_TOKEN") && t.contains("--insecure"), "{t}");
    }
    // A token file others can read is refused too.
    let dir = tempdir("tokfile");
    let f = dir.join("token");
    std::fs::write(&f, new_token()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = run_pserver(&["scheduler", "--servers", "1", "--workers", "1", "--token-file", f.to_str().unwrap()], &[]);
    assert!(!o.status.success() && text(&o).contains("chmod 600"), "{}", text(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_insecure_job_runs_when_asked_to() {
    // --insecure everywhere (PSERVER_INSECURE=1): no handshake, same results.
    let deadline = Instant::now() + DEADLINE;
    let dir = tempdir("insecure");
    let af = dir.join("scheduler.addr");
    let env = [("PSERVER_INSECURE", "1"), ("PSERVER_IO", "std")];
    let mut sched = Proc::spawn(
        "scheduler",
        Command::new(BIN)
            .args(["scheduler", "--servers", "1", "--workers", "1", "--addr-file"])
            .arg(&af)
            .envs(env)
            .env_remove("PSERVER_TOKEN"),
    );
    let addr = read_addr(&af, &mut sched, deadline);
    let mut server = Proc::spawn(
        "server",
        Command::new(BIN).args(["server", "--scheduler", &addr]).envs(env).env_remove("PSERVER_TOKEN"),
    );
    let o = foreign_worker(&addr, &env, &["check", "--keys", "500"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(sched.wait(deadline).success());
    assert!(server.wait(deadline).success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `f` in a forked child and returns how it ended: `Ok(code)` for an
/// exit, `Err(signal)` for a signal. `f` must only make system calls.
fn in_child(f: impl FnOnce() -> i32) -> Result<i32, i32> {
    // SAFETY: the child runs `f`, which only makes async-signal-safe system
    // calls (no allocation, no locks), then `_exit`s without unwinding.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = f();
        // SAFETY: ends the child at once, as fork's rules require.
        unsafe { libc::_exit(code) };
    }
    let mut st = 0;
    // SAFETY: waiting for our own child; `st` is a valid out-pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut st, 0) }, pid);
    if libc::WIFEXITED(st) { Ok(libc::WEXITSTATUS(st)) } else { Err(libc::WTERMSIG(st)) }
}

#[test]
fn a_worker_cannot_write_the_shard_it_maps() {
    use pserver::transport::shm::{Mapped, Namespace};
    use std::sync::atomic::Ordering;
    if !pserver::transport::shm::available() {
        eprintln!("SKIPPED: no usable shared-memory directory");
        return;
    }
    let ns = Namespace::new().unwrap();
    let shard = ns.create("shard", 4096).unwrap();
    shard.words()[5].store(42, Ordering::Release);
    let view = Mapped::open(shard.path().unwrap()).unwrap();
    assert_eq!(view.load(5), Some(42));
    // The view only offers loads, but even a store forced through it (the
    // atomics allow one through a shared reference) hits read-only pages.
    let word = &view.words_at(5, 1).unwrap()[0];
    let ended = in_child(|| {
        word.store(7, Ordering::Relaxed);
        0
    });
    assert_eq!(ended, Err(libc::SIGSEGV), "a store through the worker's mapping must fault");
    assert_eq!(shard.words()[5].load(Ordering::Acquire), 42, "the shard is unchanged");
}

#[test]
fn another_users_process_cannot_open_a_jobs_shared_memory_files() {
    use pserver::transport::shm::Namespace;
    use std::os::unix::fs::PermissionsExt;
    if !pserver::transport::shm::available() {
        eprintln!("SKIPPED: no usable shared-memory directory");
        return;
    }
    let ns = Namespace::new().unwrap();
    let shard = ns.create("shard", 4096).unwrap();
    let path = shard.path().unwrap().to_path_buf();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED (the mode check above ran): switching to another user needs root");
        return;
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // As nobody (65534): open for reading and for writing must both fail.
    let ended = in_child(|| {
        // SAFETY: plain system calls on a valid, NUL-terminated path.
        unsafe {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return 2;
            }
            for flags in [libc::O_RDONLY, libc::O_RDWR] {
                let fd = libc::open(c.as_ptr(), flags);
                if fd >= 0 {
                    return 1;
                }
                if *libc::__errno_location() != libc::EACCES {
                    return 3;
                }
            }
            if libc::unlink(c.as_ptr()) == 0 {
                return 4;
            }
        }
        0
    });
    assert_eq!(ended, Ok(0), "1: opened, 2: could not switch user, 3: unexpected error, 4: removed it");
    assert!(path.exists());
}

/// The RDMA side of least privilege and authentication, on real jobs whose
/// servers run `--transport rdma`: what a worker's connection is handed
/// (queue pair, push ring, shard addresses and rkeys) lets it read shards
/// and write only its push ring's data, and nothing of it goes to a peer
/// without the job token. Needs a device: `.ci/run` runs these inside
/// `tools/rxe-vm` with `PSERVER_TEST_REQUIRE_RDMA=1`; elsewhere they print
/// `SKIPPED: <reason>` and return.
mod rdma {
    use super::*;
    use std::sync::Arc;

    use bytes::BytesMut;
    use pserver::proto::{Control, RdmaShard};
    use pserver::store::{SlotLayout, slot};
    use pserver::transport::auth::{Auth, Token};
    use pserver::transport::frame::{self, Decoder, Limits};
    use pserver::transport::rdma::{ConnInfo, Link, Rdma, RdmaMode};
    use pserver::transport::tcp::{IoMode, Tcp};
    use pserver::transport::{Access, RegionDesc};
    use pserver::worker::WorkerConfig;
    use pserver::{TableSpec, Worker};

    /// An authenticated connection to a node that speaks frames as a
    /// worker's connection does.
    struct Raw {
        s: TcpStream,
        dec: Decoder,
        buf: BytesMut,
        next: u64,
    }

    impl Raw {
        fn connect(addr: &str, token: &str) -> Raw {
            let s = TcpStream::connect(addr).unwrap();
            pserver::transport::auth::client(&s, &Token::from_hex(token).unwrap()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            Raw { s, dec: Decoder::new(Limits::default()), buf: BytesMut::new(), next: 1 << 40 }
        }

        /// Sends `c` and returns the control message that answers it.
        fn call(&mut self, c: &Control) -> Control {
            let id = self.next;
            self.next += 1;
            self.s.write_all(&frame::encode(&c.to_frame(id))).unwrap();
            loop {
                if let Some(f) = self.dec.decode(&mut self.buf).unwrap() {
                    if f.id == id {
                        return Control::from_frame(&f, "server").unwrap();
                    }
                    continue;
                }
                let mut b = [0u8; 1 << 16];
                let n = self.s.read(&mut b).unwrap();
                assert!(n > 0, "the server closed the connection");
                self.buf.extend_from_slice(&b[..n]);
            }
        }
    }

    /// A connection to a server with an RDMA link on it, set up exactly as a
    /// worker sets one up: what any peer with the job token is handed.
    struct Probe {
        // Drop order: the link before the connection that owns it.
        link: Link,
        raw: Raw,
        ring: RegionDesc,
        ring_ctl: RegionDesc,
    }

    impl Probe {
        fn open(dev: &Arc<Rdma>, addr: &str, token: &str) -> Probe {
            let mut raw = Raw::connect(addr, token);
            let (link, info) = Link::new(dev, addr).unwrap();
            match raw.call(&Control::RdmaConnect { conn: info.to_bytes(), next_seq: 1 }) {
                Control::RdmaAccept { conn, ring, ring_ctl } => {
                    link.establish(&ConnInfo::from_bytes(&conn).unwrap(), ring, ring_ctl).unwrap();
                    Probe { link, raw, ring, ring_ctl }
                }
                other => panic!("RdmaConnect was answered with {other:?}"),
            }
        }

        fn shards(&mut self, table: u32) -> Vec<RdmaShard> {
            match self.raw.call(&Control::RdmaShardMap { table }) {
                Control::RdmaShardMapReply { shards } => shards,
                other => panic!("RdmaShardMap was answered with {other:?}"),
            }
        }

        /// A plain RDMA WRITE of `words` to `addr` with `rkey`, whatever the
        /// server said the region allows.
        fn write(&self, addr: u64, rkey: u32, words: &[u64]) -> Result<(), String> {
            self.link.unchecked_transfer_for_test(true, addr, rkey, &mut words.to_vec()).map_err(|e| e.to_string())
        }

        /// An RDMA READ of `n` words at `addr` with `rkey`, likewise.
        fn read(&self, addr: u64, rkey: u32, n: usize) -> Result<Vec<u64>, String> {
            let mut buf = vec![0u64; n];
            self.link.unchecked_transfer_for_test(false, addr, rkey, &mut buf).map_err(|e| e.to_string())?;
            Ok(buf)
        }
    }

    #[test]
    fn a_worker_reads_shards_but_cannot_write_them_and_writes_only_its_push_ring() {
        let Some(dev) = super::common::rdma_device_or_skip() else { return };
        let deadline = Instant::now() + DEADLINE;
        let job = start_job_over("std", Some("rdma"), 1, 1, "rdma-least-privilege", deadline);
        let server = job.server_addrs[0].clone();
        // This test process is the job's worker, over TCP and RDMA.
        let tcp = Tcp::new(IoMode::Std, Limits::default()).with_auth(Auth::Token(Token::from_hex(&job.token).unwrap()));
        let cfg = WorkerConfig { rank: Some(0), rdma: RdmaMode::Require, ..WorkerConfig::default() };
        let w = Worker::connect(&tcp, &job.addr, cfg).unwrap();
        const TABLE: u32 = 7;
        const KEYS: u64 = 1000;
        const DIM: usize = 4; // wider than one word: pulls are one-sided even on soft-RoCE
        w.create_table(TableSpec::dense(TABLE, KEYS, DIM as u32)).unwrap();
        let keys: Vec<u64> = (0..KEYS).collect();
        let vals: Vec<f32> = (0..keys.len() * DIM).map(|i| i as f32 * 0.5 + 1.0).collect();
        w.wait(w.push(TABLE, &keys, &vals).unwrap()).unwrap();
        let before = w.traffic();
        assert_eq!(w.pull(TABLE, &keys).unwrap().wait().unwrap(), vals);
        assert!(w.traffic().rdma_pulls > before.rdma_pulls, "the worker's pull was not an RDMA READ");

        // A connection of our own, handed what every worker is handed.
        let layout = SlotLayout::new(DIM as u32).unwrap();
        let mut good = Probe::open(&dev, &server, &job.token);
        let shards = good.shards(TABLE);
        assert!(!shards.is_empty());
        let mut images = Vec::new();
        for sh in &shards {
            assert_eq!(sh.slots.access(), Access::READ, "shard slots are offered for READ only");
            assert_eq!(sh.header.access(), Access::READ, "shard headers are offered for READ only");
            // READ of the slots works, and shows the values pushed.
            let (a, b) = (sh.start as usize, sh.end as usize);
            let img = good.read(sh.slots.id, sh.slots.rkey, (b - a) * layout.words()).unwrap();
            let (mut got, mut torn) = (vec![0f32; (b - a) * DIM], Vec::new());
            slot::validate_run(layout, &img, &mut got, None, &mut torn);
            assert!(torn.is_empty(), "torn slots in a quiet shard: {torn:?}");
            assert_eq!(got, vals[a * DIM..b * DIM], "shard {a}..{b} read by RDMA READ");
            good.read(sh.header.id, sh.header.rkey, 8).unwrap();
            images.push(img);
        }
        // The push ring: its data takes WRITEs (frames go there; without a
        // doorbell the server never looks), its head and frame count READs.
        assert_eq!(good.ring.access(), Access::WRITE);
        assert_eq!(good.ring_ctl.access(), Access::READ);
        good.write(good.ring.id, good.ring.rkey, &[0x5EC0_5EC0; 8]).unwrap();
        good.write(good.ring.id + good.ring.len - 64, good.ring.rkey, &[0x5EC0_5EC0; 8]).unwrap();
        good.read(good.ring_ctl.id, good.ring_ctl.rkey, 2).unwrap();

        // Everything else is refused by the device, each on a fresh link
        // (a remote access error ends the queue pair that made it).
        let forged = vec![u64::MAX; layout.words()];
        let refused = |what: &str, attempt: &dyn Fn(&Probe, &RdmaShard) -> Result<(), String>| {
            let mut p = Probe::open(&dev, &server, &job.token);
            let sh = p.shards(TABLE).remove(0);
            let e = attempt(&p, &sh).expect_err(what);
            println!("{what}: refused: {e}");
            assert!(e.to_lowercase().contains("remote access error"), "{what}: {e}");
            assert!(p.link.failure().is_some(), "{what}: the link must be failed");
        };
        refused("WRITE into a shard's slots", &|p, sh| p.write(sh.slots.id, sh.slots.rkey, &forged));
        refused("WRITE into a shard's last slot", &|p, sh| {
            let last = sh.slots.id + (sh.end - sh.start - 1) * layout.bytes() as u64;
            p.write(last, sh.slots.rkey, &forged)
        });
        refused("WRITE into a shard's progress words", &|p, sh| p.write(sh.header.id, sh.header.rkey, &[u64::MAX; 8]));
        refused("WRITE into a shard with the push ring's rkey", &|p, sh| p.write(sh.slots.id, p.ring.rkey, &forged));
        refused("WRITE into the push ring's head and frame count", &|p, _| {
            p.write(p.ring_ctl.id, p.ring_ctl.rkey, &[0, 0])
        });
        refused("WRITE past the end of the push ring", &|p, _| p.write(p.ring.id + p.ring.len, p.ring.rkey, &[0; 8]));
        refused("READ of the push ring's data", &|p, _| p.read(p.ring.id, p.ring.rkey, 8).map(|_| ()));

        // Nothing changed: the slots READ back word for word, and the
        // worker's own pull (by RDMA READ) returns what it pushed.
        for (sh, img) in shards.iter().zip(&images) {
            assert_eq!(&good.read(sh.slots.id, sh.slots.rkey, img.len()).unwrap(), img, "shard {}..", sh.start);
        }
        let before = w.traffic();
        assert_eq!(w.pull(TABLE, &keys).unwrap().wait().unwrap(), vals, "a refused WRITE changed the shard");
        assert!(w.traffic().rdma_pulls > before.rdma_pulls);
        // And the job goes on: a push through the worker's ring applies.
        w.wait(w.push(TABLE, &keys, &vals).unwrap()).unwrap();
        let twice: Vec<f32> = vals.iter().map(|v| v * 2.0).collect();
        assert_eq!(w.pull(TABLE, &keys).unwrap().wait().unwrap(), twice);
        assert!(w.traffic().rdma_frames > 0, "the worker's pushes did not go through its push ring");
        drop(good);
        w.finish(None).unwrap();
        drop(w);
        let closed = job.log("server0").matches("its RDMA link failed").count();
        println!("the server closed {closed} connections whose RDMA link failed, and served on");
        job.finish(vec![], deadline);
    }

    /// Sends `bytes` on a fresh connection, ends our side and returns
    /// everything that comes back before the peer closes.
    fn exchange(addr: &str, bytes: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    }

    fn answered(got: &[u8]) -> bool {
        got.windows(4).any(|w| w == b"PSRV")
    }

    #[test]
    fn connection_data_goes_only_to_peers_that_know_the_job_token() {
        let Some(dev) = super::common::rdma_device_or_skip() else { return };
        let deadline = Instant::now() + DEADLINE;
        let log = [("RUST_LOG", "warn,transport=info,pserver::server=debug")];
        let job = start_job_env("std", 1, 1, "rdma-foreign", deadline, &[], &["--transport", "rdma"], &log);
        let server = job.server_addrs[0].clone();
        // A real queue pair's description, as a foreign worker would send it.
        let (_link, info) = Link::new(&dev, &server).unwrap();
        let connect = frame::encode(&Control::RdmaConnect { conn: info.to_bytes(), next_seq: 1 }.to_frame(1));
        let shard_map = frame::encode(&Control::RdmaShardMap { table: 0xC4EC_0001 }.to_frame(2));
        let both = [connect.clone(), shard_map.clone()].concat();

        // 1. The requests with no handshake at all.
        for bytes in [&connect, &shard_map, &both] {
            let got = exchange(&server, bytes);
            assert!(!answered(&got), "a frame answered an unauthenticated RDMA request");
        }
        // 2. A client with another job's token: it gives up when the
        // server's proof does not verify, and the server never admits it.
        let wrong = Token::generate().unwrap();
        let mut s = TcpStream::connect(&server).unwrap();
        let e = pserver::transport::auth::client(&s, &wrong).expect_err("another job's token authenticated");
        assert!(e.to_string().contains("does not know the job token"), "{e}");
        let _ = s.write_all(&both);
        let _ = s.shutdown(std::net::Shutdown::Write);
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(!answered(&rest), "a frame answered a peer with the wrong token");
        // 3. Byte by byte: a challenge, then a proof made without the token
        // and the requests right behind it, before the verdict. The server
        // refuses and reads none of them.
        let mut s = TcpStream::connect(&server).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(&[&b"PSAUTH01"[..], &[0x42; 32]].concat()).unwrap();
        let mut reply = [0u8; 72];
        s.read_exact(&mut reply).unwrap();
        assert!(reply.starts_with(b"PSAUTH01"));
        let _ = s.write_all(&[&[0u8; 32][..], &both].concat());
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(!answered(&rest), "a frame answered a peer with a forged proof");
        assert!(rest.is_empty() || rest.starts_with(b"PSREFUSE"), "{:?}", &rest[..rest.len().min(16)]);
        // 4. Whole processes: `pserver check --transport rdma` with another
        // job's token, or none, does not get into the job.
        let args = ["check", "--transport", "rdma", "--keys", "2000"];
        let o = foreign_worker(&job.addr, &[("PSERVER_TOKEN", &wrong.to_hex())], &args);
        assert!(!o.status.success() && text(&o).contains("does not know the job token"), "{}", text(&o));
        let o = foreign_worker(&job.addr, &[], &args);
        assert!(!o.status.success() && text(&o).contains("no job token"), "{}", text(&o));

        // The same requests with the token are answered: what the refused
        // peers would have got (and a shard map only once a link exists).
        // The connection and its link end with this block.
        {
            let mut raw = Raw::connect(&server, &job.token);
            match raw.call(&Control::RdmaShardMap { table: 0xC4EC_0001 }) {
                Control::Error(m) => assert!(m.contains("no RDMA link"), "{m}"),
                other => panic!("a shard map went to a connection without a link: {other:?}"),
            }
            let (link, info) = Link::new(&dev, &server).unwrap();
            match raw.call(&Control::RdmaConnect { conn: info.to_bytes(), next_seq: 1 }) {
                Control::RdmaAccept { conn, ring, ring_ctl } => {
                    let remote = ConnInfo::from_bytes(&conn).unwrap();
                    assert_eq!((ring.access(), ring_ctl.access()), (Access::WRITE, Access::READ));
                    link.establish(&remote, ring, ring_ctl).unwrap();
                }
                other => panic!("RdmaConnect with the token was answered with {other:?}"),
            }
        }

        // The job goes on: its worker gets exact sums over RDMA.
        let out = job.dir.join("w0.out");
        let wk = Proc::spawn(
            "worker 0",
            Command::new(BIN)
                .args(["check", "--transport", "rdma", "--keys", "20000", "--dim", "2", "--rounds", "2"])
                .env("PSERVER_IO", "std")
                .env("PSERVER_ROLE", "worker")
                .env("PSERVER_RANK", "0")
                .env("PSERVER_SCHEDULER", &job.addr)
                .env("PSERVER_TOKEN", &job.token)
                .stdout(std::fs::File::create(&out).unwrap()),
        );
        let dir = job.dir.clone();
        job.finish_keeping_dir(vec![wk], deadline);
        let out = std::fs::read_to_string(&out).unwrap();
        let slog = std::fs::read_to_string(dir.join("server0.log")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        println!("{}", out.trim());
        let line = out.lines().find(|l| l.starts_with("check passed on worker")).unwrap_or_else(|| panic!("{out}"));
        let num = |k: &str| -> u64 {
            line.split([' ', '(', ')']).find_map(|w| w.strip_prefix(k)).and_then(|v| v.parse().ok()).unwrap()
        };
        assert!(num("rdma_pulls=") > 0 && num("rdma_frames=") > 0, "the worker did not use RDMA: {line}");
        // Five refused connections; links only for the two with the token.
        let refused = slog.matches("refused a connection").count();
        let links = slog.matches("accepted an RDMA link").count();
        println!("server: {refused} connections refused, {links} RDMA links accepted");
        assert!(refused >= 5, "{slog}");
        assert_eq!(links, 2, "links only for the test's authenticated connection and the worker\n{slog}");
    }
}
