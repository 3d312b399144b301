//! [`FileStore`]: the append-only log files, the group-commit writer thread
//! and recovery.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use syncline_core::{Batch, DbName, Entry, Store, StoredDatabase, VersionVector};
use tokio::sync::oneshot;

use super::fs::{Fs, FsFile, OsFs};
use super::names::{db_from_stem, file_stem, upgrade_legacy_names_in};
use syncline_core::record::{
    Record, RecordError, decode_records, encode_chunked, encode_record, valid_record_after,
};

/// Records a rewrite folds the database into are about this size, far under
/// [`syncline_core::record::MAX_RECORD`], so a database of any size can be rewritten.
const REWRITE_CHUNK: usize = 32 << 20;

/// How many bytes recovery may checksum while looking for a valid record
/// after a bad one before it assumes there is one (and refuses to cut).
const RESYNC_BUDGET: usize = 256 << 20;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file system refused.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
    /// The writer thread is gone (the store was shut down).
    #[error("the store is closed")]
    Closed,
    /// A metadata key that would escape the meta directory.
    #[error("invalid metadata key {0:?}")]
    BadKey(String),
    /// A record cannot be written (too large, or does not serialize).
    #[error("{0}")]
    Record(#[from] RecordError),
    /// A log is damaged in the middle: valid records follow a bad one, so
    /// cutting at the bad one would drop acknowledged data. The file is left
    /// untouched and the database refused until an operator repairs it.
    #[error(
        "{path}: {problem}, but a valid record follows at offset {later}; \
         refusing to truncate acknowledged data (see `syncline verify`)"
    )]
    Corrupt {
        /// The log file.
        path: String,
        /// What is wrong at the first bad record.
        problem: RecordError,
        /// Where the next valid record starts.
        later: u64,
    },
}

/// Decode a log and decide what its first bad record is: a torn tail (the
/// good prefix is everything; the rest may be cut) or damage in the middle
/// ([`StoreError::Corrupt`]).
fn decode_log(
    path: &Path,
    bytes: &[u8],
) -> Result<(Vec<Record>, u64, Option<RecordError>), StoreError> {
    let (records, good, problem) = decode_records(bytes);
    if let Some(p) = &problem
        && let Some(later) = valid_record_after(bytes, good, RESYNC_BUDGET)
    {
        return Err(StoreError::Corrupt {
            path: path.display().to_string(),
            problem: p.clone(),
            later,
        });
    }
    Ok((records, good, problem))
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// fsync calls made by the writer.
    pub fsyncs: AtomicU64,
    /// Write requests served.
    pub writes: AtomicU64,
    /// Total microseconds spent in fsync.
    pub fsync_micros: AtomicU64,
    /// Records dropped by recovery (torn or corrupt tails).
    pub truncations: AtomicU64,
    /// Log files the writer holds open now (at most `max_open_files`).
    pub open_files: AtomicU64,
    /// Bytes the database logs take (summed at open, then kept by the
    /// writer: appends add, recovery cuts and rewrites subtract).
    pub log_bytes: AtomicU64,
}

/// Log files the writer keeps open by default: one per database written
/// recently, the least recently used closed past this (a server whose
/// clients write to a million databases must not run out of descriptors,
/// and then fail `accept()` and every write).
pub const DEFAULT_MAX_OPEN_FILES: usize = 256;

struct WriteReq {
    db: DbName,
    kind: ReqKind,
    done: oneshot::Sender<Result<(), String>>,
}

enum ReqKind {
    /// Append one encoded record.
    Append(Vec<u8>),
    /// Switch to a rewritten file: `tmp` holds the log up to `from`; copy
    /// the records appended since, then rename it over the log.
    Switch { tmp: PathBuf, from: u64 },
}

/// The suffix of a log's rewritten copy while [`FileStore::rewrite`] runs
/// (`<stem>.compact`); one left by a crash is removed at open.
const REWRITE_SUFFIX: &str = ".compact";

/// The suffix of a metadata value's temporary file (`meta/<key>+tmp`; `+`
/// is in no key, so no key's file is another's temporary).
const META_TMP_SUFFIX: &str = "+tmp";

/// An append-only log per database in a data directory.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
    tx: mpsc::Sender<WriteReq>,
    stats: Arc<StoreStats>,
    fs: Arc<dyn Fs>,
}

impl std::fmt::Debug for WriteReq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WriteReq({})", self.db)
    }
}

