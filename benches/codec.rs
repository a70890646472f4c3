//! Frame codec throughput: encoding a frame's prefix and decoding whole
//! frames from a byte stream, at request sizes the bench uses.
//! `cargo bench --bench codec`.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pserver::transport::frame::{self, Decoder, Frame};

fn frame_of(payload: usize) -> Frame {
    Frame::new(16, 7, Bytes::from(vec![0u8; 56]))
        .with_segment(Bytes::from(vec![1u8; payload / 2]))
        .with_segment(Bytes::from(vec![2u8; payload / 2]))
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    for size in [64usize, 4 << 10, 64 << 10, 1 << 20] {
        let f = frame_of(size);
        g.throughput(Throughput::Bytes(f.wire_len()));
        g.bench_with_input(BenchmarkId::new("encode_prefix", size), &f, |b, f| {
            let mut out = Vec::with_capacity(128);
            b.iter(|| {
                out.clear();
                frame::encode_prefix(black_box(f), &mut out);
                black_box(out.len())
            })
        });
        // A stream of 16 frames back to back, decoded frame by frame.
        let one = frame::encode(&f);
        let stream: Vec<u8> = one.iter().copied().cycle().take(one.len() * 16).collect();
        g.throughput(Throughput::Bytes(stream.len() as u64));
        g.bench_with_input(BenchmarkId::new("decode_stream_x16", size), &stream, |b, s| {
            b.iter(|| {
                let mut buf = BytesMut::from(&s[..]);
                let mut d = Decoder::default();
                let mut n = 0;
                while let Some(f) = d.decode(&mut buf).unwrap() {
                    n += f.segments.len();
                }
                black_box(n)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
