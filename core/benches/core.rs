//! Micro-benchmarks of the core's hot paths:
//! `changes_since` on a 1,000-document / 100-replica database, applying
//! 10,000 entries, and encoding/decoding a 1 MB delta.
//!
//! Run with `cargo bench -p syncline-core`.

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;
use std::hint::black_box;
use syncline_core::clock::VersionVector;
use syncline_core::database::Database;
use syncline_core::entry::Entry;
use syncline_core::ids::{DbName, DocId, ReplicaId};
use syncline_core::log::Log;
use syncline_core::protocol::{self, Delta, Message};

const ENC: automerge::TextEncoding = automerge::TextEncoding::UnicodeCodePoint;

fn replica(n: usize) -> ReplicaId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&(n as u64 + 1).to_le_bytes());
    ReplicaId(id)
}

/// 100 replicas each write 100 entries, spread over 1,000 documents, all
/// merged into one log in an interleaved (causal) order.
fn big_log() -> (Log, Vec<Entry>) {
    let name = DbName::new("bench").unwrap();
    let mut writers: Vec<Database> = (0..100)
        .map(|r| Database::new(name.clone(), replica(r), ENC))
        .collect();
    let mut all = Vec::with_capacity(10_000);
    for round in 0..100 {
        for (r, w) in writers.iter_mut().enumerate() {
            let doc = DocId::new(format!("doc-{:04}", (r * 100 + round) % 1000)).unwrap();
            let v = json!({"title": format!("item {round}"), "done": round % 2 == 0, "by": r});
            if let Some(e) = w.update(&doc, &v).unwrap() {
                all.push(e);
            }
        }
    }
    let mut log = Log::new();
    for e in &all {
        log.append(e.clone()).unwrap();
    }
    (log, all)
}

fn bench_changes_since(c: &mut Criterion) {
    let (log, _) = big_log();
    let mut behind_by_one = log.vv().clone();
    for (r, n) in log.vv().clone().iter() {
        behind_by_one.set(*r, n - 1);
    }
    let mut g = c.benchmark_group("changes_since (1,000 docs, 100 replicas, 10,000 entries)");
    g.bench_function("up to date", |b| {
        b.iter(|| black_box(log.changes_since(black_box(log.vv()))))
    });
    g.bench_function("100 missing (one per replica)", |b| {
        b.iter(|| black_box(log.changes_since(black_box(&behind_by_one))))
    });
    g.bench_function("everything (empty vector)", |b| {
        b.iter(|| black_box(log.changes_since(black_box(&VersionVector::new()))))
    });
    g.finish();
}

fn bench_apply(c: &mut Criterion) {
    let (_, entries) = big_log();
    let name = DbName::new("bench").unwrap();
    let mut g = c.benchmark_group("apply");
    g.sample_size(10);
    g.throughput(Throughput::Elements(entries.len() as u64));
    g.bench_function("10,000 entries into an empty replica", |b| {
        b.iter_batched(
            || {
                (
                    Database::new(name.clone(), replica(999), ENC),
                    entries.clone(),
                )
            },
            |(mut db, entries)| {
                let applied = db.apply_entries(entries);
                assert!(applied.errors.is_empty());
                black_box(db)
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn bench_codec(c: &mut Criterion) {
    let (_, entries) = big_log();
    let mut delta = Delta {
        db: DbName::new("bench").unwrap(),
        req: 1,
        part: 0,
        last: true,
        base: VersionVector::new(),
        snapshots: Vec::new(),
        entries: Vec::new(),
        views: Vec::new(),
        vv: VersionVector::new(),
    };
    let mut size = 0;
    for e in entries.iter().cycle() {
        if size >= 1 << 20 {
            break;
        }
        size += e.encoded_len();
        delta.entries.push(e.clone());
    }
    let msg = Message::Delta(Box::new(delta));
    let frame = protocol::encode(&msg);
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function(format!("encode {} KB delta", frame.len() / 1024), |b| {
        b.iter(|| black_box(protocol::encode(black_box(&msg))))
    });
    g.bench_function(
        format!("decode+validate {} KB delta", frame.len() / 1024),
        |b| b.iter(|| black_box(protocol::decode(black_box(&frame), usize::MAX).unwrap())),
    );
    g.finish();
}

criterion_group!(benches, bench_changes_since, bench_apply, bench_codec);
criterion_main!(benches);