impl FileStore {
    /// Open (creating) a data directory and start its writer thread. Logs
    /// named by the old mapping (`<name>.log` for every name) are renamed
    /// first (see [`upgrade_legacy_names`]).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with_observer(dir, Arc::new(|_| {}))
    }

    /// Like [`FileStore::open`], calling `observer` with every fsync's latency.
    pub fn open_with_observer(
        dir: impl AsRef<Path>,
        observer: Arc<dyn Fn(Duration) + Send + Sync>,
    ) -> Result<Self, StoreError> {
        Self::open_with(dir, observer, DEFAULT_MAX_OPEN_FILES)
    }

    /// Like [`FileStore::open_with_observer`], keeping at most
    /// `max_open_files` logs open (at least one).
    pub fn open_with(
        dir: impl AsRef<Path>,
        observer: Arc<dyn Fn(Duration) + Send + Sync>,
        max_open_files: usize,
    ) -> Result<Self, StoreError> {
        let (store, writer, rx) =
            Self::open_on(dir.as_ref(), Arc::new(OsFs), observer, max_open_files)?;
        std::thread::Builder::new()
            .name("syncline-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err("starting the writer thread"))?;
        Ok(store)
    }

    /// Open the data directory `dir` on `fs`: the store, and its writer
    /// with the queue it serves (run on a thread by [`FileStore::open_with`],
    /// step by step by the crash tests).
    fn open_on(
        dir: &Path,
        fs: Arc<dyn Fs>,
        observer: Arc<dyn Fn(Duration) + Send + Sync>,
        max_open_files: usize,
    ) -> Result<(Self, Writer, mpsc::Receiver<WriteReq>), StoreError> {
        let dir = dir.to_path_buf();
        for sub in ["dbs", "meta"] {
            fs.create_dir_all(&dir.join(sub))
                .map_err(io_err(format!("creating {}", dir.display())))?;
        }
        let dbs = dir.join("dbs");
        upgrade_legacy_names_in(&*fs, &dbs)
            .map_err(io_err(format!("renaming logs in {}", dbs.display())))?;
        remove_leftovers(&*fs, &dir)?;
        let (tx, rx) = mpsc::channel::<WriteReq>();
        let stats = Arc::new(StoreStats::default());
        stats.log_bytes.store(
            logs_size(&*fs, &dbs).map_err(io_err(format!("listing {}", dbs.display())))?,
            Ordering::Relaxed,
        );
        let writer = Writer {
            dir: dir.clone(),
            fs: fs.clone(),
            files: HashMap::new(),
            stats: stats.clone(),
            observer,
            max_open: max_open_files.max(1),
            used: HashMap::new(),
            tick: 0,
            closed_at: HashMap::new(),
        };
        Ok((FileStore { dir, tx, stats, fs }, writer, rx))
    }

    /// Open `dir` on `fs` with a writer that runs only when the caller asks
    /// ([`ManualWriter::run_pending`]): the crash tests' deterministic store.
    #[cfg(test)]
    pub(crate) fn open_manual(
        dir: &Path,
        fs: Arc<dyn Fs>,
        max_open_files: usize,
    ) -> Result<(Self, ManualWriter), StoreError> {
        let (store, writer, rx) = Self::open_on(dir, fs, Arc::new(|_| {}), max_open_files)?;
        Ok((store, ManualWriter { writer, rx }))
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Write and fsync counters.
    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// The log of `db` in the data directory `dir` (see [`file_stem`]).
    pub fn log_path(dir: &Path, db: &DbName) -> PathBuf {
        // DbName allows only [A-Za-z0-9._-] and never "." or "..", and the
        // stem adds only '+', so the path stays in `dbs`.
        dir.join("dbs").join(format!("{}.log", file_stem(db)))
    }

    /// Names of the databases with a log file in the data directory `dir`.
    pub fn list_dir(dir: &Path) -> Result<Vec<DbName>, StoreError> {
        list_logs(&OsFs, dir)
    }

    /// Read a database's log up to a torn tail (read-only). Damage in the
    /// middle of the log is an error ([`StoreError::Corrupt`]), not a
    /// shorter database.
    pub fn load_blocking(&self, db: &DbName) -> Result<StoredDatabase, StoreError> {
        let path = Self::log_path(&self.dir, db);
        let bytes = match self.fs.read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(StoredDatabase::default()),
            Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
        };
        let (records, _, problem) = decode_log(&path, &bytes)?;
        if let Some(p) = problem {
            tracing::warn!(%db, "log has a bad tail (will be truncated on next write): {p}");
        }
        let mut stored = StoredDatabase::default();
        for r in records {
            stored.apply(&Batch::from(r));
        }
        Ok(stored)
    }

    /// Names of the databases with a log file.
    pub fn list_blocking(&self) -> Result<Vec<DbName>, StoreError> {
        list_logs(&*self.fs, &self.dir)
    }

    /// Queue a batch for the writer; the receiver resolves after fsync.
    /// A batch too large for one record is refused here (a batch is atomic,
    /// so it cannot be split).
    fn submit(
        &self,
        db: &DbName,
        batch: &Batch,
    ) -> Result<oneshot::Receiver<Result<(), String>>, StoreError> {
        let bytes = encode_record(&Record::from(batch))?;
        let (done, rx) = oneshot::channel();
        let req = WriteReq {
            db: db.clone(),
            kind: ReqKind::Append(bytes),
            done,
        };
        // If the writer is gone, `done` is dropped and the receiver errors.
        let _ = self.tx.send(req);
        Ok(rx)
    }

    /// Fold a database's log into a fresh file (records of at most
    /// `REWRITE_CHUNK` bytes) and switch to it atomically (write, fsync,
    /// rename, fsync dir). Refuses a log damaged in the middle. The fold runs on a
    /// blocking task from the log as it is now; the writer thread then only
    /// copies the records appended meanwhile and renames, so neither readers
    /// nor writers wait for the fold.
    pub async fn rewrite(&self, db: &DbName) -> Result<(), StoreError> {
        let path = Self::log_path(&self.dir, db);
        let (this, d) = (self.clone(), db.clone());
        let (tmp, from) = tokio::task::spawn_blocking(move || this.fold_blocking(&d))
            .await
            .map_err(|_| StoreError::Closed)??;
        let rx = self.request_switch(db, tmp, from)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Io {
                context: format!("switching {}", path.display()),
                source: io::Error::other(e),
            }),
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// A rewrite's first half: fold the log as it is now into
    /// `<stem>.compact` (written and fsynced). Returns that file and the
    /// length of the log it holds.
    pub(super) fn fold_blocking(&self, db: &DbName) -> Result<(PathBuf, u64), StoreError> {
        let path = Self::log_path(&self.dir, db);
        let tmp = rewrite_path(&path);
        let folding = io_err(format!("folding {}", path.display()));
        let bytes = match self.fs.read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(folding(e)),
        };
        let (records, good, _) = decode_log(&path, &bytes)?;
        let mut stored = StoredDatabase::default();
        for r in records {
            stored.apply(&Batch::from(r));
        }
        let bytes = encode_chunked(stored.base, stored.snapshots, stored.entries, REWRITE_CHUNK)?;
        let write = || -> io::Result<()> {
            let mut f = self.fs.create(&tmp, false)?;
            f.write_all(&bytes)?;
            f.sync_all()
        };
        write().map_err(folding)?;
        Ok((tmp, good))
    }

    /// A rewrite's second half: ask the writer to copy what was appended
    /// after `from` onto `tmp` and rename it over the log.
    pub(super) fn request_switch(
        &self,
        db: &DbName,
        tmp: PathBuf,
        from: u64,
    ) -> Result<oneshot::Receiver<Result<(), String>>, StoreError> {
        let (done, rx) = oneshot::channel();
        let req = WriteReq {
            db: db.clone(),
            kind: ReqKind::Switch { tmp, from },
            done,
        };
        self.tx.send(req).map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    /// The secret metadata value `key`, created by `make` if absent: like
    /// [`Store::put_meta`], but the file is readable by its owner only
    /// (mode 0600 from its creation, so it is never readable by others,
    /// not even between its creation and a `chmod`). For a replica's key.
    pub fn private_meta(
        &self,
        key: &str,
        make: impl FnOnce() -> Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        let path = self.meta_path(key)?;
        match self.fs.read(&path) {
            Ok(b) => return Ok(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
        }
        let value = make();
        write_file_atomically(&*self.fs, &path, &value, true)
            .map_err(io_err(format!("writing {}", path.display())))?;
        Ok(value)
    }

    fn meta_path(&self, key: &str) -> Result<PathBuf, StoreError> {
        if DbName::is_valid(key) {
            Ok(self.dir.join("meta").join(key))
        } else {
            Err(StoreError::BadKey(key.to_owned()))
        }
    }
}

/// `counter -= n`, stopping at zero (a count that drifted under the truth,
/// say after a torn append, must not wrap to "full").
fn subtract(counter: &AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(n))
    });
}

