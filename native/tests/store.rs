//! The on-disk store: round trips, group commit, recovery from torn tails,
//! refusal of damage in the middle, size limits, atomic rewrite.

use std::io::Write;

use syncline::store::{FileStore, MAX_RECORD, Record, RecordError, StoreError, encode_record};
use syncline_core::{
    Batch, DbName, DocId, Dot, Entry, ReplicaId, Snapshot, Store, StoredDatabase, VersionVector,
};

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

/// `dbs/<name>.log`: the log of a name without upper-case letters or device
/// names (its own file stem), and the old mapping's log of any name.
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
    let expect = StoredDatabase {
        base: base.clone(),
        snapshots: vec![snap.clone()],
        entries: vec![entry(1, 5), entry(1, 6), entry(1, 7)],
    };
    assert_eq!(store.load(&db("c")).await.unwrap(), expect);
    // The rewrite's working file (`<log>.compact`) was renamed over the
    // log: nothing but the log is left in `dbs/`, and the log itself, read
    // back by a fresh store, holds the fold and the later append.
    let compact = log_path(dir.path(), "c").with_extension("compact");
    assert!(!compact.exists(), "{} left behind", compact.display());
    drop(store);
    let mut files: Vec<String> = std::fs::read_dir(dir.path().join("dbs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with('.'))
        .collect();
    files.sort();
    assert_eq!(files, ["c.log"], "only the log is left in dbs/");
    let store = FileStore::open(dir.path()).unwrap();
    assert_eq!(store.load(&db("c")).await.unwrap(), expect);
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

/// The files in `dbs/`, lower-cased as a case-insensitive file system
/// compares them.
fn files_ignoring_case(dir: &std::path::Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir.join("dbs"))
        .unwrap()
        .map(|e| {
            e.unwrap()
                .file_name()
                .into_string()
                .unwrap()
                .to_ascii_lowercase()
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn names_differing_only_in_case_never_share_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    let names = ["ORG-1", "org-1", "Org-1"];
    for (r, name) in names.iter().enumerate() {
        for c in 1..=3 {
            store
                .write(&db(name), &Batch::entries(vec![entry(r as u8, c)]))
                .await
                .unwrap();
        }
    }
    // A rewrite's `.compact` file is named by the same mapping.
    store.rewrite(&db("ORG-1")).await.unwrap();
    store
        .write(&db("ORG-1"), &Batch::entries(vec![entry(0, 4)]))
        .await
        .unwrap();
    drop(store);
    let files = files_ignoring_case(dir.path());
    let mut distinct = files.clone();
    distinct.dedup();
    assert_eq!(distinct, files, "files share a name ignoring case");
    assert_eq!(files.len(), names.len(), "{files:?}");

    let store = FileStore::open(dir.path()).unwrap();
    let mut want: Vec<DbName> = names.iter().map(|n| db(n)).collect();
    want.sort();
    assert_eq!(store.list_databases().await.unwrap(), want);
    for (r, name) in names.iter().enumerate() {
        let last = if r == 0 { 4 } else { 3 };
        assert_eq!(
            store.load(&db(name)).await.unwrap().entries,
            (1..=last).map(|c| entry(r as u8, c)).collect::<Vec<_>>(),
            "{name}"
        );
    }
}

#[tokio::test]
async fn windows_device_names_are_never_file_names() {
    const DEVICES: [&str; 4] = ["con", "prn", "aux", "nul"];
    let is_device = |base: &str| {
        DEVICES.contains(&base)
            || (base.len() == 4
                && (base.starts_with("com") || base.starts_with("lpt"))
                && base.as_bytes()[3].is_ascii_digit())
    };
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    let names = [
        "CON",
        "nul",
        "com1.x",
        "Aux",
        "lpt9.tar.gz",
        "prn",
        "console",
    ];
    for (r, name) in names.iter().enumerate() {
        store
            .write(&db(name), &Batch::entries(vec![entry(r as u8, 1)]))
            .await
            .unwrap();
    }
    store.rewrite(&db("nul")).await.unwrap();
    drop(store);
    for file in files_ignoring_case(dir.path()) {
        let base = file.split('.').next().unwrap();
        assert!(!is_device(base), "{file} is a device on Windows");
    }
    let store = FileStore::open(dir.path()).unwrap();
    let mut want: Vec<DbName> = names.iter().map(|n| db(n)).collect();
    want.sort();
    assert_eq!(store.list_databases().await.unwrap(), want);
    for (r, name) in names.iter().enumerate() {
        assert_eq!(
            store.load(&db(name)).await.unwrap().entries,
            vec![entry(r as u8, 1)],
            "{name}"
        );
    }
}

/// A log as the old mapping named it: `dbs/<name>.log`.
fn write_legacy_log(dir: &std::path::Path, name: &str, entries: Vec<Entry>) {
    std::fs::create_dir_all(dir.join("dbs")).unwrap();
    let bytes = encode_record(&Record::from(&Batch::entries(entries))).unwrap();
    std::fs::write(log_path(dir, name), bytes).unwrap();
}

#[tokio::test]
async fn a_data_dir_from_the_old_mapping_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    write_legacy_log(dir.path(), "ORG-1", vec![entry(1, 1), entry(1, 2)]);
    write_legacy_log(dir.path(), "nul", vec![entry(2, 1)]);
    write_legacy_log(dir.path(), "org-1", vec![entry(3, 1)]);
    let store = FileStore::open(dir.path()).unwrap();
    assert_eq!(
        store.list_databases().await.unwrap(),
        vec![db("ORG-1"), db("nul"), db("org-1")]
    );
    assert_eq!(
        store.load(&db("ORG-1")).await.unwrap().entries,
        vec![entry(1, 1), entry(1, 2)]
    );
    assert_eq!(
        store.load(&db("nul")).await.unwrap().entries,
        vec![entry(2, 1)]
    );
    // The old files were renamed, not copied: writes go to the only file.
    store
        .write(&db("ORG-1"), &Batch::entries(vec![entry(1, 3)]))
        .await
        .unwrap();
    drop(store);
    assert!(!log_path(dir.path(), "ORG-1").exists());
    assert!(!log_path(dir.path(), "nul").exists());
    let files = files_ignoring_case(dir.path());
    assert_eq!(files.len(), 3, "{files:?}");
    let store = FileStore::open(dir.path()).unwrap();
    assert_eq!(
        store.load(&db("ORG-1")).await.unwrap().entries,
        vec![entry(1, 1), entry(1, 2), entry(1, 3)]
    );
    assert_eq!(
        store.load(&db("org-1")).await.unwrap().entries,
        vec![entry(3, 1)]
    );
}

#[tokio::test]
async fn an_old_log_whose_new_name_is_taken_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    store
        .write(&db("ORG-1"), &Batch::entries(vec![entry(1, 1)]))
        .await
        .unwrap();
    drop(store);
    write_legacy_log(dir.path(), "ORG-1", vec![entry(2, 1)]);
    let before = files_ignoring_case(dir.path());
    let err = FileStore::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("ORG-1.log"), "{err}");
    assert_eq!(files_ignoring_case(dir.path()), before);
    assert_eq!(
        std::fs::read(log_path(dir.path(), "ORG-1")).unwrap(),
        encode_record(&Record::from(&Batch::entries(vec![entry(2, 1)]))).unwrap()
    );
}

