//! Power loss at every step: the real [`FileStore`] (group commit, recovery,
//! rewrites into `.compact` files, renames, metadata files) runs seeded
//! workloads on a simulated disk ([`SimFs`]) that loses power after its
//! n-th state-changing call, for every n the workload makes. After each
//! crash the store is opened on what the disk kept, and:
//!
//! * every database equals the model after its first `k` batches, for a
//!   `k` at least the number acknowledged: every acknowledged entry,
//!   snapshot and horizon is there byte for byte, and what was not
//!   acknowledged is there whole or not at all;
//! * a rewrite interrupted anywhere left the old log or the new one (a
//!   database equal to neither fails the first rule), and its `.compact`
//!   file is gone;
//! * every metadata value is the last acknowledged one or a later one,
//!   never torn, and no temporary file is left;
//! * the recovered store takes a new write, and that write (with
//!   everything before it) survives a second power loss: recovery's cuts
//!   are durable too.
//!
//! `SYNCLINE_CRASH_SEED=<n>` replays one seed; `SYNCLINE_CRASH_SEEDS=<n>`
//! sets how many seeds a run tries (default 1,000, from a random start
//! printed with the result).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::FutureExt;
use syncline_core::{
    Batch, DbName, Entry, Store, StoredDatabase, VersionVector,
    clock::Dot,
    entry::Snapshot,
    ids::{DocId, ReplicaId},
};

use super::file::FileStore;
use super::fs::Fs;
use super::sim_fs::{Rng, SimFs};

/// Logs the writer keeps open: fewer than the databases, so files are
/// closed and reopened (the `closed_at` shortcut) during the workloads.
const MAX_OPEN: usize = 2;

fn dir() -> PathBuf {
    PathBuf::from("/data")
}

/// Databases of the workloads: a plain name, one with an escaped stem, one
/// with a dot.
fn dbs() -> Vec<DbName> {
    ["todo", "Team-1", "a.b"]
        .into_iter()
        .map(|n| DbName::new(n).expect("valid name"))
        .collect()
}

const META_KEYS: [&str; 3] = ["epoch", "k.1", "k.2"];

/// What was asked of the store and what it acknowledged.
#[derive(Debug, Default)]
struct Model {
    /// Per database, every batch submitted in order, and how many of the
    /// first ones were acknowledged.
    dbs: BTreeMap<DbName, (Vec<Batch>, usize)>,
    /// Per metadata key, every value put in order, and how many of the
    /// first ones were acknowledged.
    meta: BTreeMap<String, (Vec<Vec<u8>>, usize)>,
    /// The private value, once acknowledged.
    secret: Option<Vec<u8>>,
}

/// Makes the workload's entries: every dot distinct, contents random.
struct Gen {
    rng: Rng,
    counters: BTreeMap<(DbName, u8), u64>,
}

impl Gen {
    fn bytes(&mut self) -> Vec<u8> {
        let len = match self.rng.below(10) {
            0 => 2_000 + self.rng.below(6_000),
            _ => 1 + self.rng.below(200),
        } as usize;
        (0..len).map(|_| self.rng.next() as u8).collect()
    }

    fn entry(&mut self, db: &DbName) -> Entry {
        let r = self.rng.below(3) as u8;
        let counter = self.counters.entry((db.clone(), r)).or_insert(0);
        *counter += 1;
        let dot = Dot {
            replica: ReplicaId([r + 1; 16]),
            counter: *counter,
        };
        let doc = DocId::new(format!("d{}", self.rng.below(4))).expect("valid doc id");
        Entry {
            dot,
            doc,
            change: self.bytes(),
        }
    }

    fn append(&mut self, db: &DbName) -> Batch {
        let n = 1 + self.rng.below(3);
        Batch {
            entries: (0..n).map(|_| self.entry(db)).collect(),
            ..Batch::default()
        }
    }

    /// A compaction's record: snapshots and a horizon at what was made.
    fn compaction(&mut self, db: &DbName) -> Batch {
        let base: VersionVector = self
            .counters
            .iter()
            .filter(|((d, _), _)| d == db)
            .map(|((_, r), c)| (ReplicaId([r + 1; 16]), *c))
            .collect();
        let snapshots = (0..1 + self.rng.below(3))
            .map(|i| Snapshot {
                doc: DocId::new(format!("d{i}")).expect("valid doc id"),
                clock: base.clone(),
                bytes: self.bytes(),
            })
            .collect();
        Batch {
            entries: Vec::new(),
            snapshots,
            base: Some(base),
        }
    }
}

/// Whether a store future finished with success (the manual writer has
/// answered everything queued, so every future is ready).
fn acked<T, E>(f: impl Future<Output = Result<T, E>>) -> bool {
    matches!(f.now_or_never(), Some(Ok(_)))
}

