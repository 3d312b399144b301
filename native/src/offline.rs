//! `dump`, `compact` and `verify` on a stopped server's data directory.

use std::path::Path;

use anyhow::{Context, Result, bail};
use syncline::store::{FileStore, decode_records, upgrade_legacy_names, valid_record_after};
use syncline_core::{Batch, Database, DbName, Log, ReplicaId, Store, StoredDatabase};

fn databases(data: &Path, only: Option<&str>) -> Result<Vec<DbName>> {
    // Logs named by the old mapping get their new names, as a server would
    // do at start.
    let dbs = data.join("dbs");
    upgrade_legacy_names(&dbs).with_context(|| format!("renaming logs in {}", dbs.display()))?;
    if let Some(name) = only {
        return Ok(vec![DbName::new(name)?]);
    }
    Ok(FileStore::list_dir(data)?)
}

fn read(data: &Path, db: &DbName) -> Result<(StoredDatabase, Option<String>, usize)> {
    let path = FileStore::log_path(data, db);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let (records, good, problem) = decode_records(&bytes);
    let n = records.len();
    let mut stored = StoredDatabase::default();
    for r in records {
        stored.apply(&Batch::from(r));
    }
    let problem = problem.map(|p| match valid_record_after(&bytes, good, usize::MAX) {
        None => format!(
            "{p}: a torn tail ({} bytes after {good} will be truncated on the next write)",
            bytes.len() as u64 - good
        ),
        Some(later) => format!(
            "{p}, and a valid record follows at offset {later}: the log is damaged in \
             the middle and the server refuses this database. Keep a copy of {}; to \
             give up everything from offset {good} on, truncate it to {good} bytes",
            path.display()
        ),
    });
    Ok((stored, problem, n))
}

/// Print `{"db", "doc", "value"}` JSON lines.
pub fn dump(data: &Path, only: Option<&str>) -> Result<()> {
    for db in databases(data, only)? {
        let (stored, _, _) = read(data, &db)?;
        let (database, errors) = Database::from_stored(
            db.clone(),
            ReplicaId::default(),
            automerge::TextEncoding::UnicodeCodePoint,
            stored,
        );
        for e in errors {
            eprintln!("{db}: {e}");
        }
        for doc in database.list() {
            let value = database.get(&doc);
            println!(
                "{}",
                serde_json::json!({"db": db.as_str(), "doc": doc.as_str(), "value": value})
            );
        }
    }
    Ok(())
}

/// Print every stored change as a JSON line with who wrote it: the
/// subjects its replica connected with (`DATA/subjects.jsonl`; empty for
/// anonymous replicas). Compacted history is a snapshot per document: its
/// line lists the replicas folded into it.
pub fn dump_changes(data: &Path, only: Option<&str>) -> Result<()> {
    let who = syncline::store::subjects::by_replica(data).context("reading the subjects file")?;
    let subjects = |r: &ReplicaId| who.get(&r.to_hex()).cloned().unwrap_or_default();
    for db in databases(data, only)? {
        let (stored, _, _) = read(data, &db)?;
        for s in &stored.snapshots {
            let replicas: Vec<_> = s
                .clock
                .iter()
                .map(|(r, counter)| {
                    serde_json::json!({"replica": r.to_hex(), "up_to": counter, "subjects": subjects(r)})
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({"db": db.as_str(), "doc": s.doc.as_str(), "snapshot": replicas})
            );
        }
        for e in &stored.entries {
            println!(
                "{}",
                serde_json::json!({
                    "db": db.as_str(),
                    "doc": e.doc.as_str(),
                    "replica": e.dot.replica.to_hex(),
                    "counter": e.dot.counter,
                    "subjects": subjects(&e.dot.replica),
                })
            );
        }
    }
    Ok(())
}

/// Fold every entry into snapshots and rewrite each log atomically.
pub fn compact(data: &Path, only: Option<&str>) -> Result<()> {
    let store = FileStore::open(data)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for db in databases(data, only)? {
        let (stored, _, _) = read(data, &db)?;
        let (log, _) = Log::from_stored(stored);
        let plan = log.plan_compaction(log.vv());
        for (doc, reason) in &plan.skipped {
            eprintln!("{db}: {doc} left uncompacted, it cannot be folded: {reason}");
        }
        let docs = plan.snapshots.len();
        runtime.block_on(async {
            store
                .write(
                    &db,
                    &Batch {
                        entries: Vec::new(),
                        snapshots: plan.snapshots,
                        base: Some(plan.base),
                    },
                )
                .await?;
            store.rewrite(&db).await
        })?;
        println!("{db}: {docs} documents snapshotted, log rewritten");
    }
    Ok(())
}

/// Check every record, counter sequence and change; fail on any problem.
pub fn verify(data: &Path, only: Option<&str>) -> Result<()> {
    let mut bad = 0;
    for db in databases(data, only)? {
        let (stored, problem, records) = read(data, &db)?;
        let mut problems: Vec<String> = problem.into_iter().collect();
        for e in &stored.entries {
            if let Err(err) = e.parse_change() {
                problems.push(err.to_string());
            }
        }
        let entries = stored.entries.len();
        let (log, gaps) = Log::from_stored(stored);
        problems.extend(gaps.iter().map(ToString::to_string));
        if problems.is_empty() {
            println!(
                "{db}: ok ({records} records, {entries} entries, {} replicas)",
                log.vv().len()
            );
        } else {
            bad += 1;
            for p in problems {
                println!("{db}: {p}");
            }
        }
    }
    if bad > 0 {
        bail!("{bad} database(s) have problems");
    }
    Ok(())
}