/// Bytes of the `.log` files in `dbs`.
fn logs_size(fs: &dyn Fs, dbs: &Path) -> io::Result<u64> {
    Ok(fs
        .list(dbs)?
        .into_iter()
        .filter(|(name, _)| name.ends_with(".log"))
        .map(|(_, len)| len)
        .sum())
}

/// Names of the databases with a log file in the data directory `dir`.
fn list_logs(fs: &dyn Fs, dir: &Path) -> Result<Vec<DbName>, StoreError> {
    let dbs = dir.join("dbs");
    let mut out: Vec<DbName> = fs
        .list(&dbs)
        .map_err(io_err(format!("listing {}", dbs.display())))?
        .into_iter()
        .filter_map(|(name, _)| name.strip_suffix(".log").and_then(db_from_stem))
        .collect();
    out.sort();
    Ok(out)
}

/// Where a log's rewrite is written before it replaces the log.
fn rewrite_path(log: &Path) -> PathBuf {
    let mut name = log.file_stem().unwrap_or_default().to_os_string();
    name.push(REWRITE_SUFFIX);
    log.with_file_name(name)
}

/// Remove what a crash can leave behind: a rewrite's `.compact` file (the
/// rewrite did not switch, so the log is whole) and metadata temporary
/// files (the value was not replaced). Nothing else is touched.
fn remove_leftovers(fs: &dyn Fs, dir: &Path) -> Result<(), StoreError> {
    for (sub, suffix) in [("dbs", REWRITE_SUFFIX), ("meta", META_TMP_SUFFIX)] {
        let sub = dir.join(sub);
        let listing = io_err(format!("listing {}", sub.display()));
        for (name, _) in fs.list(&sub).map_err(listing)? {
            if name.ends_with(suffix) {
                let path = sub.join(&name);
                tracing::info!("removing {}, left by an interrupted write", path.display());
                fs.remove_file(&path)
                    .map_err(io_err(format!("removing {}", path.display())))?;
            }
        }
    }
    Ok(())
}