/// Run the workload of `seed` until it ends or the disk dies. Returns the
/// model of what was submitted and acknowledged.
fn workload(seed: u64, fs: &SimFs) -> Model {
    let mut model = Model::default();
    let Ok((store, mut writer)) = FileStore::open_manual(&dir(), Arc::new(fs.clone()), MAX_OPEN)
    else {
        return model;
    };
    let mut g = Gen {
        rng: Rng::new(seed),
        counters: BTreeMap::new(),
    };
    let dbs = dbs();
    let actions = 6 + g.rng.below(10);
    for _ in 0..actions {
        if fs.crashed() {
            break;
        }
        match g.rng.below(10) {
            // A group of appends from several databases, one fsync each.
            0..=4 => {
                let mut pending = Vec::new();
                for _ in 0..1 + g.rng.below(4) {
                    let db = dbs[g.rng.below(dbs.len() as u64) as usize].clone();
                    let batch = if g.rng.chance(8) {
                        g.compaction(&db)
                    } else {
                        g.append(&db)
                    };
                    let f = store.write(&db, &batch);
                    let slot = model.dbs.entry(db.clone()).or_default();
                    slot.0.push(batch);
                    pending.push((db, slot.0.len(), f));
                }
                writer.run_pending();
                for (db, n, f) in pending {
                    if acked(f) {
                        let slot = model.dbs.get_mut(&db).expect("submitted");
                        // Batches of one database are acknowledged in order.
                        assert_eq!(slot.1 + 1, n, "an acknowledgement out of order");
                        slot.1 = n;
                    }
                }
            }
            // A rewrite, with appends arriving between its fold and switch.
            5..=6 => {
                let db = dbs[g.rng.below(dbs.len() as u64) as usize].clone();
                let Ok((tmp, from)) = store.fold_blocking(&db) else {
                    continue;
                };
                let mut pending = Vec::new();
                for _ in 0..g.rng.below(3) {
                    let batch = g.append(&db);
                    let f = store.write(&db, &batch);
                    let slot = model.dbs.entry(db.clone()).or_default();
                    slot.0.push(batch);
                    pending.push((slot.0.len(), f));
                }
                if g.rng.chance(2) {
                    // The appends in a group before the switch.
                    writer.run_pending();
                }
                let Ok(switched) = store.request_switch(&db, tmp, from) else {
                    continue;
                };
                writer.run_pending();
                for (n, f) in pending {
                    if acked(f) {
                        model.dbs.get_mut(&db).expect("submitted").1 = n;
                    }
                }
                let _ = acked(switched);
            }
            // A metadata value replaced.
            7..=8 => {
                let key = META_KEYS[g.rng.below(META_KEYS.len() as u64) as usize];
                let value = g.bytes();
                let ok = acked(store.put_meta(key, &value));
                let slot = model.meta.entry(key.to_owned()).or_default();
                slot.0.push(value);
                if ok {
                    slot.1 = slot.0.len();
                }
            }
            // The private value, made once.
            _ => {
                let value = g.bytes();
                if let Ok(v) = store.private_meta("secret", || value) {
                    model.secret = Some(v);
                }
            }
        }
    }
    model
}

/// The database after its first `k` batches, for every `k`.
fn states(batches: &[Batch]) -> Vec<StoredDatabase> {
    let mut out = vec![StoredDatabase::default()];
    let mut s = StoredDatabase::default();
    for b in batches {
        s.apply(b);
        out.push(s.clone());
    }
    out
}

/// Check the recovered disk against the model; the first broken rule.
fn check(fs: &SimFs, model: &Model, rng: &mut Rng) -> Result<(), String> {
    let (store, mut writer) = FileStore::open_manual(&dir(), Arc::new(fs.clone()), MAX_OPEN)
        .map_err(|e| format!("the store does not open after the crash: {e}"))?;
    for (sub, bad) in [("dbs", ".compact"), ("meta", "+tmp")] {
        let listing = fs
            .list(&dir().join(sub))
            .map_err(|e| format!("listing {sub}: {e}"))?;
        if let Some((name, _)) = listing.iter().find(|(n, _)| n.ends_with(bad)) {
            return Err(format!("{sub}/{name} left after recovery"));
        }
    }
    let mut expected = BTreeMap::new();
    for (db, (batches, acked)) in &model.dbs {
        let got = store
            .load_blocking(db)
            .map_err(|e| format!("{db} does not load: {e}"))?;
        let states = states(batches);
        let Some(k) = (*acked..states.len()).find(|&k| states[k] == got) else {
            return Err(format!(
                "{db}: the recovered database ({} entries, {} snapshots) is not the state after \
                 any k >= {acked} (acknowledged) of the {} batches",
                got.entries.len(),
                got.snapshots.len(),
                batches.len()
            ));
        };
        expected.insert(db.clone(), states[k].clone());
    }
    for (key, (values, acked)) in &model.meta {
        let got = store
            .get_meta(key)
            .now_or_never()
            .ok_or("get_meta did not finish")?
            .map_err(|e| format!("meta {key}: {e}"))?;
        let ok = match &got {
            None => *acked == 0,
            Some(v) => values[acked.saturating_sub(1)..].contains(v),
        };
        if !ok {
            return Err(format!(
                "meta {key}: {:?} bytes recovered; {acked} of {} values were acknowledged",
                got.map(|v| v.len()),
                values.len()
            ));
        }
    }
    if let Some(secret) = &model.secret {
        let got = store.private_meta("secret", || b"made again".to_vec());
        if got.as_ref().ok() != Some(secret) {
            return Err("the acknowledged private value changed".into());
        }
    }
    // The recovered store takes a write to every database (reopening
    // each log cuts its torn tail) and keeps it through another crash.
    let mut g = Gen {
        rng: rng.clone(),
        counters: BTreeMap::new(),
    };
    let mut writes = Vec::new();
    for db in dbs() {
        let batch = Batch {
            entries: vec![Entry {
                dot: Dot {
                    replica: ReplicaId([0xEE; 16]),
                    counter: 1,
                },
                doc: DocId::new("after").expect("valid doc id"),
                change: g.bytes(),
            }],
            ..Batch::default()
        };
        writes.push((db.clone(), store.write(&db, &batch)));
        expected.entry(db).or_default().apply(&batch);
    }
    writer.run_pending();
    for (db, f) in writes {
        if !acked(f) {
            return Err(format!("{db}: a write after recovery failed"));
        }
    }
    let again = fs.power_loss(rng);
    let (store, _writer) = FileStore::open_manual(&dir(), Arc::new(again), MAX_OPEN)
        .map_err(|e| format!("the store does not open after a second crash: {e}"))?;
    for (db, want) in expected {
        let got = store
            .load_blocking(&db)
            .map_err(|e| format!("{db} does not load after a second crash: {e}"))?;
        if got != want {
            return Err(format!(
                "{db}: after recovery, a write and a second crash, {} entries instead of {}",
                got.entries.len(),
                want.entries.len()
            ));
        }
    }
    Ok(())
}

