//! Fault injection on real processes (DESIGN section 6): servers killed
//! with SIGKILL while workers push, and workers killed (and restarted), on
//! 127.0.0.1. Every test is bounded in
//! time, and asserts on results, never on speed.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// A worker process whose stdout and stderr are collected as it runs.
struct Watched {
    proc: Proc,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Watched {
    /// Waits for the process and for everything it wrote.
    fn finish(&mut self, deadline: Instant) -> std::process::ExitStatus {
        let st = loop {
            if let Some(st) = self.proc.child.try_wait().unwrap() {
                break st;
            }
            let err = self.err.lock().unwrap();
            let tail: Vec<&str> = err.lines().rev().take(200).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            assert!(
                Instant::now() < deadline,
                "{} did not finish in time; its last lines:\n{}",
                self.proc.name,
                tail.join("\n")
            );
            drop(err);
            std::thread::sleep(Duration::from_millis(20));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        st
    }
}

fn collect(r: impl Read + Send + 'static) -> (Arc<Mutex<String>>, std::thread::JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    let t = std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let mut b = b.lock().unwrap();
            b.push_str(&line);
            b.push('\n');
        }
    });
    (buf, t)
}

/// Waits for every worker; panics with all their output and the
/// scheduler's log when one failed.
fn finish_all(ws: &mut [Watched], job: &Job, deadline: Instant) {
    let statuses: Vec<_> = ws.iter_mut().map(|w| w.finish(deadline)).collect();
    if statuses.iter().any(|st| !st.success()) {
        let all: Vec<String> = ws
            .iter()
            .zip(&statuses)
            .map(|(w, st)| format!("== {} ({st}):\n{}\n{}", w.proc.name, w.out.lock().unwrap(), w.err.lock().unwrap()))
            .collect();
        panic!("a worker failed:\n{}\n== scheduler:\n{}", all.join("\n"), job.log("scheduler"));
    }
}

/// Asserts the scheduler and every server but `killed` exited 0.
fn assert_ended_well(job: &mut Job, killed: Option<usize>, deadline: Instant) {
    let st = job.scheduler.wait(deadline);
    assert!(st.success(), "scheduler failed: {st}\n{}", job.log("scheduler"));
    for (i, s) in job.servers.iter_mut().enumerate() {
        if Some(i) != killed {
            let st = s.wait(deadline);
            assert!(st.success(), "{} failed: {st}", s.name);
        }
    }
}

