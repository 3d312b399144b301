//! The on-disk store: round trips, group commit, recovery from torn tails,
//! refusal of damage in the middle, size limits, atomic rewrite.

use std::io::Write;

use syncline::store::{FileStore, MAX_RECORD, RecordError, StoreError};
use syncline_core::{Batch, DbName, DocId, Dot, Entry, ReplicaId, Snapshot, Store, VersionVector};

fn entry(r: u8, counter: u64) -> Entry {
    Entry {
        dot: Dot {
            replica: ReplicaId([r; 16]),
            counter,
        },
        doc: DocId::new(format!("doc-{}", counter % 3)).unwrap(),
        change: vec![r; 40 + counter as usize % 7],
    }
}

fn db(name: &str) -> DbName {
    DbName::new(name).unwrap()
}

fn log_path(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    dir.join("dbs").join(format!("{name}.log"))
}

#[tokio::test]
async fn writes_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    for c in 1..=5 {
        store
            .write(&db("a"), &Batch::entries(vec![entry(1, c)]))
            .await
            .unwrap();
    }
    store
        .write(&db("b"), &Batch::entries(vec![entry(2, 1)]))
        .await
        .unwrap();
    drop(store);
    let store = FileStore::open(dir.path()).unwrap();
    let a = store.load(&db("a")).await.unwrap();
    assert_eq!(a.entries, (1..=5).map(|c| entry(1, c)).collect::<Vec<_>>());
    assert_eq!(
        store.list_databases().await.unwrap(),
        vec![db("a"), db("b")]
    );
    assert_eq!(store.load(&db("nope")).await.unwrap().entries, vec![]);
    let since: VersionVector = [(ReplicaId([1; 16]), 3)].into_iter().collect();
    assert_eq!(
        store.read_since(&db("a"), &since).await.unwrap(),
        vec![entry(1, 4), entry(1, 5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    let mut tasks = Vec::new();
    for w in 0..10u8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for c in 1..=50 {
                store
                    .write(&db("g"), &Batch::entries(vec![entry(w, c)]))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = store.stats();
    let writes = stats.writes.load(std::sync::atomic::Ordering::Relaxed);
    let fsyncs = stats.fsyncs.load(std::sync::atomic::Ordering::Relaxed);
    println!("{writes} writes, {fsyncs} fsyncs");
    assert_eq!(writes, 500);
    assert!(
        fsyncs < writes,
        "group commit shares fsyncs ({fsyncs} for {writes})"
    );
    assert_eq!(store.load(&db("g")).await.unwrap().entries.len(), 500);
}

#[tokio::test]
async fn a_torn_tail_is_truncated_and_everything_before_it_kept() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStore::open(dir.path()).unwrap();
        for c in 1..=3 {
            store
                .write(&db("t"), &Batch::entries(vec![entry(1, c)]))
                .await
                .unwrap();
        }
    }
    // A crash mid-append: half a record at the end.
    let path = log_path(dir.path(), "t");
    let good_len = std::fs::metadata(&path).unwrap().len();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 9, 9]).unwrap();
    drop(f);

    let store = FileStore::open(dir.path()).unwrap();
    assert_eq!(
        store.load(&db("t")).await.unwrap().entries.len(),
        3,
        "readers stop at the tear"
    );
    store
        .write(&db("t"), &Batch::entries(vec![entry(1, 4)]))
        .await
        .unwrap();
    assert_eq!(
        store
            .stats()
            .truncations
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let all = store.load(&db("t")).await.unwrap().entries;
    assert_eq!(all, (1..=4).map(|c| entry(1, c)).collect::<Vec<_>>());
    assert!(std::fs::metadata(&path).unwrap().len() > good_len);
}