/// Write `bytes` to a temporary file, fsync it, rename it over `path` and
/// fsync the directory. `private`: mode 0600 from the file's creation.
fn write_file_atomically(fs: &dyn Fs, path: &Path, bytes: &[u8], private: bool) -> io::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(META_TMP_SUFFIX);
    let tmp = path.with_file_name(name);
    if private {
        // A stale temporary file may have other permissions: start afresh.
        match fs.remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    {
        let mut f = fs.create(&tmp, private)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs.rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        fs.sync_dir(parent)?;
    }
    Ok(())
}

/// The writer of a store opened with [`FileStore::open_manual`]: it commits
/// what is queued when asked, on the caller's thread.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct ManualWriter {
    writer: Writer,
    rx: mpsc::Receiver<WriteReq>,
}

#[cfg(test)]
impl ManualWriter {
    /// Commit every queued request as one group; how many there were.
    pub(crate) fn run_pending(&mut self) -> usize {
        let group: Vec<WriteReq> = self.rx.try_iter().collect();
        let n = group.len();
        if n > 0 {
            self.writer.commit(group);
        }
        n
    }
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Writer({})", self.dir.display())
    }
}

struct Writer {
    dir: PathBuf,
    fs: Arc<dyn Fs>,
    files: HashMap<DbName, Box<dyn FsFile>>,
    stats: Arc<StoreStats>,
    observer: Arc<dyn Fn(Duration) + Send + Sync>,
    /// Most files kept open ([`DEFAULT_MAX_OPEN_FILES`]).
    max_open: usize,
    /// When each open file was last written (a counter of groups).
    used: HashMap<DbName, u64>,
    tick: u64,
    /// The length of each log this writer closed after a successful fsync:
    /// reopened at that length, it needs no recovery read.
    closed_at: HashMap<DbName, u64>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<WriteReq>) {
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            while group.len() < 4096 {
                match rx.try_recv() {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                }
            }
            self.commit(group);
        }
    }

    /// Append every request, fsync each touched file once, then answer.
    fn commit(&mut self, group: Vec<WriteReq>) {
        enum Answer {
            Now(Result<(), String>),
            AfterSync(DbName),
        }
        let mut results: HashMap<DbName, Result<(), String>> = HashMap::new();
        let mut order = Vec::new();
        let mut answers = Vec::with_capacity(group.len());
        for req in group {
            let bytes = match req.kind {
                ReqKind::Switch { tmp, from } => {
                    // Appends queued before this in the group must be in the
                    // old file's tail before it is copied.
                    if let Some(f) = self.files.get_mut(&req.db) {
                        let _ = f.sync_data();
                    }
                    let r = self.switch(&req.db, &tmp, from).map_err(|e| e.to_string());
                    answers.push((req.done, Answer::Now(r)));
                    continue;
                }
                ReqKind::Append(bytes) => bytes,
            };
            let r = results.entry(req.db.clone()).or_insert(Ok(()));
            if r.is_ok()
                && let Err(e) = self.append(&req.db, &bytes)
            {
                *r = Err(e.to_string());
            }
            if !order.contains(&req.db) {
                order.push(req.db.clone());
            }
            answers.push((req.done, Answer::AfterSync(req.db)));
        }
        for db in &order {
            if !results.get(db).is_some_and(Result::is_ok) {
                continue;
            }
            let started = Instant::now();
            let synced = self.files.get_mut(db).map(|f| f.sync_data());
            let took = started.elapsed();
            self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
            self.stats
                .fsync_micros
                .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
            (self.observer)(took);
            if let Some(Err(e)) = synced {
                results.insert(db.clone(), Err(format!("fsync: {e}")));
                // Forget the handle: the next write reopens and recovers.
                self.files.remove(db);
            }
        }
        // Everything written is fsynced: close what is over the budget
        // before answering (an answered writer sees the budget kept).
        self.tick += 1;
        for db in &order {
            if self.files.contains_key(db) {
                self.used.insert(db.clone(), self.tick);
            }
        }
        self.close_least_used();
        for (done, answer) in answers {
            let r = match answer {
                Answer::Now(r) => r,
                Answer::AfterSync(db) => results
                    .get(&db)
                    .cloned()
                    .unwrap_or_else(|| Err("not written".into())),
            };
            self.stats.writes.fetch_add(1, Ordering::Relaxed);
            let _ = done.send(r);
        }
    }

    /// Close the least recently written logs past `max_open` (everything
    /// written is fsynced by now).
    fn close_least_used(&mut self) {
        let over = self.files.len().saturating_sub(self.max_open);
        if over > 0 {
            let mut by_use: Vec<(u64, DbName)> = self
                .files
                .keys()
                .map(|db| (self.used.get(db).copied().unwrap_or(0), db.clone()))
                .collect();
            by_use.sort_unstable();
            for (_, db) in by_use.into_iter().take(over) {
                self.used.remove(&db);
                if let Some(f) = self.files.remove(&db)
                    && let Ok(len) = f.len()
                {
                    // Bounded too: past it, reopening reads the log again.
                    if self.closed_at.len() >= 64 * self.max_open {
                        self.closed_at.clear();
                    }
                    self.closed_at.insert(db, len);
                }
            }
        }
        let files = &self.files;
        self.used.retain(|db, _| files.contains_key(db));
        self.stats
            .open_files
            .store(self.files.len() as u64, Ordering::Relaxed);
    }

    /// Open a log for appending, truncating a torn tail first. A log damaged
    /// in the middle is refused and left as it is.
    fn file(&mut self, db: &DbName) -> io::Result<&mut Box<dyn FsFile>> {
        if !self.files.contains_key(db) {
            let path = FileStore::log_path(&self.dir, db);
            let mut f = self.fs.open_append(&path, true)?;
            let clean = self.closed_at.remove(db);
            if clean.is_some() && clean == Some(f.len()?) {
                self.files.insert(db.clone(), f);
                return self
                    .files
                    .get_mut(db)
                    .ok_or_else(|| io::Error::other("log handle vanished"));
            }
            let bytes = self.fs.read(&path)?;
            let (_, good, problem) = decode_log(&path, &bytes).map_err(io::Error::other)?;
            if let Some(p) = problem {
                tracing::warn!(%db, "recovering {}: {p}; truncating to {good} bytes", path.display());
                f.set_len(good)?;
                f.sync_all()?;
                self.stats.truncations.fetch_add(1, Ordering::Relaxed);
                let cut = (bytes.len() as u64).saturating_sub(good);
                subtract(&self.stats.log_bytes, cut);
            }
            // The log's name is durable before anything is acknowledged
            // from it (a created file's name lives in the directory).
            if let Some(parent) = path.parent() {
                self.fs.sync_dir(parent)?;
            }
            self.files.insert(db.clone(), f);
        }
        self.files
            .get_mut(db)
            .ok_or_else(|| io::Error::other("log handle vanished"))
    }

    fn append(&mut self, db: &DbName, bytes: &[u8]) -> io::Result<()> {
        let stats = self.stats.clone();
        let f = self.file(db)?;
        // Counted before the write: a torn append is subtracted again when
        // reopening cuts it.
        stats
            .log_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if let Err(e) = f.write_all(bytes) {
            // A partial append is a torn tail: reopening truncates it.
            self.files.remove(db);
            return Err(e);
        }
        Ok(())
    }

    /// Copy the records appended after `from` onto the folded file, then
    /// rename it over the log and reopen.
    fn switch(&mut self, db: &DbName, tmp: &Path, from: u64) -> io::Result<()> {
        let path = FileStore::log_path(&self.dir, db);
        let current = match self.fs.read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let tail = current.get(from as usize..).unwrap_or_default();
        // Keep only whole, valid records of the tail.
        let (_, good, _) = decode_records(tail);
        let mut f = self.fs.open_append(tmp, false)?;
        f.write_all(&tail[..good as usize])?;
        f.sync_all()?;
        let new_len = f.len()?;
        drop(f);
        self.files.remove(db);
        self.closed_at.remove(db);
        self.fs.rename(tmp, &path)?;
        if let Some(parent) = path.parent() {
            self.fs.sync_dir(parent)?;
        }
        let old_len = current.len() as u64;
        self.stats.log_bytes.fetch_add(new_len, Ordering::Relaxed);
        subtract(&self.stats.log_bytes, old_len);
        Ok(())
    }
}

