//! A simulated disk that loses power, for the crash tests: the store's own
//! code runs on it ([`super::fs::Fs`]) and a crash keeps only what the
//! durability rules promise.
//!
//! * A file's data is durable once the file is fsynced (`sync_data` or
//!   `sync_all`). Of the writes after that, a crash keeps any prefix, and
//!   may tear the first one it drops: keep part of it, or part of it as
//!   zeros (space allocated, data never written).
//! * A name (a created file, a rename, a removal) is durable once its
//!   directory is fsynced. Name changes are journaled in order: a crash
//!   keeps every durable one and a prefix of the rest. A rename is atomic.
//! * Directories themselves are durable when created (the store creates
//!   its two at open, before anything else).
//!
//! Reads see everything written (the page cache). [`SimFs::crash_at`]
//! makes the n-th state-changing call fail, and every call after it, as if
//! the machine died there; [`SimFs::power_loss`] is the disk that machine
//! finds when it boots.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::fs::{Fs, FsFile};

/// xorshift64*: small, seeded, reproducible.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub(crate) fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

#[derive(Debug, Clone)]
enum DataOp {
    Append(Vec<u8>),
    SetLen(u64),
}

#[derive(Debug, Clone, Default)]
struct Inode {
    /// What reads see.
    data: Vec<u8>,
    /// What survives a crash for certain.
    durable: Vec<u8>,
    /// Changes since `durable`, in order.
    pending: Vec<DataOp>,
}

#[derive(Debug, Clone)]
enum NameOp {
    Create(PathBuf, usize),
    Rename(PathBuf, PathBuf, usize),
    Remove(PathBuf),
}

impl NameOp {
    fn dir(&self) -> Option<&Path> {
        match self {
            NameOp::Create(p, _) | NameOp::Rename(_, p, _) | NameOp::Remove(p) => p.parent(),
        }
    }
    fn apply(&self, names: &mut BTreeMap<PathBuf, usize>) {
        match self {
            NameOp::Create(p, ino) => {
                names.insert(p.clone(), *ino);
            }
            NameOp::Rename(from, to, ino) => {
                names.remove(from);
                names.insert(to.clone(), *ino);
            }
            NameOp::Remove(p) => {
                names.remove(p);
            }
        }
    }
}

#[derive(Debug, Default)]
struct Disk {
    inodes: Vec<Inode>,
    dirs: BTreeSet<PathBuf>,
    /// The names reads see.
    names: BTreeMap<PathBuf, usize>,
    /// The names before `ops` (all durable).
    base: BTreeMap<PathBuf, usize>,
    /// Name changes since `base`, in order, each marked durable once its
    /// directory was fsynced.
    ops: Vec<(NameOp, bool)>,
    /// State-changing calls made so far.
    steps: u64,
    /// The call that fails as the power goes.
    crash_at: Option<u64>,
    crashed: bool,
}

/// The simulated disk (cheap to clone: clones share it).
#[derive(Debug, Clone, Default)]
pub(crate) struct SimFs(Arc<Mutex<Disk>>);

fn power_gone() -> io::Error {
    io::Error::other("simulated power loss")
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{}", path.display()))
}

impl SimFs {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        // A test that panicked while holding the lock has failed already.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make the `n`-th state-changing call from now on (1 = the next) fail,
    /// and every call after it.
    pub(crate) fn crash_at(&self, n: u64) {
        let mut d = self.disk();
        d.crash_at = Some(d.steps + n);
    }

    /// State-changing calls made so far.
    pub(crate) fn steps(&self) -> u64 {
        self.disk().steps
    }

    pub(crate) fn crashed(&self) -> bool {
        self.disk().crashed
    }

    /// The disk a reboot finds: every durable name and byte, plus what
    /// `rng` picks of the rest (see the module docs).
    pub(crate) fn power_loss(&self, rng: &mut Rng) -> SimFs {
        let d = self.disk();
        let keep = rng.below(d.ops.len() as u64 + 1) as usize;
        let mut names = d.base.clone();
        for (i, (op, durable)) in d.ops.iter().enumerate() {
            if *durable || i < keep {
                op.apply(&mut names);
            }
        }
        let mut out = Disk {
            dirs: d.dirs.clone(),
            ..Disk::default()
        };
        let mut renumbered = BTreeMap::new();
        for (path, ino) in names {
            let new = *renumbered.entry(ino).or_insert_with(|| {
                let data = survivor(&d.inodes[ino], rng);
                out.inodes.push(Inode {
                    durable: data.clone(),
                    data,
                    pending: Vec::new(),
                });
                out.inodes.len() - 1
            });
            out.names.insert(path.clone(), new);
            out.base.insert(path, new);
        }
        SimFs(Arc::new(Mutex::new(out)))
    }

