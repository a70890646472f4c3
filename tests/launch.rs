//! `tools/launch`, the multi-process job launcher, driven end to end.
//!
//! The real `pserver scheduler` and `pserver server` are not needed: each test
//! writes a fake pserver (a small Python script, `FAKE_PSERVER`) and a worker
//! script into a fresh directory and points PSERVER_BIN at the fake. Every
//! process of a job records its PSERVER_* environment, its arguments and its
//! PID in that directory, whose path appears on the command line of every
//! process of the job: "nothing is left behind" means no live process has it
//! in its command line. Each launcher run is bounded by a deadline; on
//! timeout the launcher and the job are killed and the test fails.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Upper bound for one launcher run (generous: the machine may be loaded).
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// Upper bound for the processes of a job to start and record themselves.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A stand-in for `pserver scheduler` and `pserver server`.
///
/// scheduler: binds HOST:0, writes HOST:PORT to --addr-file (temp + rename),
/// reads "server <rank>" lines from servers and "done <rank> <code>" lines
/// from workers; once every server and worker has reported it closes every
/// connection and exits 0, or 1 if any worker's code was non-zero.
/// server: connects to --scheduler, says hello, and exits 0 when the
/// scheduler closes the connection.
/// Knobs (file `knobs`, lines `name=int`): `die_server=i` makes server i exit
/// 7 once connected; `scheduler_exit=c` makes the scheduler exit c at start;
/// `scheduler_hang=1` makes it hang without ever writing its address;
/// `server_hang=1` makes servers hang instead of exiting when told to.
const FAKE_PSERVER: &str = r#"#!{PYTHON}
import os, selectors, socket, sys
HERE = os.path.dirname(os.path.abspath(__file__))
ROLE, ARGS = sys.argv[1], sys.argv[2:]

def opt(name):
    return ARGS[ARGS.index(name) + 1]

def knob(name):
    try:
        with open(os.path.join(HERE, "knobs")) as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                if key == name:
                    return int(value)
    except FileNotFoundError:
        pass
    return None

def record(name):
    lines = ["%s=%s" % kv for kv in sorted(os.environ.items()) if kv[0].startswith("PSERVER_")]
    lines += ["ARGV=" + " ".join(sys.argv[1:]), "PID=%d" % os.getpid()]
    open(os.path.join(HERE, "pid-%d" % os.getpid()), "w").close()
    with open(os.path.join(HERE, name + ".tmp"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(os.path.join(HERE, name + ".tmp"), os.path.join(HERE, name + ".env"))

if ROLE == "scheduler":
    record("scheduler")
    if knob("scheduler_exit") is not None:
        sys.exit(knob("scheduler_exit"))
    if knob("scheduler_hang"):
        selectors.DefaultSelector().select()
    host, servers, workers = opt("--bind").rsplit(":", 1)[0], int(opt("--servers")), int(opt("--workers"))
    listener = socket.socket()
    listener.bind((host, 0))
    listener.listen(128)
    path = opt("--addr-file")
    with open(path + ".tmp", "w") as f:
        f.write("%s:%d" % (host, listener.getsockname()[1]))
    os.replace(path + ".tmp", path)
    sel, pending, hellos, codes = selectors.DefaultSelector(), {}, set(), {}
    sel.register(listener, selectors.EVENT_READ)
    while len(hellos) < servers or len(codes) < workers:
        for key, _ in sel.select():
            if key.fileobj is listener:
                conn = listener.accept()[0]
                pending[conn] = b""
                sel.register(conn, selectors.EVENT_READ)
                continue
            conn = key.fileobj
            data = conn.recv(4096)
            if not data:
                sel.unregister(conn)
            pending[conn] += data
            while b"\n" in pending[conn]:
                line, pending[conn] = pending[conn].split(b"\n", 1)
                if line.startswith(b"server "):
                    hellos.add(int(line.split()[1]))
                elif line.startswith(b"done "):
                    codes[int(line.split()[1])] = int(line.split()[2])
    for conn in pending:
        conn.close()
    sys.exit(1 if any(codes.values()) else 0)
elif ROLE == "server":
    rank = int(os.environ["PSERVER_RANK"])
    record("server-%d" % rank)
    host, port = opt("--scheduler").rsplit(":", 1)
    conn = socket.create_connection((host, int(port)))
    conn.sendall(b"server %d\n" % rank)
    if knob("die_server") == rank:
        sys.exit(7)
    while conn.recv(4096):
        pass
    if knob("server_hang"):
        selectors.DefaultSelector().select()
else:
    sys.exit("fake pserver: unknown role %r" % ROLE)
"#;

/// The worker command of the tests: `python3 worker.py MODE [ARGS]`.
///
/// ok: print a JSON line, report "done <rank> 0" to the scheduler, exit 0.
/// fail R C: rank R waits until every worker has started, then exits C
///   without reporting; the other ranks sleep until killed.
/// sleep: sleep until killed; rank 0 first starts a grandchild that ignores
///   SIGTERM (only the final SIGKILL of its process group stops it).
/// sleep-plain: sleep until killed.
const WORKER: &str = r#"
import os, signal, socket, subprocess, sys, time
HERE = os.path.dirname(os.path.abspath(__file__))
rank, workers = int(os.environ["PSERVER_RANK"]), int(os.environ["PSERVER_NUM_WORKERS"])
lines = ["%s=%s" % kv for kv in sorted(os.environ.items()) if kv[0].startswith("PSERVER_")]
lines += ["ARGV=" + " ".join(sys.argv[1:]), "PID=%d" % os.getpid()]
open(os.path.join(HERE, "pid-%d" % os.getpid()), "w").close()
with open(os.path.join(HERE, "worker-%d.tmp" % rank), "w") as f:
    f.write("\n".join(lines) + "\n")
os.replace(os.path.join(HERE, "worker-%d.tmp" % rank), os.path.join(HERE, "worker-%d.env" % rank))
mode = sys.argv[1]
if mode == "ok":
    print('{"worker": %d, "status": "ok"}' % rank, flush=True)
    host, port = os.environ["PSERVER_SCHEDULER"].rsplit(":", 1)
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(b"done %d 0\n" % rank)
    sys.exit(0)
if mode == "fail" and rank == int(sys.argv[2]):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if all(os.path.exists(os.path.join(HERE, "worker-%d.env" % r)) for r in range(workers)):
            break
        time.sleep(0.02)
    sys.exit(int(sys.argv[3]))
if mode == "sleep" and rank == 0:
    subprocess.Popen([sys.executable, "-c", "import os, signal, sys, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "open(os.path.join(sys.argv[1], 'pid-%d' % os.getpid()), 'w').close(); "
        "time.sleep(1e6)", HERE])
time.sleep(1e6)
"#;

fn launch_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools").join("launch")
}

/// The absolute path of the Python interpreter (`python3` may be a shim that
/// needs the caller's environment, which remote ssh sessions do not have).
fn python() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 must be installed: tools/launch is a Python 3 script");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// Shell quoting as Python's shlex.quote does it.
fn sh_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "@%+=:,./-_".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r#"'"'"'"#))
    }
}

fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("sh").arg("-c").arg(format!("kill -{signal} {pid}")).status().unwrap();
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Live (non-zombie) processes whose command line mentions `marker`.
fn processes_mentioning(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    let me = std::process::id().to_string();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let (Ok(stat), Ok(cmdline)) = (fs::read(entry.path().join("stat")), fs::read(entry.path().join("cmdline")))
        else {
            continue;
        };
        let stat = String::from_utf8_lossy(&stat);
        let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).unwrap_or("");
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if state != "Z" && state != "X" && cmdline.contains(marker) {
            found.push(format!("{pid} ({state}): {cmdline}"));
        }
    }
    found
}

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Outcome {
    fn describe(&self) -> String {
        format!(
            "exit code {:?} after {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.elapsed, self.stdout, self.stderr
        )
    }
}

struct Running {
    child: Child,
    started: Instant,
    out: PathBuf,
    err: PathBuf,
}

/// A fresh directory per test: `job/` holds the fake pserver, the worker
/// script and what the job's processes record; its path is the marker that
/// identifies the job's processes.
struct Sandbox {
    root: PathBuf,
    job: PathBuf,
    runs: AtomicUsize,
}

impl Sandbox {
    fn new(test: &str) -> Sandbox {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let root = std::env::temp_dir().join(format!(
            "pserver-launch-test-{}-{}-{}",
            test,
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&root);
        let job = root.join("job");
        fs::create_dir_all(&job).unwrap();
        fs::create_dir_all(root.join("tmp")).unwrap();
        let bin = job.join("pserver");
        fs::write(&bin, FAKE_PSERVER.replace("{PYTHON}", python())).unwrap();
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(job.join("worker.py"), WORKER).unwrap();
        Sandbox { root, job, runs: AtomicUsize::new(0) }
    }

    fn marker(&self) -> String {
        self.job.to_string_lossy().into_owned()
    }

    fn bin(&self) -> PathBuf {
        self.job.join("pserver")
    }

    fn knob(&self, line: &str) {
        fs::write(self.job.join("knobs"), format!("{line}\n")).unwrap();
    }

    fn worker(&self, mode: &[&str]) -> Vec<String> {
        let mut argv = vec![python().to_string(), self.job.join("worker.py").to_string_lossy().into_owned()];
        argv.extend(mode.iter().map(|s| s.to_string()));
        argv
    }

    /// `tools/launch ARGS -- WORKER...` with a clean PSERVER_* environment
    /// and PSERVER_BIN pointing at the fake.
    fn launch(&self, args: &[&str], worker: &[String]) -> Command {
        let mut cmd = Command::new(launch_path());
        cmd.args(args).arg("--").args(worker);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PSERVER_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("PSERVER_BIN", self.bin()).env("TMPDIR", self.root.join("tmp"));
        cmd.current_dir(&self.job).stdin(Stdio::null());
        cmd
    }

    /// The launcher's temporary directories (it makes them under $TMPDIR).
    fn launcher_tmpdirs(&self) -> Vec<String> {
        fs::read_dir(self.root.join("tmp"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("pserver-launch-"))
            .collect()
    }

    fn start(&self, mut cmd: Command) -> Running {
        let n = self.runs.fetch_add(1, Ordering::Relaxed);
        let (out, err) = (self.root.join(format!("stdout-{n}")), self.root.join(format!("stderr-{n}")));
        cmd.stdout(File::create(&out).unwrap()).stderr(File::create(&err).unwrap());
        let child = cmd.spawn().expect("cannot run tools/launch");
        Running { child, started: Instant::now(), out, err }
    }

    fn output(&self, run: &Running, code: Option<i32>) -> Outcome {
        Outcome {
            code,
            stdout: fs::read_to_string(&run.out).unwrap_or_default(),
            stderr: fs::read_to_string(&run.err).unwrap_or_default(),
            elapsed: run.started.elapsed(),
        }
    }

    /// Waits for the launcher to exit; kills it and the job on timeout.
    fn finish(&self, mut run: Running) -> Outcome {
        loop {
            if let Some(status) = run.child.try_wait().unwrap() {
                return self.output(&run, status.code());
            }
            if run.started.elapsed() > RUN_TIMEOUT {
                let _ = run.child.kill();
                let _ = run.child.wait();
                self.kill_job();
                panic!("tools/launch did not finish within {RUN_TIMEOUT:?}\n{}", self.output(&run, None).describe());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn run(&self, cmd: Command) -> Outcome {
        let run = self.start(cmd);
        self.finish(run)
    }

    /// Waits until `n` processes of the job have recorded their PIDs.
    fn wait_for_pids(&self, run: &mut Running, n: usize) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.pids().len() >= n {
                return;
            }
            if let Some(status) = run.child.try_wait().unwrap() {
                panic!("tools/launch exited early\n{}", self.output(run, status.code()).describe());
            }
            if Instant::now() > deadline {
                let _ = run.child.kill();
                let _ = run.child.wait();
                self.kill_job();
                panic!("only {:?} of {n} processes started\n{}", self.pids(), self.output(run, None).describe());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = fs::read_dir(&self.job)
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().strip_prefix("pid-").and_then(|p| p.parse().ok()))
            .collect();
        pids.sort();
        pids
    }

    /// What the processes named `prefix*` recorded, in name order.
    fn records(&self, prefix: &str) -> Vec<BTreeMap<String, String>> {
        let mut names: Vec<PathBuf> = fs::read_dir(&self.job)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.starts_with(prefix) && name.ends_with(".env")
            })
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| {
                fs::read_to_string(p)
                    .unwrap()
                    .lines()
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .collect()
    }

    /// Asserts that no process of the job is alive and that the launcher
    /// removed its temporary directory, allowing `settle` for cleanup that
    /// runs asynchronously (on the far side of an ssh session, or in the
    /// guardian of a killed launcher).
    fn assert_nothing_left(&self, settle: Duration) {
        let deadline = Instant::now() + settle;
        loop {
            let left = processes_mentioning(&self.marker());
            let tmpdirs = self.launcher_tmpdirs();
            if left.is_empty() && tmpdirs.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                self.kill_job();
                assert!(tmpdirs.is_empty(), "the launcher left its temporary directory behind: {tmpdirs:?}");
                panic!("processes of the job were left behind:\n{}", left.join("\n"));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill_job(&self) {
        let pids: Vec<String> =
            processes_mentioning(&self.marker()).iter().map(|p| p.split(' ').next().unwrap().to_string()).collect();
        if !pids.is_empty() {
            let _ = Command::new("sh").arg("-c").arg(format!("kill -KILL {} 2>/dev/null", pids.join(" "))).status();
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.kill_job();
        if thread::panicking() {
            eprintln!("kept {} for inspection", self.root.display());
        } else {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

fn assert_token(token: &str) {
    assert!(
        token.len() == 64 && token.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "PSERVER_TOKEN is not 32 random bytes in hex: {token:?}"
    );
}

/// Checks what a successful job's processes recorded; returns the token.
fn check_job_records(sb: &Sandbox, servers: usize, workers: usize, transport: Option<&str>) -> String {
    let sched = sb.records("scheduler");
    assert_eq!(sched.len(), 1, "one scheduler");
    let sched = &sched[0];
    let token = sched["PSERVER_TOKEN"].clone();
    assert_token(&token);
    let argv: Vec<&str> = sched["ARGV"].split(' ').collect();
    assert_eq!(
        argv[..7],
        ["scheduler", "--bind", argv[2], "--servers", &servers.to_string(), "--workers", &workers.to_string()]
    );
    assert!(argv[2].ends_with(":0"), "the scheduler binds port 0: {argv:?}");
    assert_eq!(argv[7], "--addr-file");

    let server_records = sb.records("server-");
    assert_eq!(server_records.len(), servers, "every server ran");
    let addr = server_records[0]["PSERVER_SCHEDULER"].clone();
    assert!(addr.starts_with(argv[2].trim_end_matches(":0")) && !addr.ends_with(":0"), "scheduler address {addr:?}");
    let mut expect_argv = format!("server --scheduler {addr}");
    if let Some(t) = transport {
        expect_argv += &format!(" --transport {t}");
    }
    for (i, s) in server_records.iter().enumerate() {
        assert_eq!(s["PSERVER_ROLE"], "server");
        assert_eq!(s["PSERVER_RANK"], i.to_string());
        assert_eq!(s["PSERVER_SCHEDULER"], addr);
        assert_eq!(s["PSERVER_NUM_SERVERS"], servers.to_string());
        assert_eq!(s["PSERVER_NUM_WORKERS"], workers.to_string());
        assert_eq!(s["PSERVER_TOKEN"], token, "one token for the whole job");
        assert_eq!(s["ARGV"], expect_argv);
    }

    let worker_records = sb.records("worker-");
    assert_eq!(worker_records.len(), workers, "every worker ran");
    for (r, w) in worker_records.iter().enumerate() {
        assert_eq!(w["PSERVER_ROLE"], "worker");
        assert_eq!(w["PSERVER_RANK"], r.to_string(), "ranks are 0..W-1, each once");
        assert_eq!(w["PSERVER_SCHEDULER"], addr);
        assert_eq!(w["PSERVER_NUM_SERVERS"], servers.to_string());
        assert_eq!(w["PSERVER_NUM_WORKERS"], workers.to_string());
        assert_eq!(w["PSERVER_TOKEN"], token, "one token for the whole job");
        assert_eq!(w.get("PSERVER_TRANSPORT").map(String::as_str), transport);
        assert_eq!(w["ARGV"], "ok");
    }
    token
}

#[test]
fn local_runs_scheduler_servers_and_workers_with_their_environment() {
    let sb = Sandbox::new("local");
    let out = sb.run(sb.launch(&["-s", "2", "-w", "3", "--transport", "tcp"], &sb.worker(&["ok"])));
    assert_eq!(out.code, Some(0), "{}", out.describe());
    check_job_records(&sb, 2, 3, Some("tcp"));
    assert_eq!(sb.pids().len(), 1 + 2 + 3, "one process per role instance");
    // Workers' output reaches the launcher's stdout untouched.
    let mut lines: Vec<&str> = out.stdout.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        (0..3).map(|r| format!(r#"{{"worker": {r}, "status": "ok"}}"#)).collect::<Vec<_>>(),
        "{}",
        out.describe()
    );
    assert!(!out.stderr.contains("launch:"), "a clean run prints nothing of its own\n{}", out.describe());
    sb.assert_nothing_left(Duration::ZERO);
}

#[test]
fn an_inherited_token_is_passed_through_and_never_printed() {
    let sb = Sandbox::new("token");
    let token = "ab".repeat(32);
    let mut cmd = sb.launch(&["-s", "1", "-w", "2"], &sb.worker(&["ok"]));
    cmd.env("PSERVER_TOKEN", &token);
    let out = sb.run(cmd);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert_eq!(check_job_records(&sb, 1, 2, None), token);

    let mut cmd = sb.launch(&["-s", "1", "-w", "2", "--dry-run"], &sb.worker(&["ok"]));
    cmd.env("PSERVER_TOKEN", &token);
    let out = sb.run(cmd);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(!out.stdout.contains(&token) && !out.stderr.contains(&token), "{}", out.describe());
    assert!(out.stdout.contains("PSERVER_TOKEN=<generated>"), "{}", out.describe());
}

#[test]
fn exit_code_is_the_first_failing_workers_and_nothing_is_left_behind() {
    let sb = Sandbox::new("fail");
    // Worker 1 exits 3 once every worker runs; the others would sleep forever,
    // and the scheduler waits forever for worker 1's report.
    let out = sb.run(sb.launch(&["-s", "2", "-w", "3"], &sb.worker(&["fail", "1", "3"])));
    assert_eq!(out.code, Some(3), "{}", out.describe());
    assert!(out.stderr.contains("worker 1"), "the failing worker is named\n{}", out.describe());
    assert_eq!(sb.records("worker-").len(), 3);
    assert_eq!(sb.pids().len(), 1 + 2 + 3);
    assert!(out.elapsed < Duration::from_secs(60), "stopped promptly\n{}", out.describe());
    sb.assert_nothing_left(Duration::ZERO);
}

#[test]
fn sigint_forwards_and_leaves_no_process_behind() {
    let sb = Sandbox::new("sigint");
    let grace = 3;
    let mut cmd = sb.launch(&["-s", "2", "-w", "2"], &sb.worker(&["sleep"]));
    cmd.env("PSERVER_LAUNCH_GRACE", grace.to_string());
    let mut run = sb.start(cmd);
    // scheduler + 2 servers + 2 workers + worker 0's SIGTERM-proof grandchild
    sb.wait_for_pids(&mut run, 6);
    let sent = Instant::now();
    send_signal(run.child.id(), "INT");
    let out = sb.finish(run);
    let took = sent.elapsed();
    assert_eq!(out.code, Some(130), "{}", out.describe());
    // The grandchild ignores SIGTERM: the launcher must wait out the grace
    // period, then SIGKILL it, and not much longer.
    assert!(took >= Duration::from_secs(grace), "SIGKILL came before the grace period ended: {took:?}");
    assert!(took < Duration::from_secs(grace + 20), "took {took:?} to stop\n{}", out.describe());
    sb.assert_nothing_left(Duration::ZERO);
}

#[test]
fn sigterm_exits_143_and_leaves_no_process_behind() {
    let sb = Sandbox::new("sigterm");
    let mut run = sb.start(sb.launch(&["-s", "1", "-w", "2"], &sb.worker(&["sleep-plain"])));
    sb.wait_for_pids(&mut run, 1 + 1 + 2);
    send_signal(run.child.id(), "TERM");
    let out = sb.finish(run);
    assert_eq!(out.code, Some(143), "{}", out.describe());
    sb.assert_nothing_left(Duration::ZERO);
}

#[test]
fn a_killed_launcher_leaves_no_process_behind() {
    // SIGKILL cannot be handled: the launcher's guardian process stops the job.
    let sb = Sandbox::new("sigkill");
    let mut cmd = sb.launch(&["-s", "1", "-w", "2"], &sb.worker(&["sleep"]));
    cmd.env("PSERVER_LAUNCH_GRACE", "2");
    let mut run = sb.start(cmd);
    sb.wait_for_pids(&mut run, 1 + 1 + 2 + 1);
    send_signal(run.child.id(), "KILL");
    let out = sb.finish(run);
    assert_eq!(out.code, None, "{}", out.describe());
    sb.assert_nothing_left(Duration::from_secs(30));
}

#[test]
fn servers_that_do_not_exit_after_the_workers_are_stopped_with_a_warning() {
    let sb = Sandbox::new("hungserver");
    sb.knob("server_hang=1");
    let mut cmd = sb.launch(&["-s", "2", "-w", "2"], &sb.worker(&["ok"]));
    cmd.env("PSERVER_LAUNCH_SHUTDOWN_TIMEOUT", "1");
    let out = sb.run(cmd);
    assert_eq!(out.code, Some(0), "every worker succeeded\n{}", out.describe());
    assert!(out.stderr.contains("did not exit within 1 s after the workers finished"), "{}", out.describe());
    assert!(out.stderr.contains("server 0") && out.stderr.contains("server 1"), "{}", out.describe());
    sb.assert_nothing_left(Duration::ZERO);
}

#[test]
fn a_dead_server_fails_the_job() {
    let sb = Sandbox::new("deadserver");
    sb.knob("die_server=0");
    let out = sb.run(sb.launch(&["-s", "2", "-w", "2"], &sb.worker(&["sleep-plain"])));
    assert_eq!(out.code, Some(7), "the server's exit code\n{}", out.describe());
    assert!(out.stderr.contains("server 0"), "the dead server is named\n{}", out.describe());
    sb.assert_nothing_left(Duration::ZERO);
}

#[test]
fn a_scheduler_that_dies_at_start_fails_the_job_clearly() {
    let sb = Sandbox::new("deadsched");
    sb.knob("scheduler_exit=5");
    let out = sb.run(sb.launch(&["-s", "1", "-w", "1"], &sb.worker(&["ok"])));
    assert_ne!(out.code, Some(0), "{}", out.describe());
    assert!(out.stderr.contains("scheduler exited with code 5 before writing its address"), "{}", out.describe());
    assert!(sb.records("worker-").is_empty() && sb.records("server-").is_empty(), "nothing else started");
    sb.assert_nothing_left(Duration::ZERO);

    // A scheduler that never publishes its address is given up on (and killed).
    let sb = Sandbox::new("hungsched");
    sb.knob("scheduler_hang=1");
    let mut cmd = sb.launch(&["-s", "1", "-w", "1"], &sb.worker(&["ok"]));
    cmd.env("PSERVER_LAUNCH_ADDR_TIMEOUT", "2");
    let out = sb.run(cmd);
    assert_ne!(out.code, Some(0), "{}", out.describe());
    assert!(out.stderr.contains("scheduler did not write its address within 2 s"), "{}", out.describe());
    assert!(sb.records("worker-").is_empty() && sb.records("server-").is_empty(), "nothing else started");
    sb.assert_nothing_left(Duration::ZERO);
}

#[test]
fn a_worker_command_that_cannot_run_fails_the_job_with_127() {
    let sb = Sandbox::new("nocommand");
    let missing = sb.job.join("no-such-program").to_string_lossy().into_owned();
    let out = sb.run(sb.launch(&["-s", "1", "-w", "2"], &[missing]));
    assert_eq!(out.code, Some(127), "{}", out.describe());
    assert!(out.stderr.contains("cannot start worker 0"), "{}", out.describe());
    assert_eq!(sb.records("scheduler").len(), 1, "the scheduler was started, then stopped");
    sb.assert_nothing_left(Duration::ZERO);
}

#[test]
fn bad_arguments_get_clear_errors() {
    let sb = Sandbox::new("badargs");
    let ok = sb.worker(&["ok"]);
    let no_command: &[String] = &[];
    let cases: Vec<(Vec<&str>, &[String], &str)> = vec![
        (vec!["-s", "1", "-w", "1"], no_command, "no worker command"),
        (vec!["-s", "0", "-w", "1"], &ok, "argument -s/--servers: must be a positive integer, got '0'"),
        (vec!["-s", "1", "-w", "two"], &ok, "argument -w/--workers: must be a positive integer, got 'two'"),
        (vec!["-s", "1", "-w", "-3"], &ok, "must be a positive integer"),
        (vec!["-w", "1"], &ok, "the number of servers is required"),
        (vec!["-s", "1", "-w", "1", "--launcher", "pbs"], &ok, "invalid choice: 'pbs'"),
        (vec!["-s", "1", "-w", "1", "--launcher", "ssh"], &ok, "--launcher ssh needs --hosts FILE"),
        (
            vec!["-s", "1", "-w", "1", "--launcher", "ssh", "--hosts", "/nonexistent/hosts"],
            &ok,
            "hosts file '/nonexistent/hosts' does not exist",
        ),
        (vec!["-s", "1", "-w", "1", "--launcher", "slurm"], &ok, "inside a Slurm allocation"),
        (vec!["-s", "1", "-w", "1", "--frobnicate"], &ok, "unrecognized option(s): --frobnicate"),
    ];
    for (args, worker, message) in cases {
        let mut cmd = sb.launch(&args, worker);
        cmd.env_remove("SLURM_JOB_ID");
        let out = sb.run(cmd);
        assert_eq!(out.code, Some(2), "{args:?}\n{}", out.describe());
        assert!(out.stderr.contains(message), "{args:?}: expected {message:?}\n{}", out.describe());
        assert!(out.stderr.contains("usage:") || out.stderr.contains("error:"), "{}", out.describe());
    }

    // A command without `--`.
    let mut cmd = Command::new(launch_path());
    cmd.args(["-s", "1", "-w", "1", "python3", "train.py"]).env("PSERVER_BIN", sb.bin());
    let out = sb.run(cmd);
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(out.stderr.contains("the worker command goes after '--'"), "{}", out.describe());

    // No pserver binary where PSERVER_BIN says.
    let mut cmd = sb.launch(&["-s", "1", "-w", "1"], &ok);
    cmd.env("PSERVER_BIN", "/nonexistent/pserver");
    let out = sb.run(cmd);
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(out.stderr.contains("PSERVER_BIN='/nonexistent/pserver' is not an executable file"), "{}", out.describe());

    // An empty hosts file.
    fs::write(sb.root.join("hosts"), "# nothing here\n\n").unwrap();
    let hosts = sb.root.join("hosts").to_string_lossy().into_owned();
    let out = sb.run(sb.launch(&["-s", "1", "-w", "1", "--launcher", "ssh", "--hosts", &hosts], &ok));
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(out.stderr.contains("lists no hosts"), "{}", out.describe());

    assert!(sb.pids().is_empty(), "nothing was started");

    let out = sb.run(sb.launch(&["--help"], &[]));
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(out.stdout.contains("usage: tools/launch -s S -w W"), "{}", out.describe());
}

#[test]
fn slurm_dry_run_prints_the_exact_commands() {
    let sb = Sandbox::new("slurmdry");
    let worker = ["python3", "train.py", "--lr", "0.1", "two words"].map(String::from);
    let mut cmd = sb.launch(
        &[
            "-s",
            "2",
            "-w",
            "3",
            "--launcher",
            "slurm",
            "--scheduler-host",
            "10.1.2.3",
            "--transport",
            "tcp",
            "--dry-run",
        ],
        &worker,
    );
    cmd.env("SLURM_JOB_ID", "4242");
    let run = sb.start(cmd);
    let pid = run.child.id();
    let out = sb.finish(run);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let bin = sh_quote(&sb.bin().to_string_lossy());
    let launch = sh_quote(&launch_path().to_string_lossy());
    let expected = [
        format!(
            "env PSERVER_ROLE=scheduler PSERVER_NUM_SERVERS=2 PSERVER_NUM_WORKERS=3 PSERVER_TRANSPORT=tcp \
             PSERVER_TOKEN=<generated> {bin} scheduler --bind 10.1.2.3:0 --servers 2 --workers 3 --addr-file ADDR_FILE"
        ),
        format!(
            "env PSERVER_SCHEDULER=SCHEDULER_ADDR PSERVER_NUM_SERVERS=2 PSERVER_NUM_WORKERS=3 PSERVER_TRANSPORT=tcp \
             PSERVER_TOKEN=<generated> PSERVER_BIN={bin} srun --ntasks=5 --kill-on-bad-exit=1 --distribution=cyclic \
             --job-name=pserver-launch-{pid} {launch} --role-from-rank -- python3 train.py --lr 0.1 'two words'"
        ),
    ];
    assert_eq!(out.stdout.lines().collect::<Vec<_>>(), expected, "{}", out.describe());
    assert!(sb.pids().is_empty(), "a dry run starts nothing");
}

#[test]
fn role_from_rank_execs_the_right_program_for_each_slurm_task() {
    // What each task of the srun step does, without Slurm: SLURM_PROCID 0..S-1
    // become servers, S..S+W-1 workers, each exec'd in place of the task.
    let sb = Sandbox::new("rolefromrank");
    let addr_file = sb.root.join("addr");
    let mut scheduler = Command::new(sb.bin())
        .args(["scheduler", "--bind", "127.0.0.1:0", "--servers", "1", "--workers", "2", "--addr-file"])
        .arg(&addr_file)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + START_TIMEOUT;
    while !addr_file.exists() {
        assert!(scheduler.try_wait().unwrap().is_none(), "the fake scheduler died");
        assert!(Instant::now() < deadline, "the fake scheduler never wrote its address");
        thread::sleep(Duration::from_millis(20));
    }
    let addr = fs::read_to_string(&addr_file).unwrap();
    let token = "cd".repeat(32);
    let task = |procid: u32| {
        let mut cmd = Command::new(launch_path());
        cmd.arg("--role-from-rank").arg("--").args(sb.worker(&["ok"]));
        for (key, _) in std::env::vars_os() {
            let key_s = key.to_string_lossy();
            if key_s.starts_with("PSERVER_") || ["OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"].contains(&&*key_s) {
                cmd.env_remove(key);
            }
        }
        cmd.env("SLURM_PROCID", procid.to_string())
            .env("PSERVER_SCHEDULER", &addr)
            .env("PSERVER_NUM_SERVERS", "1")
            .env("PSERVER_NUM_WORKERS", "2")
            .env("PSERVER_TOKEN", &token)
            .env("PSERVER_BIN", sb.bin())
            .current_dir(&sb.job)
            .stdin(Stdio::null());
        cmd
    };
    let runs: Vec<Running> = (0..3).map(|procid| sb.start(task(procid))).collect();
    let pids: Vec<u32> = runs.iter().map(|r| r.child.id()).collect();
    for run in runs {
        let out = sb.finish(run);
        assert_eq!(out.code, Some(0), "{}", out.describe());
    }
    let deadline = Instant::now() + START_TIMEOUT;
    let status = loop {
        if let Some(status) = scheduler.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = scheduler.kill();
            panic!("the fake scheduler did not finish");
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());

    let server = &sb.records("server-")[0];
    assert_eq!(server["PSERVER_ROLE"], "server");
    assert_eq!(server["PSERVER_RANK"], "0");
    assert_eq!(server["ARGV"], format!("server --scheduler {addr}"));
    assert_eq!(server["PID"], pids[0].to_string(), "exec'd in place of the task");
    for (r, w) in sb.records("worker-").iter().enumerate() {
        assert_eq!(w["PSERVER_ROLE"], "worker");
        assert_eq!(w["PSERVER_RANK"], r.to_string());
        assert_eq!(w["PSERVER_TOKEN"], token);
        assert_eq!(w["PID"], pids[1 + r].to_string(), "exec'd in place of the task");
    }

    let out = sb.run(task(3));
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(out.stderr.contains("SLURM_PROCID=3 is out of range"), "{}", out.describe());
    sb.assert_nothing_left(Duration::ZERO);
}

#[test]
fn mpi_runs_for_real_on_localhost() {
    if !on_path("mpirun") {
        println!("SKIPPED: mpirun not installed (apt-get install openmpi-bin)");
        return;
    }
    let sb = Sandbox::new("mpi");
    let out = sb.run(sb.launch(&["-s", "1", "-w", "2", "--launcher", "mpi"], &sb.worker(&["ok"])));
    assert_eq!(out.code, Some(0), "{}", out.describe());
    check_job_records(&sb, 1, 2, None);
    sb.assert_nothing_left(Duration::ZERO);

    // A failing worker fails the job with its exit code (mpirun reports it).
    let sb = Sandbox::new("mpifail");
    let out = sb.run(sb.launch(&["-s", "1", "-w", "2", "--launcher", "mpi"], &sb.worker(&["fail", "0", "3"])));
    assert_eq!(out.code, Some(3), "{}", out.describe());
    sb.assert_nothing_left(Duration::ZERO);
}

/// A private sshd on 127.0.0.1, as the current user, killed on drop.
struct Sshd {
    child: Child,
    port: u16,
    opts: String,
    dir: PathBuf,
}

impl Sshd {
    fn start(dir: &Path) -> Sshd {
        fs::create_dir_all(dir).unwrap();
        for key in ["host_key", "client_key"] {
            let status = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(key))
                .stdin(Stdio::null())
                .status()
                .expect("ssh-keygen");
            assert!(status.success(), "ssh-keygen failed");
        }
        fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let d = dir.display();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nPermitRootLogin prohibit-password\n\
             PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        );
        fs::write(dir.join("sshd_config"), config).unwrap();
        // Needed by sshd when it runs as root (the package's service would create it).
        let _ = fs::create_dir_all("/run/sshd");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(File::create(dir.join("sshd.log")).unwrap())
            .stderr(File::create(dir.join("sshd.err")).unwrap())
            .spawn()
            .expect("cannot run /usr/sbin/sshd");
        let opts = format!(
            "-i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
            dir.join("client_key").display()
        );
        let mut sshd = Sshd { child, port, opts, dir: dir.to_path_buf() };
        sshd.wait_ready();
        sshd
    }

    /// Waits until sshd answers with its banner.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("sshd exited ({status}): {}", fs::read_to_string(self.dir.join("sshd.err")).unwrap_or_default());
            }
            if let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut banner = String::new();
                if BufReader::new(stream).read_line(&mut banner).is_ok() && banner.starts_with("SSH-") {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "sshd did not come up on port {}", self.port);
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn ssh_runs_for_real_against_a_local_sshd() {
    let missing: Vec<&str> = [("/usr/sbin/sshd", Path::new("/usr/sbin/sshd").exists()), ("ssh", on_path("ssh"))]
        .into_iter()
        .chain([("ssh-keygen", on_path("ssh-keygen"))])
        .filter(|(_, present)| !present)
        .map(|(name, _)| name)
        .collect();
    if !missing.is_empty() {
        println!("SKIPPED: {} not installed (apt-get install openssh-server openssh-client)", missing.join(", "));
        return;
    }
    let sb = Sandbox::new("ssh");
    let sshd = Sshd::start(&sb.root.join("sshd"));
    let hosts = sb.root.join("hosts");
    fs::write(&hosts, format!("# the local sshd\n\n127.0.0.1:{}  # port\n", sshd.port)).unwrap();
    let hosts = hosts.to_string_lossy().into_owned();
    let args = ["-s", "1", "-w", "2", "--launcher", "ssh", "--hosts", &hosts];

    let mut cmd = sb.launch(&args, &sb.worker(&["ok"]));
    cmd.env("PSERVER_SSH_OPTS", &sshd.opts);
    let out = sb.run(cmd);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    check_job_records(&sb, 1, 2, None);
    assert_eq!(out.stdout.lines().filter(|l| l.contains(r#""status": "ok""#)).count(), 2, "{}", out.describe());
    assert!(!out.stdout.contains("PSERVER_REMOTE_PID"), "{}", out.describe());
    sb.assert_nothing_left(Duration::from_secs(15));

    // Ctrl-C: the remote processes (and worker 0's SIGTERM-proof grandchild,
    // on the far side) are stopped too.
    let sb = Sandbox::new("sshint");
    let mut cmd = sb.launch(&args, &sb.worker(&["sleep"]));
    cmd.env("PSERVER_SSH_OPTS", &sshd.opts).env("PSERVER_LAUNCH_GRACE", "2");
    let mut run = sb.start(cmd);
    sb.wait_for_pids(&mut run, 1 + 1 + 2 + 1);
    send_signal(run.child.id(), "INT");
    let out = sb.finish(run);
    assert_eq!(out.code, Some(130), "{}", out.describe());
    sb.assert_nothing_left(Duration::from_secs(15));

    // SIGKILL: the remote side notices that the ssh sessions are gone.
    let sb = Sandbox::new("sshkill");
    let mut cmd = sb.launch(&args, &sb.worker(&["sleep"]));
    cmd.env("PSERVER_SSH_OPTS", &sshd.opts).env("PSERVER_LAUNCH_GRACE", "2");
    let mut run = sb.start(cmd);
    sb.wait_for_pids(&mut run, 1 + 1 + 2 + 1);
    send_signal(run.child.id(), "KILL");
    let out = sb.finish(run);
    assert_eq!(out.code, None, "{}", out.describe());
    sb.assert_nothing_left(Duration::from_secs(30));
}