/// Descriptors this process holds open on files under `dir` (Linux; other
/// tests of this binary run alongside with files of their own).
#[cfg(target_os = "linux")]
fn open_fds_under(dir: &std::path::Path) -> usize {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir))
        .count()
}

/// A store written to across many databases keeps at most its budget of
/// log files open; a closed log is reopened on its next write, and
/// nothing is lost.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_writer_keeps_a_bounded_number_of_logs_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open_with(dir.path(), std::sync::Arc::new(|_| {}), 4).unwrap();
    for round in 1..=2u64 {
        for i in 0..40 {
            let batch = Batch::entries(vec![entry(1, round)]);
            store
                .write(&db(&format!("many-{i}")), &batch)
                .await
                .unwrap();
        }
    }
    let stats = store.stats();
    assert!(stats.open_files.load(std::sync::atomic::Ordering::Relaxed) <= 4);
    let open = open_fds_under(&dir.path().canonicalize().unwrap());
    assert!(
        (1..=4).contains(&open),
        "{open} descriptors open on the data dir"
    );
    assert_eq!(
        stats.truncations.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    drop(store);
    let store = FileStore::open(dir.path()).unwrap();
    for i in 0..40 {
        let stored = store.load(&db(&format!("many-{i}"))).await.unwrap();
        let counters: Vec<u64> = stored.entries.iter().map(|e| e.dot.counter).collect();
        assert_eq!(counters, [1, 2], "many-{i}");
    }
}