    /// The files and their contents as reads see them.
    pub(crate) fn files(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let d = self.disk();
        d.names
            .iter()
            .map(|(p, ino)| (p.clone(), d.inodes[*ino].data.clone()))
            .collect()
    }
}

/// What a crash leaves of a file's data.
fn survivor(inode: &Inode, rng: &mut Rng) -> Vec<u8> {
    let mut data = inode.durable.clone();
    let keep = rng.below(inode.pending.len() as u64 + 1) as usize;
    for op in &inode.pending[..keep] {
        apply_data(&mut data, op);
    }
    if let Some(DataOp::Append(bytes)) = inode.pending.get(keep)
        && !bytes.is_empty()
        && rng.chance(2)
    {
        let torn = 1 + rng.below(bytes.len() as u64) as usize;
        if rng.chance(3) {
            data.resize(data.len() + torn, 0);
        } else {
            data.extend_from_slice(&bytes[..torn]);
        }
    }
    data
}

fn apply_data(data: &mut Vec<u8>, op: &DataOp) {
    match op {
        DataOp::Append(b) => data.extend_from_slice(b),
        DataOp::SetLen(n) => data.resize(*n as usize, 0),
    }
}

impl Disk {
    /// Count a state-changing call; fail it if the power goes now.
    fn step(&mut self) -> io::Result<()> {
        if self.crashed {
            return Err(power_gone());
        }
        self.steps += 1;
        if self.crash_at.is_some_and(|n| self.steps >= n) {
            self.crashed = true;
            return Err(power_gone());
        }
        Ok(())
    }

    fn alive(&self) -> io::Result<()> {
        if self.crashed {
            Err(power_gone())
        } else {
            Ok(())
        }
    }

    fn check_dir(&self, path: &Path) -> io::Result<()> {
        match path.parent() {
            Some(dir) if self.dirs.contains(dir) => Ok(()),
            _ => Err(not_found(path)),
        }
    }

    fn name_op(&mut self, op: NameOp) {
        op.apply(&mut self.names);
        self.ops.push((op, false));
    }

    fn data_op(&mut self, ino: usize, op: DataOp) {
        let inode = &mut self.inodes[ino];
        apply_data(&mut inode.data, &op);
        inode.pending.push(op);
    }

    fn new_inode(&mut self) -> usize {
        self.inodes.push(Inode::default());
        self.inodes.len() - 1
    }
}