fn watched_worker(job: &Job, rank: u32, workers: u32, args: &[&str]) -> Watched {
    let mut cmd = job.worker_command(rank, workers, args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut proc = Proc::spawn(&format!("worker {rank}"), &mut cmd);
    let (out, r1) = collect(proc.child.stdout.take().unwrap());
    let (err, r2) = collect(proc.child.stderr.take().unwrap());
    Watched { proc, out, err, readers: vec![r1, r2] }
}

/// Waits until every worker printed `needle` on stderr.
fn wait_for(ws: &mut [Watched], needle: &str, deadline: Instant) {
    wait_for_in(ws, |w| &w.err, needle, deadline)
}

/// Waits until every worker printed `needle` on the stream `pick` chooses.
fn wait_for_in(ws: &mut [Watched], pick: impl Fn(&Watched) -> &Arc<Mutex<String>>, needle: &str, deadline: Instant) {
    for w in ws.iter_mut() {
        loop {
            if pick(w).lock().unwrap().contains(needle) {
                break;
            }
            if let Some(st) = w.proc.child.try_wait().unwrap() {
                panic!("{} exited ({st}) before {needle:?}:\n{}", w.proc.name, w.err.lock().unwrap());
            }
            assert!(Instant::now() < deadline, "{} never printed {needle:?}", w.proc.name);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// "... slowest acknowledgement X ms, epoch E" of a counting worker.
fn parse_counting(out: &str) -> (f64, u32) {
    let line = out.lines().find(|l| l.starts_with("counting passed")).unwrap_or_else(|| panic!("no result in {out:?}"));
    let ms: f64 = line.split("slowest acknowledgement ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    let epoch: u32 = line.rsplit("epoch ").next().unwrap().trim().parse().unwrap();
    (ms, epoch)
}

fn counting_survives_a_killed_primary(io: &'static str) {
    counting_survives_losing_a_primary(io, false)
}

/// `graceful`: SIGTERM (the server leaves the job and exits 0) instead of
/// SIGKILL.
fn counting_survives_losing_a_primary(io: &'static str, graceful: bool) {
    let deadline = Instant::now() + DEADLINE;
    let (servers, workers) = (3u32, 2u32);
    let mut job = start_job(io, servers, workers, &format!("fault-count-{io}"), deadline);
    let args = ["check", "--counting", "--keys", "3000", "--rounds", "150", "--pace-ms", "5"];
    let mut ws: Vec<Watched> = (0..workers).map(|r| watched_worker(&job, r, workers, &args)).collect();
    wait_for(&mut ws, "round 20 acknowledged", deadline);
    // SIGKILL: no goodbye, no flush; the victim owns about a third of
    // every table.
    let killed = Instant::now();
    if graceful {
        // SAFETY: kill(2) with a valid pid of our own child.
        assert_eq!(unsafe { libc::kill(job.servers[1].child.id() as i32, libc::SIGTERM) }, 0);
        let st = job.servers[1].wait(deadline);
        assert!(st.success(), "the server did not leave cleanly on SIGTERM: {st}");
    } else {
        job.servers[1].child.kill().unwrap();
        let _ = job.servers[1].child.wait();
    }
    if let Some(w) = ws.iter().find(|w| w.err.lock().unwrap().contains("round 150 acknowledged")) {
        panic!("{} finished before the kill: the test proves nothing", w.proc.name);
    }
    let mut recovery = 0f64;
    finish_all(&mut ws, &job, deadline);
    for w in &mut ws {
        let out = w.out.lock().unwrap().clone();
        let (slowest, epoch) = parse_counting(&out);
        assert!(epoch >= 2, "{}: no failover happened (epoch {epoch})", w.proc.name);
        eprintln!("{}: {}", w.proc.name, out.trim());
        recovery = recovery.max(slowest);
    }
    eprintln!(
        "{io}: counters exact after a server {}; slowest acknowledgement across the failover {recovery:.1} ms \
         (workers done {:.1} s after the signal)",
        if graceful { "left on SIGTERM" } else { "was SIGKILLed" },
        killed.elapsed().as_secs_f64()
    );
    assert_ended_well(&mut job, Some(1), deadline);
}

#[test]
fn counters_are_exact_after_a_primary_is_killed_std() {
    counting_survives_a_killed_primary("std");
}

#[test]
fn counters_are_exact_after_a_primary_is_killed_uring() {
    if !uring_works() {
        eprintln!("SKIPPED: io_uring is not available on this machine");
        return;
    }
    counting_survives_a_killed_primary("uring");
}

/// Two failures in a row: a primary is SIGKILLed, the job restores its
/// copies, then another server is SIGKILLed. Ranges change hands twice
/// (some to a server that took them over once already), and the counters
/// stay exact: the exactly-once seqs follow each range's history.
#[test]
fn counters_are_exact_after_two_servers_are_killed_one_after_the_other() {
    let deadline = Instant::now() + DEADLINE;
    let (servers, workers) = (4u32, 2u32);
    let mut job = start_job("std", servers, workers, "fault-count-twice", deadline);
    let args = ["check", "--counting", "--keys", "3000", "--rounds", "200", "--pace-ms", "5"];
    let mut ws: Vec<Watched> = (0..workers).map(|r| watched_worker(&job, r, workers, &args)).collect();
    wait_for(&mut ws, "round 20 acknowledged", deadline);
    job.servers[1].child.kill().unwrap();
    let _ = job.servers[1].child.wait();
    // Well after the failover (its copies restored), the second failure.
    wait_for(&mut ws, "round 70 acknowledged", deadline);
    job.servers[2].child.kill().unwrap();
    let _ = job.servers[2].child.wait();
    if let Some(w) = ws.iter().find(|w| w.err.lock().unwrap().contains("round 200 acknowledged")) {
        panic!("{} finished before the second kill: the test proves nothing", w.proc.name);
    }
    let statuses: Vec<_> = ws.iter_mut().map(|w| w.finish(deadline)).collect();
    for (w, st) in ws.iter().zip(&statuses) {
        assert!(st.success(), "{} failed ({st}):\n{}\n{}", w.proc.name, w.out.lock().unwrap(), w.err.lock().unwrap());
        let out = w.out.lock().unwrap();
        let (_, epoch) = parse_counting(&out);
        assert!(epoch >= 3, "{}: not two failovers (epoch {epoch})", w.proc.name);
        eprintln!("{}: {}", w.proc.name, out.trim());
    }
    let st = job.scheduler.wait(deadline);
    assert!(st.success(), "scheduler failed: {st}\n{}", job.log("scheduler"));
    for i in [0, 3] {
        let st = job.servers[i].wait(deadline);
        assert!(st.success(), "server {i} failed: {st}");
    }
    let _ = std::fs::remove_dir_all(&job.dir);
}

#[test]
fn a_server_leaving_on_sigterm_hands_its_ranges_over_and_counters_stay_exact() {
    counting_survives_losing_a_primary("std", true);
}

#[test]
fn without_replicas_a_killed_server_fails_the_job_with_a_clear_error() {
    let deadline = Instant::now() + DEADLINE;
    let workers = 2u32;
    let mut job = start_job_with("std", None, 2, workers, "fault-norep", deadline, &["--replicas", "0"]);
    let args = ["check", "--counting", "--keys", "1000", "--rounds", "100000", "--pace-ms", "5"];
    let mut ws: Vec<Watched> = (0..workers).map(|r| watched_worker(&job, r, workers, &args)).collect();
    wait_for(&mut ws, "round 10 acknowledged", deadline);
    job.servers[0].child.kill().unwrap();
    for w in &mut ws {
        let st = w.finish(deadline);
        assert!(!st.success(), "{} succeeded although its data was lost", w.proc.name);
    }
    let st = job.scheduler.wait(deadline);
    assert!(!st.success(), "the scheduler reported success although a server's data was lost");
    let _ = job.servers[1].wait(deadline);
}

/// The counting check with 2 servers and 2 workers (bounded delay 2 on the
/// dense table); worker 1 is SIGKILLed after an acknowledged round and a
/// new process takes its rank: the job ends well, every counter equals the
/// acknowledged pushes (the redone round's pushes apply once), and the new
/// worker resumed at its rank's clock.
fn counting_survives_a_restarted_worker(io: &'static str) {
    let deadline = Instant::now() + DEADLINE;
    let (servers, workers) = (2u32, 2u32);
    let mut job = start_job(io, servers, workers, &format!("fault-wrestart-{io}"), deadline);
    // A short pace, so that the kill often comes with a round in flight.
    let rounds = 1500;
    let args = ["check", "--counting", "--keys", "2000", "--rounds", "1500", "--pace-ms", "1", "--tau", "2"];
    let mut ws: Vec<Watched> = (0..workers).map(|r| watched_worker(&job, r, workers, &args)).collect();
    wait_for(&mut ws[1..], "round 20 acknowledged", deadline);
    ws[1].proc.child.kill().unwrap();
    let _ = ws[1].finish(deadline);
    assert!(
        !ws[1].err.lock().unwrap().contains(&format!("round {rounds} acknowledged")),
        "worker 1 finished before the kill: the test proves nothing"
    );
    let mut again = watched_worker(&job, 1, workers, &args);
    let first = ws.swap_remove(0);
    let mut ws = vec![first, again];
    let statuses: Vec<_> = ws.iter_mut().map(|w| w.finish(deadline)).collect();
    let report = |ws: &[Watched]| -> String {
        ws.iter()
            .map(|w| format!("== {}:\n{}\n{}", w.proc.name, w.out.lock().unwrap(), w.err.lock().unwrap()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        statuses.iter().all(|st| st.success()),
        "a worker failed:\n{}\n== scheduler:\n{}",
        report(&ws),
        job.log("scheduler")
    );
    for w in &ws {
        let out = w.out.lock().unwrap().clone();
        let _ = parse_counting(&out); // the line the other tests read is intact
        assert!(out.contains("(restarts 1;"), "{}: the restart is not counted:\n{out}", w.proc.name);
    }
    again = ws.pop().unwrap();
    let out = again.out.lock().unwrap().clone();
    let clock: u32 = out
        .split("resumed at clock ")
        .nth(1)
        .and_then(|t| t.split(',').next())
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("the restarted worker did not say where it resumed:\n{out}"));
    assert!((20..rounds).contains(&clock), "resumed at clock {clock}, after 20 acknowledged rounds of {rounds}");
    eprintln!("{io}: worker 1 killed after round 20 and restarted; it resumed at clock {clock}: {}", out.trim());
    assert_ended_well(&mut job, None, deadline);
}

#[test]
fn a_killed_worker_restarted_continues_and_counters_stay_exact_std() {
    counting_survives_a_restarted_worker("std");
}

#[test]
fn a_killed_worker_restarted_continues_and_counters_stay_exact_uring() {
    if !uring_works() {
        eprintln!("SKIPPED: io_uring is not available on this machine");
        return;
    }
    counting_survives_a_restarted_worker("uring");
}

#[test]
fn a_worker_restarted_across_a_server_failover_joins_the_new_epoch() {
    let deadline = Instant::now() + DEADLINE;
    let (servers, workers) = (3u32, 2u32);
    let mut job = start_job("std", servers, workers, "fault-wrestart-failover", deadline);
    let args = ["check", "--counting", "--keys", "2000", "--rounds", "1500", "--pace-ms", "1", "--tau", "2"];
    let mut ws: Vec<Watched> = (0..workers).map(|r| watched_worker(&job, r, workers, &args)).collect();
    wait_for(&mut ws[1..], "round 20 acknowledged", deadline);
    // A server dies, then (during or just after the failover) a worker.
    job.servers[1].child.kill().unwrap();
    let _ = job.servers[1].child.wait();
    ws[1].proc.child.kill().unwrap();
    let _ = ws[1].finish(deadline);
    let again = watched_worker(&job, 1, workers, &args);
    let first = ws.swap_remove(0);
    let mut ws = vec![first, again];
    finish_all(&mut ws, &job, deadline);
    for w in &ws {
        let out = w.out.lock().unwrap().clone();
        let (_, epoch) = parse_counting(&out);
        assert!(epoch >= 2, "{}: no failover happened (epoch {epoch})", w.proc.name);
        assert!(out.contains("(restarts 1;"), "{}: the restart is not counted:\n{out}", w.proc.name);
    }
    let out = ws[1].out.lock().unwrap().clone();
    assert!(out.contains("resumed at clock "), "the new worker did not say where it resumed:\n{out}");
    assert_ended_well(&mut job, Some(1), deadline);
}

/// A worker started mid-run (without a rank) in a job with a free seat
/// (`--max-workers 3`, 2 workers) takes the seat and joins at the job's
/// clock: bounded delay does not hold the others back for it, every
/// counter ends equal to the acknowledged pushes of all three, and a fourth
/// worker finds no free place.
#[test]
fn a_worker_added_mid_run_takes_a_free_seat_and_counters_stay_exact() {
    counting_with_a_worker_added(false)
}

/// As above, and the added worker is SIGKILLed once it has acknowledged
/// rounds of its own, then started again in its seat: it resumes at its
/// seat's clock and every counter is still exact.
#[test]
fn a_worker_added_mid_run_then_restarted_keeps_the_counters_exact() {
    counting_with_a_worker_added(true)
}

fn counting_with_a_worker_added(restart_it: bool) {
    let deadline = Instant::now() + DEADLINE;
    let (servers, workers) = (2u32, 2u32);
    let mut job = start_job_with("std", None, servers, workers, "fault-wjoin", deadline, &["--max-workers", "3"]);
    let args = ["check", "--counting", "--keys", "2000", "--rounds", "1500", "--pace-ms", "1", "--tau", "2"];
    let mut ws: Vec<Watched> = (0..workers).map(|r| watched_worker(&job, r, workers, &args)).collect();
    wait_for(&mut ws[1..], "round 20 acknowledged", deadline);
    let spawn_unranked = |name: &str| {
        let mut cmd = job.worker_command(0, workers, &args);
        cmd.env_remove("PSERVER_RANK").stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut proc = Proc::spawn(name, &mut cmd);
        let (out, r1) = collect(proc.child.stdout.take().unwrap());
        let (err, r2) = collect(proc.child.stderr.take().unwrap());
        Watched { proc, out, err, readers: vec![r1, r2] }
    };
    ws.push(spawn_unranked("worker joining"));
    // Once it has the seat, one more finds none.
    wait_for(&mut ws[2..], "counting: worker 2 round", deadline);
    let mut extra = spawn_unranked("worker with no seat");
    let st = extra.finish(deadline);
    let err = extra.err.lock().unwrap().clone();
    assert!(!st.success() && err.contains("no free worker place"), "a fourth worker was not refused ({st}):\n{err}");
    if restart_it {
        wait_for(&mut ws[2..], "worker 2 round 100 acknowledged", deadline);
        ws[2].proc.child.kill().unwrap();
        let _ = ws[2].finish(deadline);
        let first = ws[2].out.lock().unwrap().clone();
        assert!(!first.contains("counting passed"), "the added worker finished before the kill");
        ws[2] = watched_worker(&job, 2, workers, &args);
    }
    finish_all(&mut ws, &job, deadline);
    let out = ws[2].out.lock().unwrap().clone();
    let said = if restart_it { "resumed at clock " } else { "joined at clock " };
    let clock: u32 = out
        .split(said)
        .nth(1)
        .and_then(|t| t.split(',').next())
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("the added worker did not say where it started:\n{out}"));
    assert!((20..1500).contains(&clock), "{said}{clock}, after 20 acknowledged rounds of 1500");
    if restart_it {
        assert!(out.contains("(restarts 1;"), "the restart is not counted:\n{out}");
    }
    assert!(out.contains("counting passed on worker 2:"), "the new worker did not take seat 2:\n{out}");
    for w in &ws {
        let _ = parse_counting(&w.out.lock().unwrap()); // every counter exact, on every worker
    }
    eprintln!("the added worker {said}{clock}: {}", out.trim());
    assert_ended_well(&mut job, None, deadline);
}

#[test]
fn a_killed_worker_not_restarted_fails_the_job_after_the_restart_timeout() {
    let deadline = Instant::now() + DEADLINE;
    let workers = 2u32;
    let mut job = start_job_with("std", None, 2, workers, "fault-wlost", deadline, &["--worker-restart-timeout", "2"]);
    // Bounded delay: worker 0 would wait for worker 1's clocks if the lost
    // worker were not excluded.
    let args = ["check", "--counting", "--keys", "1000", "--rounds", "100", "--pace-ms", "5", "--tau", "2"];
    let mut ws: Vec<Watched> = (0..workers).map(|r| watched_worker(&job, r, workers, &args)).collect();
    wait_for(&mut ws[1..], "round 10 acknowledged", deadline);
    let killed = Instant::now();
    ws[1].proc.child.kill().unwrap();
    let _ = ws[1].finish(deadline);
    let st = ws[0].finish(deadline);
    let (out, err) = (ws[0].out.lock().unwrap().clone(), ws[0].err.lock().unwrap().clone());
    assert!(!st.success(), "worker 0 succeeded although worker 1 never came back:\n{out}\n{err}");
    assert!(err.contains("round 100 acknowledged"), "worker 0 was held up by the lost worker:\n{err}");
    assert!(
        err.contains("worker 1 failed: lost") && err.contains("--worker-restart-timeout 2"),
        "worker 0's error does not say what happened:\n{err}"
    );
    let st = job.scheduler.wait(deadline);
    let log = job.log("scheduler");
    assert!(!st.success(), "the scheduler reported success although worker 1 was lost");
    assert!(
        log.contains("worker 1 failed: lost (disconnected before finishing) and not restarted within 2s"),
        "the scheduler's error does not name the rank and the timeout:\n{log}"
    );
    assert!(killed.elapsed() >= Duration::from_secs(2), "the job failed before the grace period ended");
    for s in &mut job.servers {
        let _ = s.wait(deadline);
    }
}

/// What happens to a training job.
#[derive(Clone, Copy)]
enum Disturb {
    Nothing,
    /// Server 1 is SIGKILLed after this pass.
    KillServer(u32),
    /// Worker 1 is SIGKILLed after this pass (of rank 0's), and a new
    /// process takes its rank.
    RestartWorker(u32),
    /// The job checkpoints every 20 clocks; every process of it is
    /// SIGKILLed after this pass, and a new job restores the checkpoint.
    RestoreJob(u32),
}

/// Trains L1 logistic regression on `data` with 3 servers and 2 workers,
/// disturbed as `how` says. Returns the final objective (and rank 1's
/// output, when it was restarted).
fn train(data: &std::path::Path, how: Disturb, tag: &str) -> (f64, String) {
    let deadline = Instant::now() + DEADLINE;
    let ckpt = tempdir(&format!("{tag}-ckpt"));
    let ckpt_args = ["--checkpoint-dir", ckpt.to_str().unwrap(), "--checkpoint-every", "20"];
    let sched: &[&str] = if matches!(how, Disturb::RestoreJob(_)) { &ckpt_args } else { &[] };
    let mut job = start_job_with("std", None, 3, 2, tag, deadline, sched);
    let summary = job.dir.join("summary.json");
    let (d, s) = (data.to_str().unwrap(), summary.to_str().unwrap().to_string());
    let args = ["train", "lr", "--data", d, "--lambda", "1", "--iters", "30", "--tol", "0", "--summary-json", &s];
    let mut ws: Vec<Watched> = (0..2).map(|r| watched_worker(&job, r, 2, &args)).collect();
    let mut restarted = String::new();
    match how {
        Disturb::Nothing => {}
        Disturb::KillServer(pass) => {
            wait_for_in(&mut ws[..1], |w| &w.out, &format!("iter {pass:3}"), deadline);
            job.servers[1].child.kill().unwrap();
            let _ = job.servers[1].child.wait();
        }
        Disturb::RestartWorker(pass) => {
            wait_for_in(&mut ws[..1], |w| &w.out, &format!("iter {pass:3}"), deadline);
            ws[1].proc.child.kill().unwrap();
            let _ = ws[1].finish(deadline);
            ws[1] = watched_worker(&job, 1, 2, &args);
        }
        Disturb::RestoreJob(pass) => {
            wait_for_in(&mut ws[..1], |w| &w.out, &format!("iter {pass:3}"), deadline);
            for w in &mut ws {
                w.proc.child.kill().unwrap();
                let _ = w.finish(deadline);
            }
            for p in job.servers.iter_mut().chain([&mut job.scheduler]) {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
            assert!(
                !ws[0].out.lock().unwrap().contains("iter  30"),
                "training finished before the kill: the test proves nothing"
            );
            job = start_job_with("std", None, 3, 2, &format!("{tag}-again"), deadline, sched);
            ws = (0..2).map(|r| watched_worker(&job, r, 2, &args)).collect();
        }
    }
    if matches!(how, Disturb::KillServer(_) | Disturb::RestartWorker(_)) {
        assert!(
            !ws[0].out.lock().unwrap().contains("iter  30"),
            "training finished before the disturbance: the test proves nothing"
        );
    }
    for w in &mut ws {
        let st = w.finish(deadline);
        assert!(st.success(), "{} failed ({st}):\n{}\n{}", w.proc.name, w.out.lock().unwrap(), w.err.lock().unwrap());
    }
    if matches!(how, Disturb::RestartWorker(_) | Disturb::RestoreJob(_)) {
        restarted = format!("{}\n{}", ws[1].out.lock().unwrap(), ws[1].err.lock().unwrap());
    }
    let sum: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&s).unwrap()).unwrap();
    let _ = job.scheduler.wait(deadline);
    let _ = std::fs::remove_dir_all(&ckpt);
    (sum["objective"].as_f64().unwrap(), restarted)
}

/// A job SIGKILLed mid-training (every process) and started again on its
/// checkpoint directory continues from the newest checkpoint: the steps
/// before it are replayed from the restored tables, and it ends at the
/// undisturbed objective.
#[test]
fn training_restored_from_a_checkpoint_reaches_the_undisturbed_objective() {
    let (dir, data) = training_data("fault-train-restore");
    let (calm, _) = train(&data, Disturb::Nothing, "fault-train-rcalm");
    let (hit, out) = train(&data, Disturb::RestoreJob(8), "fault-train-restore");
    let line = out.lines().find(|l| l.contains("restored from a checkpoint; training continues from clock "));
    let clock: u32 = line
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("the job did not say it was restored:\n{out}"));
    assert!(clock > 0 && clock.is_multiple_of(20), "restored at clock {clock}");
    let gap = (hit - calm).abs() / calm;
    eprintln!(
        "objective undisturbed {calm:.6e}, killed after pass 8 and restored at clock {clock} {hit:.6e} ({:.5}% apart)",
        gap * 100.0
    );
    assert!(gap <= 1e-5, "restoring the job moved the final objective by {:.5}%:\n{out}", gap * 100.0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A generated CTR data set for the training tests.
fn training_data(tag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = tempdir(tag);
    let data = dir.join("train.libsvm");
    let st = Command::new(BIN)
        .args(["gen", "ctr", "--rows", "20000", "--features", "20000", "--nnz-per-row", "15", "--seed", "7", "--out"])
        .arg(&data)
        .status()
        .unwrap();
    assert!(st.success());
    (dir, data)
}

#[test]
fn training_with_a_killed_server_reaches_the_undisturbed_objective() {
    let (dir, data) = training_data("fault-train");
    let (calm, _) = train(&data, Disturb::Nothing, "fault-train-calm");
    let (hit, _) = train(&data, Disturb::KillServer(8), "fault-train-kill");
    let gap = (hit - calm).abs() / calm;
    eprintln!(
        "objective undisturbed {calm:.6e}, with a server killed after pass 8 {hit:.6e} ({:.4}% apart)",
        gap * 100.0
    );
    assert!(gap <= 0.01, "killing a server moved the final objective by {:.3}%", gap * 100.0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A worker SIGKILLed mid-training and started again continues from its
/// rank's clock: the steps of the clock it had in flight wait for it (the
/// aggregating rule keeps its place), its redone pushes apply once, and
/// the job ends at the undisturbed objective.
#[test]
fn training_with_a_restarted_worker_reaches_the_undisturbed_objective() {
    let (dir, data) = training_data("fault-train-wrestart");
    let (calm, _) = train(&data, Disturb::Nothing, "fault-train-wcalm");
    let (hit, out) = train(&data, Disturb::RestartWorker(8), "fault-train-wrestart");
    assert!(out.contains("training continues from clock "), "the new worker did not resume:\n{out}");
    let gap = (hit - calm).abs() / calm;
    let resumed = out.lines().find(|l| l.contains("training continues from clock ")).unwrap_or_default();
    eprintln!(
        "objective undisturbed {calm:.6e}, with worker 1 killed after pass 8 and restarted {hit:.6e} \
         ({:.5}% apart; {resumed})",
        gap * 100.0
    );
    // Exact but for the rebuilt margins' rounding (the order of the sums is
    // the same): a step taken without the lost worker moves it by 2e-4 or more.
    assert!(gap <= 1e-5, "restarting a worker moved the final objective by {:.5}%", gap * 100.0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Counting while a server joins the running job: it takes its ranges over
/// (two-phase migration) and the counters stay exact. `replicas` 0: the
/// ranges move with no copy anywhere else to fall back on.
fn counting_survives_a_server_joining(io: &'static str, servers: u32, replicas: u32) -> f64 {
    counting_across_a_join(io, None, servers, replicas, None)
}

/// [`counting_survives_a_server_joining`], then server `kill` SIGKILLed
/// once the join completed: the copies the join built (on the joiner, and
/// the old owners' copies of what it took) carry the job through.
/// `transport`: what servers offer and workers require (`rdma`), or the
/// default (shared memory on this host, TCP).
fn counting_across_a_join(
    io: &'static str,
    transport: Option<&str>,
    servers: u32,
    replicas: u32,
    kill: Option<usize>,
) -> f64 {
    let deadline = Instant::now() + DEADLINE;
    let workers = 2u32;
    let tag = format!("fault-join-{io}-{transport:?}-{servers}-{replicas}-{kill:?}");
    let r = replicas.to_string();
    let mut job = start_job_with(io, transport, servers, workers, &tag, deadline, &["--replicas", &r]);
    let mut args = vec!["check", "--counting", "--keys", "3000", "--rounds", "150", "--pace-ms", "5"];
    if let Some(t) = transport {
        args.extend(["--transport", t]);
    }
    let mut ws: Vec<Watched> = (0..workers).map(|r| watched_worker(&job, r, workers, &args)).collect();
    wait_for(&mut ws, "round 20 acknowledged", deadline);
    let new = job.add_server(deadline);
    // The scheduler reports the join once the new server owns its ranges.
    let migration_ms = loop {
        let log = job.log("scheduler");
        if let Some(line) = log.lines().find(|l| l.contains("server joined the job")) {
            let v = line.split("migration_ms=").nth(1).and_then(|v| v.split_whitespace().next());
            break v.and_then(|v| v.parse::<f64>().ok()).unwrap_or_else(|| panic!("no migration time in {line:?}"));
        }
        assert!(Instant::now() < deadline, "the server never joined:\n{log}");
        std::thread::sleep(Duration::from_millis(10));
    };
    if let Some(w) = ws.iter().find(|w| w.err.lock().unwrap().contains("round 150 acknowledged")) {
        panic!("{} finished before the join completed: the test proves nothing", w.proc.name);
    }
    if let Some(k) = kill {
        job.servers[k].child.kill().unwrap();
        let _ = job.servers[k].child.wait();
        if let Some(w) = ws.iter().find(|w| w.err.lock().unwrap().contains("round 150 acknowledged")) {
            panic!("{} finished before the kill: the test proves nothing", w.proc.name);
        }
    }
    finish_all(&mut ws, &job, deadline);
    let least = if kill.is_some() { 4 } else { 3 };
    for w in &mut ws {
        let out = w.out.lock().unwrap();
        let (_, epoch) = parse_counting(&out);
        assert!(epoch >= least, "{}: the workers never routed with the joined server (epoch {epoch})", w.proc.name);
        eprintln!("{}: {}", w.proc.name, out.trim());
        if transport == Some("rdma") && kill.is_none() {
            // Linked with the joined server, whose frames then went through
            // its ring in sequence (a gap would have stalled the workers).
            // Its dim-1 counters are not read by RDMA on soft-RoCE (no
            // word-atomic READ), so the final pull says nothing here.
            let err = w.err.lock().unwrap();
            assert!(
                err.contains("RDMA link opened with a server mid-job"),
                "{}: no RDMA link with the joined server:\n{err}",
                w.proc.name
            );
        }
        if transport == Some("shm") {
            // Mapped again after the join: the last read of the counters,
            // the joined server's ranges included, went through memory.
            assert!(
                out.contains("final_pull=one-sided"),
                "{}: the final pull went over the network: {out}",
                w.proc.name
            );
        }
        if transport == Some("rdma") {
            let rdma = |what: &str| -> u64 {
                out.split(what)
                    .nth(1)
                    .and_then(|v| v.split([' ', ',']).next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            // Pushes go through the rings in the servers' registered memory
            // from the first round to the last (the joiner's included).
            assert!(rdma("rdma_frames=") > 0, "{}: no push went over RDMA: {out}", w.proc.name);
        }
    }
    assert_ended_well(&mut job, kill, deadline);
    if kill == Some(new) {
        eprintln!("{io}: joined server killed after its join: counters exact");
        let _ = std::fs::remove_dir_all(&job.dir);
        return migration_ms;
    }
    // The new server served pushes of its own ranges.
    let log = job.log(&format!("server{new}"));
    let line = log.lines().find(|l| l.contains("server stopped")).unwrap_or_else(|| panic!("no summary in:\n{log}"));
    let pushes: u64 = line.split("pushes=").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(pushes > 0, "the joined server served no push: {line}");
    eprintln!(
        "{io}: {servers} servers + 1 joined (replicas {replicas}): counters exact, migration {migration_ms:.1} ms"
    );
    let _ = std::fs::remove_dir_all(&job.dir);
    migration_ms
}

/// Over shared memory: after a server joins, the workers map its shards
/// (and the others' new ones) and read them one-sided again.
#[test]
fn a_server_joining_over_shared_memory_is_read_one_sided_after_its_join() {
    if !pserver::transport::shm::available() {
        eprintln!("SKIPPED: no usable shared-memory directory");
        return;
    }
    counting_across_a_join("std", Some("shm"), 2, 1, None);
}

#[test]
fn a_server_joining_mid_run_takes_ranges_over_and_counters_stay_exact_std() {
    counting_survives_a_server_joining("std", 2, 1);
}

#[test]
fn a_server_joining_mid_run_takes_ranges_over_and_counters_stay_exact_uring() {
    if !uring_works() {
        eprintln!("SKIPPED: io_uring is not available on this machine");
        return;
    }
    counting_survives_a_server_joining("uring", 2, 1);
}

#[test]
fn a_server_joining_a_job_without_replicas_receives_its_ranges_whole() {
    counting_survives_a_server_joining("std", 1, 0);
}

#[test]
fn after_a_join_the_old_owner_can_die_and_counters_stay_exact() {
    counting_across_a_join("std", None, 2, 1, Some(0));
}

/// The joiner dies right after its join: the ranges it took go back to
/// their copies on the old owners, whose other keys moved on meanwhile (the
/// case that lost a push per worker before ranges kept their seqs apart).
#[test]
fn after_a_join_the_joined_server_can_die_and_counters_stay_exact() {
    counting_across_a_join("std", None, 2, 1, Some(2));
}

/// Over RDMA (CI runs it inside the soft-RoCE VM): workers read the
/// shards one-sided and push through rings in server memory while a server
/// joins, then the joiner is killed; the counters stay exact.
#[test]
fn rdma_a_server_joining_then_dying_keeps_the_counters_exact() {
    if rdma_device_or_skip().is_none() {
        return;
    }
    counting_across_a_join("std", Some("rdma"), 2, 1, Some(2));
}

/// Over RDMA (in the VM): the workers link with a server that joined
/// mid-run and read its shards by RDMA READ after its join.
#[test]
fn rdma_a_server_joining_is_read_over_rdma_after_its_join() {
    if rdma_device_or_skip().is_none() {
        return;
    }
    counting_across_a_join("std", Some("rdma"), 2, 1, None);
}

/// An old owner SIGKILLed while a server joins (as soon as the scheduler
/// welcomes the joiner: during the copy, or the drain, as the timing
/// falls): the join goes on with the failover's epoch and completes, and
/// the counters stay exact.
#[test]
fn an_old_owner_killed_during_a_join_leaves_the_counters_exact() {
    let deadline = Instant::now() + DEADLINE;
    let workers = 2u32;
    let mut job = start_job_with("std", None, 3, workers, "fault-join-during", deadline, &["--replicas", "1"]);
    let args = ["check", "--counting", "--keys", "3000", "--rounds", "150", "--pace-ms", "5"];
    let mut ws: Vec<Watched> = (0..workers).map(|r| watched_worker(&job, r, workers, &args)).collect();
    wait_for(&mut ws, "round 20 acknowledged", deadline);
    let new = job.add_server(deadline);
    while !job.log("scheduler").contains("welcoming a joining server") {
        assert!(Instant::now() < deadline, "the joiner was never welcomed:\n{}", job.log("scheduler"));
        std::thread::sleep(Duration::from_millis(1));
    }
    job.servers[0].child.kill().unwrap();
    let _ = job.servers[0].child.wait();
    finish_all(&mut ws, &job, deadline);
    for w in &ws {
        eprintln!("{}: {}", w.proc.name, w.out.lock().unwrap().trim());
    }
    let sched = job.log("scheduler");
    assert!(sched.contains("server joined the job"), "the join did not complete:\n{sched}");
    eprintln!("{}", sched.lines().filter(|l| l.contains("membership")).collect::<Vec<_>>().join("\n"));
    assert_ended_well(&mut job, Some(0), deadline);
    let _ = new;
    let _ = std::fs::remove_dir_all(&job.dir);
}

/// A joining server that cannot hold its copies (its `--max-memory` is too
/// small for them) stops with the reason, its join is abandoned, and the
/// job goes on without it: the counters stay exact.
#[test]
fn a_joiner_that_cannot_hold_its_copies_stops_and_the_job_goes_on() {
    let deadline = Instant::now() + DEADLINE;
    let workers = 2u32;
    let mut job = start_job_with("std", None, 2, workers, "fault-join-oom", deadline, &["--replicas", "1"]);
    let args = ["check", "--counting", "--keys", "3000", "--rounds", "100", "--pace-ms", "5"];
    let mut ws: Vec<Watched> = (0..workers).map(|r| watched_worker(&job, r, workers, &args)).collect();
    wait_for(&mut ws, "round 20 acknowledged", deadline);
    let new = job.add_server_with(deadline, &["--max-memory", "4KiB"]);
    let st = job.servers[new].wait(deadline);
    let log = job.log(&format!("server{new}"));
    assert!(!st.success(), "the joiner exited 0:\n{log}");
    assert!(log.contains("--max-memory"), "the joiner does not say why it stopped:\n{log}");
    let statuses: Vec<_> = ws.iter_mut().map(|w| w.finish(deadline)).collect();
    for (w, st) in ws.iter().zip(&statuses) {
        assert!(
            st.success(),
            "{} failed ({st}):\n{}\n== scheduler:\n{}",
            w.proc.name,
            w.err.lock().unwrap(),
            job.log("scheduler")
        );
    }
    let sched = job.log("scheduler");
    assert!(sched.contains("join is abandoned"), "the join was not abandoned:\n{sched}");
    assert!(!sched.contains("server joined the job"), "the join completed:\n{sched}");
    assert_ended_well(&mut job, Some(new), deadline);
    let _ = std::fs::remove_dir_all(&job.dir);
}
