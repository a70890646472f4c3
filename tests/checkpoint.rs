//! Checkpoints (DESIGN section 6): a job checkpoints every few clocks; a
//! job started again on the same directory resumes from the newest
//! checkpoint exactly (its model, its clock), with as many servers as it
//! likes; a damaged checkpoint is refused with a clear message.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pserver::transport::Transport;
use pserver::transport::inproc::Inproc;
use pserver::transport::tcp::{IoMode, Tcp};
use pserver::{JobConfig, TableSpec, UpdaterSpec, job};

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pserver-ckpt-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn transports() -> Vec<(&'static str, Arc<dyn Transport>)> {
    vec![("inproc", Arc::new(Inproc::new())), ("tcp", Arc::new(Tcp::new(IoMode::Auto, Default::default())))]
}

const DENSE: u32 = 1;
const SPARSE: u32 = 2;
const ADA: u32 = 3;
const KEYS: u64 = 500;

fn sparse_keys() -> Vec<u64> {
    (0..200u64)
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn tables(w: &pserver::Worker) -> pserver::Result<()> {
    w.create_table(TableSpec::dense(DENSE, KEYS, 2))?;
    w.create_table(TableSpec::sparse(SPARSE, u64::MAX, 1))?;
    let ada = UpdaterSpec::AdaGrad { lr: 0.5, eps: 1e-6, initial_accumulator: 0.1 };
    w.create_table(TableSpec::dense(ADA, 64, 1).updater(ada))
}

/// Every worker pushes, per clock, 1 to every dense and sparse counter and
/// a gradient to the AdaGrad table (whose state, the accumulators, must be
/// restored for the job to go on as if never stopped), for clocks
/// `from..to`.
fn work(w: &pserver::Worker, from: u32, to: u32) -> pserver::Result<()> {
    let all: Vec<u64> = (0..KEYS).collect();
    let sparse = sparse_keys();
    let ada: Vec<u64> = (0..64).collect();
    for c in from..to {
        assert_eq!(w.current_clock(), c);
        w.push(DENSE, &all, &vec![1.0; all.len() * 2])?;
        w.push(SPARSE, &sparse, &vec![1.0; sparse.len()])?;
        // The same gradient at every push of a key: the result does not
        // depend on the order in which the workers' pushes interleave.
        let g: Vec<f32> = ada.iter().map(|&k| (k % 5) as f32 - 2.0).collect();
        w.push(ADA, &ada, &g)?;
        w.clock()?;
    }
    w.wait_all()
}

fn read(w: &pserver::Worker) -> pserver::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let all: Vec<u64> = (0..KEYS).collect();
    let ada: Vec<u64> = (0..64).collect();
    Ok((w.pull(DENSE, &all)?.wait()?, w.pull(SPARSE, &sparse_keys())?.wait()?, w.pull(ADA, &ada)?.wait()?))
}

fn base(t: &Arc<dyn Transport>, servers: u32, root: &Path) -> JobConfig {
    JobConfig::default().servers(servers).workers(2).transport(t.clone()).checkpoints(root, 5)
}

#[test]
fn a_restarted_job_resumes_from_its_newest_checkpoint_exactly() {
    for (name, t) in transports() {
        let root = dir(&format!("resume-{name}"));
        // The reference: what the model is after clocks 0..10 (the newest
        // checkpoint of a job that ran 12 clocks is the one at clock 10).
        let reference = job::run(JobConfig::default().servers(2).workers(2).transport(t.clone()), |w| {
            tables(w)?;
            work(w, 0, 10)?;
            w.barrier()?;
            read(w)
        })
        .unwrap()
        .remove(0);
        job::run(base(&t, 2, &root), |w| {
            assert_eq!(w.resumed_from(), None);
            tables(w)?;
            work(w, 0, 12)
        })
        .unwrap();
        assert!(root.join("LATEST").exists(), "{name}: no checkpoint written");
        // Started again, with another number of servers: same ranges nowhere.
        for servers in [3, 1] {
            let got = job::run(base(&t, servers, &root).checkpoints(&root, 0), |w| {
                assert_eq!(w.resumed_from(), Some(10), "{name}");
                assert_eq!(w.current_clock(), 10, "{name}: the clock goes on from the checkpoint");
                tables(w)?;
                read(w)
            })
            .unwrap()
            .remove(0);
            assert_eq!(got.0, reference.0, "{name}, {servers} servers: dense table differs");
            assert!(got.0.iter().all(|&v| v == 20.0), "{name}: 10 clocks x 2 workers");
            assert_eq!(got.1, reference.1, "{name}, {servers} servers: sparse table differs");
            assert_eq!(got.2, reference.2, "{name}, {servers} servers: AdaGrad weights differ");
        }
        // The resumed job goes on: its next pushes start from the checkpoint
        // and its AdaGrad state (accumulators) was restored too.
        let (cont, fresh) = (
            job::run(base(&t, 2, &root).checkpoints(&root, 0), |w| {
                tables(w)?;
                work(w, 10, 12)?;
                w.barrier()?;
                read(w)
            })
            .unwrap()
            .remove(0),
            job::run(JobConfig::default().servers(2).workers(2).transport(t.clone()), |w| {
                tables(w)?;
                work(w, 0, 12)?;
                w.barrier()?;
                read(w)
            })
            .unwrap()
            .remove(0),
        );
        assert_eq!(cont, fresh, "{name}: resuming at clock 10 and running 2 more clocks differs from running 12");
        let _ = std::fs::remove_dir_all(&root);
    }
}

#[test]
fn a_damaged_checkpoint_is_refused_with_a_clear_message() {
    let t: Arc<dyn Transport> = Arc::new(Inproc::new());
    let root = dir("damaged");
    job::run(base(&t, 2, &root), |w| {
        tables(w)?;
        work(w, 0, 5)
    })
    .unwrap();
    let latest = std::fs::read_to_string(root.join("LATEST")).unwrap();
    let ckpt = root.join(latest.trim());
    let victim = std::fs::read_dir(&ckpt)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "ckpt") && std::fs::metadata(p).unwrap().len() > 64)
        .unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&victim, &bytes).unwrap();
    let err = job::run(base(&t, 2, &root), tables).unwrap_err().to_string();
    assert!(err.contains("damaged") && err.contains(victim.file_name().unwrap().to_str().unwrap()), "{err}");
    // A checkpoint interrupted before its manifest: LATEST still names the
    // last complete one... which here is the damaged one; naming a missing
    // one is refused too.
    std::fs::write(root.join("LATEST"), "ckpt-00000099").unwrap();
    let err = job::run(base(&t, 2, &root), tables).unwrap_err().to_string();
    assert!(err.contains("no manifest"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}