/// Crash the workload of `seed` at every step it makes, then once more
/// after its last step (a power loss with nothing in flight).
fn crash_everywhere(seed: u64) -> u64 {
    let dry = SimFs::new();
    workload(seed, &dry);
    let steps = dry.steps();
    for at in 1..=steps + 1 {
        let fs = SimFs::new();
        fs.crash_at(at);
        let model = workload(seed, &fs);
        let mut rng = Rng::new(seed ^ at.rotate_left(32) ^ 0x5EED);
        let disk = fs.power_loss(&mut rng);
        if let Err(e) = check(&disk, &model, &mut rng) {
            panic!(
                "crash test failed: SYNCLINE_CRASH_SEED={seed}, power lost at step {at} of \
                 {steps}: {e}"
            );
        }
    }
    steps
}

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn acknowledged_writes_survive_power_loss_at_every_step() {
    if let Some(seed) = env("SYNCLINE_CRASH_SEED") {
        let steps = crash_everywhere(seed);
        println!("crash test: seed {seed} ({steps} steps) passed");
        return;
    }
    let seeds = env("SYNCLINE_CRASH_SEEDS").unwrap_or(1_000);
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        % 1_000_000_000;
    let mut crashes = 0;
    for seed in start..start + seeds {
        crashes += crash_everywhere(seed) + 1;
    }
    println!(
        "crash test: seeds {start}..{} passed, {crashes} power losses \
         (SYNCLINE_CRASH_SEED=<n> replays one)",
        start + seeds
    );
}

/// The same seeds on every run, and every seed that once failed.
#[test]
fn fixed_seeds_and_past_failures() {
    const PAST_FAILURES: [u64; 0] = [];
    for seed in (0..20).chain(PAST_FAILURES) {
        crash_everywhere(seed);
    }
}

#[test]
fn a_torn_meta_temporary_and_a_stale_compact_file_are_removed_at_open() {
    let fs = SimFs::new();
    let db = DbName::new("todo").expect("valid name");
    let batch = Gen {
        rng: Rng::new(7),
        counters: BTreeMap::new(),
    }
    .append(&db);
    {
        let (store, mut writer) =
            FileStore::open_manual(&dir(), Arc::new(fs.clone()), MAX_OPEN).expect("opens");
        let f = store.write(&db, &batch);
        writer.run_pending();
        assert!(acked(f));
        store.fold_blocking(&db).expect("folds");
        assert!(acked(store.put_meta("k.1", b"one")));
    }
    let leftover = |p: &Path| fs.exists(p);
    let compact = dir().join("dbs/todo.compact");
    assert!(leftover(&compact), "the fold wrote {}", compact.display());
    let tmp = dir().join("meta/k.1+tmp");
    fs.create(&tmp, false)
        .and_then(|mut f| f.write_all(b"torn"))
        .expect("writes");
    let (store, _writer) =
        FileStore::open_manual(&dir(), Arc::new(fs.clone()), MAX_OPEN).expect("opens");
    assert!(!leftover(&compact) && !leftover(&tmp));
    assert_eq!(
        store.load_blocking(&db).expect("loads").entries,
        batch.entries
    );
    let meta = store.get_meta("k.1").now_or_never().expect("ready");
    assert_eq!(meta.expect("reads"), Some(b"one".to_vec()));
}
