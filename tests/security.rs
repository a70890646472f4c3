//! Security and operations of a real multi-process job on 127.0.0.1
//! (DESIGN section 10): foreign processes without the job's token get
//! nowhere on any port, a recorded handshake cannot be replayed, shared
//! memory is owner-only and read-only for workers, and `pserver status` and
//! the metrics endpoints show what the job is doing. The job keeps running
//! throughout: a normal worker still gets exact answers afterwards.

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