impl Fs for SimFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut d = self.disk();
        d.step()?;
        for a in dir.ancestors() {
            d.dirs.insert(a.to_path_buf());
        }
        Ok(())
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let d = self.disk();
        d.alive()?;
        let ino = *d.names.get(path).ok_or_else(|| not_found(path))?;
        Ok(d.inodes[ino].data.clone())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<(String, u64)>> {
        let d = self.disk();
        d.alive()?;
        if !d.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        Ok(d.names
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir))
            .filter_map(|(p, ino)| {
                let name = p.file_name()?.to_str()?.to_owned();
                Some((name, d.inodes[*ino].data.len() as u64))
            })
            .collect())
    }

    fn exists(&self, path: &Path) -> bool {
        let d = self.disk();
        d.names.contains_key(path) || d.dirs.contains(path)
    }

    fn open_append(&self, path: &Path, create: bool) -> io::Result<Box<dyn FsFile>> {
        let mut d = self.disk();
        d.step()?;
        d.check_dir(path)?;
        let ino = match d.names.get(path) {
            Some(&ino) => ino,
            None if create => {
                let ino = d.new_inode();
                d.name_op(NameOp::Create(path.to_path_buf(), ino));
                ino
            }
            None => return Err(not_found(path)),
        };
        Ok(Box::new(SimFile {
            fs: self.clone(),
            ino,
        }))
    }

    fn create(&self, path: &Path, private: bool) -> io::Result<Box<dyn FsFile>> {
        let mut d = self.disk();
        d.step()?;
        d.check_dir(path)?;
        let ino = match d.names.get(path) {
            Some(_) if private => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{}", path.display()),
                ));
            }
            Some(&ino) => {
                d.data_op(ino, DataOp::SetLen(0));
                ino
            }
            None => {
                let ino = d.new_inode();
                d.name_op(NameOp::Create(path.to_path_buf(), ino));
                ino
            }
        };
        Ok(Box::new(SimFile {
            fs: self.clone(),
            ino,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut d = self.disk();
        d.step()?;
        d.check_dir(to)?;
        let ino = *d.names.get(from).ok_or_else(|| not_found(from))?;
        if from.parent() != to.parent() {
            return Err(io::Error::other(
                "the simulation renames within a directory",
            ));
        }
        d.name_op(NameOp::Rename(from.to_path_buf(), to.to_path_buf(), ino));
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut d = self.disk();
        d.step()?;
        if !d.names.contains_key(path) {
            return Err(not_found(path));
        }
        d.name_op(NameOp::Remove(path.to_path_buf()));
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut d = self.disk();
        d.step()?;
        if !d.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        for (op, durable) in &mut d.ops {
            if op.dir() == Some(dir) {
                *durable = true;
            }
        }
        // Fold the durable prefix into `base`, so `ops` stays short.
        let done = d.ops.iter().take_while(|(_, durable)| *durable).count();
        let folded: Vec<(NameOp, bool)> = d.ops.drain(..done).collect();
        for (op, _) in folded {
            op.apply(&mut d.base);
        }
        Ok(())
    }
}

/// An open file of the simulated disk: its inode (which outlives a rename
/// or a removal of its name, as on a real disk).
#[derive(Debug)]
struct SimFile {
    fs: SimFs,
    ino: usize,
}

impl FsFile for SimFile {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut d = self.fs.disk();
        d.step()?;
        d.data_op(self.ino, DataOp::Append(bytes.to_vec()));
        Ok(())
    }

    fn sync_data(&mut self) -> io::Result<()> {
        let mut d = self.fs.disk();
        d.step()?;
        let inode = &mut d.inodes[self.ino];
        inode.durable = inode.data.clone();
        inode.pending.clear();
        Ok(())
    }

    fn sync_all(&mut self) -> io::Result<()> {
        self.sync_data()
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let mut d = self.fs.disk();
        d.step()?;
        d.data_op(self.ino, DataOp::SetLen(len));
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let d = self.fs.disk();
        d.alive()?;
        Ok(d.inodes[self.ino].data.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(fs: &SimFs, path: &str, bytes: &[u8], sync: bool) {
        let mut f = fs.open_append(Path::new(path), true).unwrap();
        f.write_all(bytes).unwrap();
        if sync {
            f.sync_data().unwrap();
        }
    }

    /// The rules the crash tests rely on, each shown both ways.
    #[test]
    fn a_crash_keeps_what_was_synced_and_may_drop_the_rest() {
        let mut kept_unsynced_name = false;
        let mut dropped_unsynced_name = false;
        let mut torn = false;
        for seed in 0..200 {
            let fs = SimFs::new();
            fs.create_dir_all(Path::new("/d")).unwrap();
            write(&fs, "/d/a", b"durable", true);
            fs.sync_dir(Path::new("/d")).unwrap();
            write(&fs, "/d/a", b"-more", false);
            write(&fs, "/d/b", b"synced data, unsynced name", true);
            let after = fs.power_loss(&mut Rng::new(seed)).files();
            let a = &after[Path::new("/d/a")];
            assert!(a.starts_with(b"durable") && a.len() <= 12, "{a:?}");
            torn |= a.len() > 7 && a.len() < 12;
            match after.get(Path::new("/d/b")) {
                Some(b) => {
                    assert_eq!(b, b"synced data, unsynced name");
                    kept_unsynced_name = true;
                }
                None => dropped_unsynced_name = true,
            }
        }
        assert!(kept_unsynced_name && dropped_unsynced_name && torn);
    }

    #[test]
    fn a_rename_survives_whole_or_not_at_all_and_a_synced_one_always() {
        let (mut old, mut new) = (false, false);
        for seed in 0..100 {
            let fs = SimFs::new();
            fs.create_dir_all(Path::new("/d")).unwrap();
            write(&fs, "/d/log", b"old", true);
            fs.sync_dir(Path::new("/d")).unwrap();
            write(&fs, "/d/tmp", b"new", true);
            fs.rename(Path::new("/d/tmp"), Path::new("/d/log")).unwrap();
            let after = fs.power_loss(&mut Rng::new(seed)).files();
            match after[Path::new("/d/log")].as_slice() {
                b"old" => old = true,
                b"new" => {
                    new = true;
                    assert!(!after.contains_key(Path::new("/d/tmp")));
                }
                other => panic!("{other:?}"),
            }
            fs.sync_dir(Path::new("/d")).unwrap();
            let synced = fs.power_loss(&mut Rng::new(seed)).files();
            assert_eq!(synced[Path::new("/d/log")], b"new");
        }
        assert!(old && new);
    }

    #[test]
    fn the_crash_point_fails_that_call_and_every_later_one() {
        let fs = SimFs::new();
        fs.create_dir_all(Path::new("/d")).unwrap();
        fs.crash_at(2);
        let mut f = fs.open_append(Path::new("/d/a"), true).unwrap();
        assert!(f.write_all(b"x").is_err());
        assert!(fs.crashed());
        assert!(fs.read(Path::new("/d/a")).is_err());
        assert!(f.sync_data().is_err());
    }
}