/// A flipped bit in an acknowledged record in the middle of the log is not a
/// torn tail: cutting there would drop the acknowledged records after it. The
/// store refuses the database and leaves the file untouched.
#[tokio::test]
async fn damage_in_the_middle_is_refused_and_nothing_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let mut ends = Vec::new();
    {
        let store = FileStore::open(dir.path()).unwrap();
        for c in 1..=4 {
            store
                .write(&db("f"), &Batch::entries(vec![entry(1, c)]))
                .await
                .unwrap();
            ends.push(std::fs::metadata(log_path(dir.path(), "f")).unwrap().len());
        }
    }
    // Corrupt a byte inside the third record.
    let path = log_path(dir.path(), "f");
    let mut bytes = std::fs::read(&path).unwrap();
    let inside = (ends[1] + 12) as usize;
    bytes[inside] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();

    let store = FileStore::open(dir.path()).unwrap();
    match store.load(&db("f")).await {
        Err(StoreError::Corrupt {
            problem: RecordError::Checksum { offset },
            later,
            ..
        }) => assert_eq!((offset, later), (ends[1], ends[2])),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let err = store
        .write(&db("f"), &Batch::entries(vec![entry(1, 5)]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("refusing to truncate"), "{err}");
    assert!(store.rewrite(&db("f")).await.is_err());
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "the file is untouched"
    );
    assert_eq!(
        store
            .stats()
            .truncations
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// A batch is atomic, so one too large for a record is refused with a typed
/// error before anything is written (a length cast used to wrap instead, and
/// recovery then cut the log at the unreadable record).
#[tokio::test]
async fn a_batch_larger_than_a_record_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    store
        .write(&db("big"), &Batch::entries(vec![entry(1, 1)]))
        .await
        .unwrap();
    let mut huge = entry(1, 2);
    huge.change = vec![0; MAX_RECORD + 1];
    let err = store
        .write(&db("big"), &Batch::entries(vec![huge]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Record(RecordError::TooLarge { .. })),
        "{err:?}"
    );
    store
        .write(&db("big"), &Batch::entries(vec![entry(1, 2)]))
        .await
        .unwrap();
    assert_eq!(
        store.load(&db("big")).await.unwrap().entries,
        vec![entry(1, 1), entry(1, 2)]
    );
}

/// A rewrite folds a database into several records, so a database larger
/// than one record can be compacted (it used to become one record, which
/// could exceed the read limit and make recovery cut the whole log).
#[tokio::test]
async fn rewrite_splits_a_large_database_into_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    for c in 1..=48 {
        let mut e = entry(1, c);
        e.change = vec![c as u8; 1 << 20];
        store
            .write(&db("l"), &Batch::entries(vec![e]))
            .await
            .unwrap();
    }
    let before = store.load(&db("l")).await.unwrap();
    store.rewrite(&db("l")).await.unwrap();
    let bytes = std::fs::read(log_path(dir.path(), "l")).unwrap();
    let (records, good, problem) = syncline::store::decode_records(&bytes);
    assert_eq!((good as usize, problem), (bytes.len(), None));
    assert!(records.len() >= 2, "{} records", records.len());
    drop(store);
    let store = FileStore::open(dir.path()).unwrap();
    assert_eq!(store.load(&db("l")).await.unwrap(), before);
}

#[tokio::test]
async fn rewrite_folds_the_log_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    for c in 1..=6 {
        store
            .write(&db("c"), &Batch::entries(vec![entry(1, c)]))
            .await
            .unwrap();
    }
    let snap = Snapshot {
        doc: DocId::new("doc-1").unwrap(),
        clock: [(ReplicaId([1; 16]), 4)].into_iter().collect(),
        bytes: vec![7; 30],
    };
    let base: VersionVector = [(ReplicaId([1; 16]), 4)].into_iter().collect();
    store
        .write(
            &db("c"),
            &Batch {
                entries: vec![],
                snapshots: vec![snap.clone()],
                base: Some(base.clone()),
            },
        )
        .await
        .unwrap();
    let before = store.load(&db("c")).await.unwrap();
    assert_eq!(before.entries, vec![entry(1, 5), entry(1, 6)]);
    let size_before = std::fs::metadata(log_path(dir.path(), "c")).unwrap().len();
    store.rewrite(&db("c")).await.unwrap();
    let after = store.load(&db("c")).await.unwrap();
    assert_eq!(after, before);
    assert!(std::fs::metadata(log_path(dir.path(), "c")).unwrap().len() < size_before);
    // Appends continue on the new file.
    store
        .write(&db("c"), &Batch::entries(vec![entry(1, 7)]))
        .await
        .unwrap();
    assert_eq!(store.load(&db("c")).await.unwrap().entries.len(), 3);
    assert!(!dir.path().join("dbs/c.tmp").exists());
}

#[tokio::test]
async fn metadata_round_trips_and_keys_cannot_escape() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    assert_eq!(store.get_meta("replica").await.unwrap(), None);
    store
        .put_meta("replica", b"0123456789abcdef")
        .await
        .unwrap();
    assert_eq!(
        store.get_meta("replica").await.unwrap().as_deref(),
        Some(&b"0123456789abcdef"[..])
    );
    assert!(store.put_meta("../evil", b"x").await.is_err());
    assert!(store.get_meta("..").await.is_err());
}
