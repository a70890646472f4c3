//! Multi-process jobs on 127.0.0.1: a scheduler, servers and workers as
//! separate `pserver` processes talking TCP, over each I/O back end. Every
//! process is killed if a test fails or times out, so nothing is left behind.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

mod common;

use common::*;

fn two_servers_three_workers(io: &'static str) {
    let deadline = Instant::now() + DEADLINE;
    let job = start_job(io, 2, 3, io, deadline);
    let workers: Vec<Proc> =
        (0..3).map(|r| job.worker(r, 3, &["check", "--keys", "20000", "--dim", "2", "--rounds", "4"])).collect();
    job.finish(workers, deadline);
}

#[test]
fn two_servers_three_workers_over_std_sockets() {
    two_servers_three_workers("std");
}

#[test]
fn two_servers_three_workers_over_io_uring() {
    if !uring_works() {
        eprintln!("SKIPPED: io_uring is not available on this machine");
        return;
    }
    two_servers_three_workers("uring");
}

#[test]
fn same_host_workers_read_shards_through_shared_memory() {
    if !pserver::transport::shm::available() {
        eprintln!("SKIPPED: no usable shared-memory directory");
        return;
    }
    let deadline = Instant::now() + DEADLINE;
    let job = start_job("std", 2, 2, "shm", deadline);
    let args = ["check", "--transport", "shm", "--keys", "20000", "--dim", "2"];
    let workers: Vec<Proc> = (0..2).map(|r| job.worker(r, 2, &args)).collect();
    job.finish(workers, deadline);
}

