//! Kernel benchmarks: tile rotation (GEMM), bf16 ↔ f32 conversion, shard write and read.
//! Run with `cargo bench --bench kernels`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dimcut::checkpoint::Checkpoint;
use dimcut::kernels::{decode_into, encode_into, matmul, FloatDtype, MatRef};
use dimcut::layout::{plan_layout, OutputTensor};
use dimcut::shards::ShardFiles;
use safetensors::Dtype;
use std::hint::black_box;

/// Deterministic values in [-1, 1).
fn values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

fn tile_rotation(c: &mut Criterion) {
    // One in_rotation tile of a Llama-3-8B-shaped projection: 64 rows × 4096 → 3072 kept.
    let (rows, hidden, keep) = (64, 4096, 3072);
    let tile = values(rows * hidden);
    let rotation = values(hidden * keep);
    let mut out = vec![0f32; rows * keep];
    let mut group = c.benchmark_group("tile_rotation");
    group.sample_size(10);
    group.throughput(Throughput::Elements((2 * rows * hidden * keep) as u64));
    group.bench_function("f32 64x4096 · 4096x3072 (flops)", |b| {
        b.iter(|| {
            matmul(
                &mut out,
                false,
                MatRef::row_major(&tile, rows, hidden),
                MatRef::row_major(&rotation, hidden, keep),
            )
        })
    });
    group.finish();
}

fn conversion(c: &mut Criterion) {
    let n = 1 << 22;
    let floats = values(n);
    let mut bytes = vec![0u8; n * 2];
    encode_into(&floats, FloatDtype::BF16, &mut bytes);
    let mut decoded = vec![0f32; n];
    let mut group = c.benchmark_group("conversion");
    group.throughput(Throughput::Bytes((n * 2) as u64));
    group.bench_function("bf16 -> f32 (4M elements)", |b| {
        b.iter(|| decode_into(FloatDtype::BF16, black_box(&bytes), &mut decoded))
    });
    let mut encoded = vec![0u8; n * 2];
    group.bench_function("f32 -> bf16 (4M elements)", |b| {
        b.iter(|| encode_into(black_box(&floats), FloatDtype::BF16, &mut encoded))
    });
    group.finish();
}

fn shard_io(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (rows, cols) = (4096, 4096);
    let tensor = OutputTensor {
        name: "w".into(),
        dtype: Dtype::BF16,
        shape: vec![rows, cols],
    };
    let layout = plan_layout(std::slice::from_ref(&tensor), usize::MAX).unwrap();
    let data = vec![0x3Fu8; tensor.nbytes()];
    let mut group = c.benchmark_group("shard_io");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(tensor.nbytes() as u64));
    group.bench_function("write 32 MiB shard in 1 MiB tiles (fsync)", |b| {
        b.iter(|| {
            let files = ShardFiles::create(dir.path(), &layout, None).unwrap();
            let (shard, offset) = layout.location[0];
            for (i, chunk) in data.chunks(1 << 20).enumerate() {
                files.write(shard, offset + i * (1 << 20), chunk).unwrap();
            }
            files.finish().unwrap();
        })
    });
    let mut decoded = vec![0f32; rows * cols];
    group.bench_function("open + decode 32 MiB bf16 shard", |b| {
        b.iter(|| {
            let checkpoint = Checkpoint::open(dir.path()).unwrap();
            let entry = checkpoint.tensor("w").unwrap();
            decode_into(FloatDtype::BF16, checkpoint.bytes(entry), &mut decoded);
        })
    });
    group.finish();
}

criterion_group!(benches, tile_rotation, conversion, shard_io);
criterion_main!(benches);
