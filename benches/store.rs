//! Store micro-benchmarks, reported per key: validated slot reads (the path
//! every one-sided reader takes), update application, and a 10k-key sparse
//! batch. `cargo bench --bench store`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pserver::store::shard::KeyRun;
use pserver::store::slot::{self, SlotLayout};
use pserver::store::{KeyRange, Shard, ShardConfig};
use pserver::table::mix64_public as mix64;
use pserver::updater::Rules;
use pserver::{Init, Storage, UpdaterSpec};

fn shard(storage: Storage, keys: u64, dim: u32, updater: UpdaterSpec) -> Shard {
    let rule = Rules::default().resolve(&updater).unwrap();
    let range = KeyRange::new(0, keys);
    Shard::new(
        ShardConfig {
            table: 1,
            range,
            dim,
            storage,
            init: Init::Zeros,
            workers: 1,
            files: None,
            waits_for_lost: false,
        },
        rule,
    )
    .unwrap()
}

fn validated_reads(c: &mut Criterion) {
    let mut g = c.benchmark_group("validated_read");
    let keys = 4096u64;
    for dim in [1u32, 16, 256] {
        let mut s = shard(Storage::Dense, keys, dim, UpdaterSpec::Assign);
        let vals = vec![1.5f32; keys as usize * dim as usize];
        s.push(KeyRun::Range { first: 0, count: keys as usize }, &vals).unwrap();
        let l: SlotLayout = s.layout();
        let chunk = &s.regions().1[0];
        let words = &chunk.words()[..keys as usize * l.words()];
        let mut image = vec![0u64; words.len()];
        let mut out = vec![0.0f32; keys as usize * dim as usize];
        let mut torn = Vec::new();
        g.throughput(Throughput::Elements(keys));
        g.bench_with_input(BenchmarkId::new("copy+validate", format!("dim{dim}")), &dim, |b, _| {
            b.iter(|| {
                slot::copy_words(words, &mut image);
                torn.clear();
                slot::validate_run(l, &image, &mut out, None, &mut torn);
                black_box(out[0]) + torn.len() as f32
            })
        });
    }
    g.finish();
}

fn updates(c: &mut Criterion) {
    let mut g = c.benchmark_group("apply_update");
    let keys = 65_536u64;
    for (name, updater) in [
        ("sum", UpdaterSpec::Sum),
        ("adagrad", UpdaterSpec::AdaGrad { lr: 0.1, eps: 1e-8, initial_accumulator: 0.1 }),
        ("ftrl", UpdaterSpec::Ftrl { alpha: 0.1, beta: 1.0, l1: 0.1, l2: 0.0 }),
    ] {
        for dim in [1u32, 16] {
            let mut s = shard(Storage::Dense, keys, dim, updater.clone());
            let grads = vec![0.01f32; keys as usize * dim as usize];
            g.throughput(Throughput::Elements(keys));
            g.bench_function(BenchmarkId::new(name, format!("dense_dim{dim}")), |b| {
                b.iter(|| s.push(KeyRun::Range { first: 0, count: keys as usize }, black_box(&grads)).unwrap())
            });
        }
    }
    g.finish();
}

fn sparse_batch(c: &mut Criterion) {
    for n in [10_000usize, 100_000] {
        let mut g = c.benchmark_group(format!("sparse_batch_{}k", n / 1000));
        let mut keys: Vec<u64> = (0..n as u64).map(|i| mix64(i) >> 20).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut s = shard(Storage::Sparse, u64::MAX, 1, UpdaterSpec::Sum);
        let grads = vec![1.0f32; keys.len()];
        s.push(KeyRun::List(&keys), &grads).unwrap();
        let mut out = vec![0.0f32; keys.len()];
        g.throughput(Throughput::Elements(keys.len() as u64));
        g.bench_function("push", |b| b.iter(|| s.push(KeyRun::List(black_box(&keys)), &grads).unwrap()));
        g.bench_function("pull", |b| b.iter(|| s.pull(KeyRun::List(black_box(&keys)), &mut out, None).unwrap()));
        g.finish();
    }
}

criterion_group!(benches, validated_reads, updates, sparse_batch);
criterion_main!(benches);