/// The multi-process job over RDMA: servers and workers with `--transport
/// rdma`; every worker reports pulls served by RDMA READ and frames written
/// into push rings. Needs a device: inside `tools/rxe-vm`, else SKIPPED.
#[test]
fn rdma_two_servers_three_workers_read_and_push_over_rdma() {
    if rdma_device_or_skip().is_none() {
        return;
    }
    let deadline = Instant::now() + DEADLINE;
    let job = start_job_over("std", Some("rdma"), 2, 3, "rdma", deadline);
    let outs: Vec<_> = (0..3).map(|r| job.dir.join(format!("w{r}.out"))).collect();
    let args = ["check", "--transport", "rdma", "--keys", "20000", "--dim", "2", "--rounds", "3"];
    let workers: Vec<Proc> = (0..3)
        .map(|r| {
            Proc::spawn(
                &format!("worker {r}"),
                Command::new(BIN)
                    .args(args)
                    .env("PSERVER_IO", "std")
                    .env("PSERVER_ROLE", "worker")
                    .env("PSERVER_RANK", r.to_string())
                    .env("PSERVER_SCHEDULER", &job.addr)
                    .env("PSERVER_TOKEN", &job.token)
                    .stdout(std::fs::File::create(&outs[r as usize]).unwrap()),
            )
        })
        .collect();
    let dir = job.dir.clone();
    job.finish_keeping_dir(workers, deadline);
    for (r, f) in outs.iter().enumerate() {
        let out = std::fs::read_to_string(f).unwrap();
        println!("{}", out.trim());
        let line = out
            .lines()
            .find(|l| l.starts_with("check passed on worker"))
            .unwrap_or_else(|| panic!("worker {r}: {out}"));
        let num = |k: &str| -> u64 {
            line.split([' ', '(', ')']).find_map(|w| w.strip_prefix(k)).and_then(|v| v.parse().ok()).unwrap()
        };
        assert!(num("rdma_pulls=") > 0, "worker {r} made no RDMA READ pull: {line}");
        assert!(num("rdma_frames=") > 0, "worker {r} wrote no frame into a push ring: {line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failing_worker_fails_the_job_and_everything_exits() {
    let deadline = Instant::now() + DEADLINE;
    let mut job = start_job("std", 1, 2, "fail", deadline);
    // Worker 0 runs the check; worker 1 asks for a transport that does not
    // exist and fails before joining.
    let mut good = job.worker(0, 2, &["check", "--keys", "100"]);
    let mut bad = job.worker(1, 2, &["check", "--transport", "nonsense"]);
    assert!(!bad.wait(deadline).success());
    // The job cannot complete without worker 1: kill the rest, as a launcher
    // would, and make sure they go.
    drop(bad);
    let _ = good.child.kill();
    good.wait(deadline);
    let _ = job.scheduler.child.kill();
    job.scheduler.wait(deadline);
}

/// Sends `bytes` on a fresh connection and keeps it open (or not).
fn raw_send(addr: &str, bytes: &[u8], keep: bool) -> Option<TcpStream> {
    let mut s = TcpStream::connect(addr).unwrap();
    let _ = s.write_all(bytes);
    if keep {
        return Some(s);
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    None
}

fn garbage_then_normal_worker(io: &'static str) {
    use pserver::transport::frame::{self, Frame, FrameHeader};
    let deadline = Instant::now() + DEADLINE;
    let job = start_job(io, 1, 1, &format!("garbage-{io}"), deadline);
    let target = job.server_addrs[0].clone();
    let valid = frame::encode(&Frame::new(16, 1, bytes::Bytes::from_static(&[0u8; 8])));
    let mut huge: FrameHeader = bytemuck::pod_read_unaligned(&valid[..32]);
    huge.body_len = u64::MAX - 100;
    let mut big_but_legal: FrameHeader = huge;
    big_but_legal.body_len = 512 << 20; // under the limit: the server must not wait on it forever
    let mut held = Vec::new();
    for addr in [&target, &job.addr] {
        raw_send(addr, b"\x00\x01garbage\xff\xfe not a frame at all", false);
        raw_send(addr, &[0xAB; 4096], false);
        raw_send(addr, bytemuck::bytes_of(&huge), false);
        // A valid header whose meta is not a request, and a control frame with garbage.
        raw_send(addr, &valid, false);
        let mut ctl = Frame::new(1, 5, bytes::Bytes::new());
        ctl.segments.push(bytes::Bytes::from_static(&[0xff; 40]));
        raw_send(addr, &frame::encode(&ctl), false);
        // Truncated frames, left hanging.
        held.extend(raw_send(addr, &valid[..valid.len() / 2], true));
        held.extend(raw_send(addr, bytemuck::bytes_of(&big_but_legal), true));
    }
    // A normal worker is still served correctly, with the bad peers connected.
    let w = job.worker(0, 1, &["check", "--keys", "5000"]);
    job.finish(vec![w], deadline);
    drop(held);
}

#[test]
fn garbage_truncated_and_huge_frames_do_not_stop_a_server_over_std_sockets() {
    garbage_then_normal_worker("std");
}

#[test]
fn garbage_truncated_and_huge_frames_do_not_stop_a_server_over_io_uring() {
    if !uring_works() {
        eprintln!("SKIPPED: io_uring is not available on this machine");
        return;
    }
    garbage_then_normal_worker("uring");
}

#[test]
fn bench_runs_as_launched_workers_and_prints_json() {
    let deadline = Instant::now() + DEADLINE;
    let job = start_job("std", 1, 2, "bench", deadline);
    let args = ["bench", "--op", "pushpull", "--size", "64KiB", "--seconds", "0.2", "--json"];
    let out_file = job.dir.join("w0.out");
    let w0 = Proc::spawn(
        "worker 0",
        Command::new(BIN)
            .args(args)
            .env("PSERVER_IO", "std")
            .env("PSERVER_TOKEN", &job.token)
            .env("PSERVER_ROLE", "worker")
            .env("PSERVER_RANK", "0")
            .env("PSERVER_SCHEDULER", &job.addr)
            .stdout(std::fs::File::create(&out_file).unwrap()),
    );
    let w1 = job.worker(1, 2, &args);
    let dir = job.dir.clone();
    job.finish_keeping_dir(vec![w0, w1], deadline);
    let out = std::fs::read_to_string(&out_file).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let lines: Vec<serde_json::Value> =
        out.lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
    assert_eq!(lines.len(), 1, "{out}");
    let r = &lines[0];
    assert_eq!(r["op"], "pushpull");
    assert_eq!(r["transport"], "tcp");
    assert_eq!(r["bytes"], 65536);
    assert_eq!(r["workers"], 2);
    assert_eq!(r["verified"], true);
    for k in ["goodput_bytes_per_s", "p50_us", "p99_us", "baseline_goodput_bytes_per_s", "baseline_p50_us", "ratio"] {
        assert!(r[k].as_f64().unwrap() > 0.0, "{k} in {r}");
    }
}

/// Runs `tools/launch` with the real binary; returns (exit status, stdout).
fn launch(args: &[&str], deadline: Instant) -> (ExitStatus, String) {
    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/launch");
    let dir = tempdir("launch");
    let out = dir.join("stdout");
    let mut p = Proc::spawn(
        "tools/launch",
        Command::new(&tool).args(args).env("PSERVER_BIN", BIN).stdout(std::fs::File::create(&out).unwrap()),
    );
    let st = p.wait(deadline);
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    (st, text)
}

#[test]
fn tools_launch_runs_a_real_job_locally() {
    let deadline = Instant::now() + DEADLINE;
    let (st, out) = launch(&["-s", "2", "-w", "3", "--", BIN, "check", "--keys", "3000"], deadline);
    assert!(st.success(), "launch failed: {st}\n{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with("check passed on worker")).count(), 3, "{out}");
}

#[test]
fn tools_launch_runs_a_real_job_through_mpirun() {
    if Command::new("mpirun").arg("--version").output().is_err() {
        eprintln!("SKIPPED: mpirun not installed (apt-get install openmpi-bin)");
        return;
    }
    let deadline = Instant::now() + DEADLINE;
    let (st, out) =
        launch(&["-s", "1", "-w", "2", "--launcher", "mpi", "--", BIN, "check", "--keys", "2000"], deadline);
    assert!(st.success(), "launch failed: {st}\n{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with("check passed on worker")).count(), 2, "{out}");
}

#[test]
fn a_hung_worker_is_detected_by_missed_heartbeats_and_fails_the_job() {
    let deadline = Instant::now() + DEADLINE;
    let dir = tempdir("hang");
    let af = dir.join("scheduler.addr");
    let token = new_token();
    let fast = |c: &mut Command| {
        c.env("PSERVER_HEARTBEAT_MS", "100").env("PSERVER_HEARTBEAT_TIMEOUT_MS", "1500").env("PSERVER_IO", "std");
        c.env("PSERVER_TOKEN", &token);
    };
    let mut sched_cmd = Command::new(BIN);
    sched_cmd.args(["scheduler", "--bind", "127.0.0.1:0", "--servers", "1", "--workers", "2", "--addr-file"]).arg(&af);
    // A hung worker is lost; nobody restarts it, so the job fails after this.
    sched_cmd.args(["--worker-restart-timeout", "1"]);
    fast(&mut sched_cmd);
    let mut scheduler = Proc::spawn("scheduler", &mut sched_cmd);
    let addr = read_addr(&af, &mut scheduler, deadline);
    let mut server_cmd = Command::new(BIN);
    server_cmd.args(["server", "--scheduler", &addr]);
    fast(&mut server_cmd);
    let mut server = Proc::spawn("server", &mut server_cmd);
    let worker = |rank: u32, log: &Path| {
        let mut c = Command::new(BIN);
        c.args(["check", "--keys", "1000", "--rounds", "100000"])
            .env("PSERVER_ROLE", "worker")
            .env("PSERVER_RANK", rank.to_string())
            .env("PSERVER_SCHEDULER", &addr)
            .env("RUST_LOG", "pserver=debug")
            .stderr(std::fs::File::create(log).unwrap());
        fast(&mut c);
        Proc::spawn(&format!("worker {rank}"), &mut c)
    };
    let mut w0 = worker(0, &dir.join("w0.log"));
    let w1_log = dir.join("w1.log");
    let w1 = worker(1, &w1_log);
    // Freeze worker 1 once it has joined: its connection stays open, its
    // heartbeats stop.
    loop {
        if std::fs::read_to_string(&w1_log).unwrap_or_default().contains("worker joined the job") {
            break;
        }
        assert!(Instant::now() < deadline, "worker 1 never joined");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(w1.child.id() as i32, libc::SIGSTOP) }, 0);
    let st0 = w0.wait(deadline);
    assert!(!st0.success(), "worker 0 must fail once worker 1 is declared dead");
    let log0 = std::fs::read_to_string(dir.join("w0.log")).unwrap_or_default();
    assert!(log0.contains("worker 1") || log0.contains("heartbeat"), "worker 0 should say why: {log0}");
    assert!(!scheduler.wait(deadline).success(), "the scheduler reports the failed job");
    server.wait(deadline); // it must exit; its status does not matter here
    // SAFETY: resuming our own child so that it can be killed cleanly.
    unsafe { libc::kill(w1.child.id() as i32, libc::SIGCONT) };
    drop(w1);
    let _ = std::fs::remove_dir_all(&dir);
}