impl Store for FileStore {
    type Error = StoreError;

    #[allow(refining_impl_trait)]
    fn list_databases(
        &self,
    ) -> impl Future<Output = Result<Vec<DbName>, StoreError>> + Send + 'static {
        let this = self.clone();
        async move {
            tokio::task::spawn_blocking(move || this.list_blocking())
                .await
                .map_err(|_| StoreError::Closed)?
        }
    }

    #[allow(refining_impl_trait)]
    fn load(
        &self,
        db: &DbName,
    ) -> impl Future<Output = Result<StoredDatabase, StoreError>> + Send + 'static {
        let (this, db) = (self.clone(), db.clone());
        async move {
            tokio::task::spawn_blocking(move || this.load_blocking(&db))
                .await
                .map_err(|_| StoreError::Closed)?
        }
    }

    #[allow(refining_impl_trait)]
    fn read_since(
        &self,
        db: &DbName,
        since: &VersionVector,
    ) -> impl Future<Output = Result<Vec<Entry>, StoreError>> + Send + 'static {
        let (load, since) = (self.load(db), since.clone());
        async move {
            let stored = load.await?;
            Ok(stored
                .entries
                .into_iter()
                .filter(|e| !since.contains(&e.dot))
                .collect())
        }
    }

    #[allow(refining_impl_trait)]
    fn write(
        &self,
        db: &DbName,
        batch: &Batch,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let rx = self.submit(db, batch);
        let db = db.clone();
        async move {
            match rx?.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(StoreError::Io {
                    context: format!("writing {db}"),
                    source: io::Error::other(e),
                }),
                Err(_) => Err(StoreError::Closed),
            }
        }
    }

    #[allow(refining_impl_trait)]
    fn get_meta(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, StoreError>> + Send + 'static {
        let (path, fs) = (self.meta_path(key), self.fs.clone());
        async move {
            let path = path?;
            match fs.read(&path) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_err(format!("reading {}", path.display()))(e)),
            }
        }
    }

    #[allow(refining_impl_trait)]
    fn put_meta(
        &self,
        key: &str,
        value: &[u8],
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let (path, fs) = (self.meta_path(key), self.fs.clone());
        let value = value.to_vec();
        async move {
            let path = path?;
            write_file_atomically(&*fs, &path, &value, false)
                .map_err(io_err(format!("writing {}", path.display())))
        }
    }
}
