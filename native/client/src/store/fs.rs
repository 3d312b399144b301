//! The file-system calls the store makes, behind a trait: the server runs
//! on [`OsFs`]; the crash tests run the same store code on a simulated disk
//! that loses power (`sim_fs.rs`), which keeps only what was fsynced.
//!
//! The calls are the few the store needs, with the durability each one
//! promises spelled out, since that is what the simulation models.

use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// A file system the store writes to.
pub(crate) trait Fs: Debug + Send + Sync + 'static {
    /// Create a directory and its parents (durable before the store uses it).
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// The whole content of a file, as the page cache has it.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// The regular files in `dir`: name and length.
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, u64)>>;
    /// Whether `path` names anything (a dangling link included).
    fn exists(&self, path: &Path) -> bool;
    /// Open a file for appending, creating it empty if absent. A created
    /// name is durable only after the directory's [`Fs::sync_dir`].
    fn open_append(&self, path: &Path, create: bool) -> io::Result<Box<dyn FsFile>>;
    /// Create a file, truncating one that exists; `private`: it must not
    /// exist, and is created readable by its owner only.
    fn create(&self, path: &Path, private: bool) -> io::Result<Box<dyn FsFile>>;
    /// Rename atomically, replacing `to`; durable after the directory's
    /// [`Fs::sync_dir`].
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Remove a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// fsync a directory: the names created, renamed and removed in it
    /// survive a crash.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// An open file: writes go to its end.
pub(crate) trait FsFile: Debug + Send {
    /// Append `bytes` (a crash may keep any prefix of what was not synced).
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// fsync the file's data (and the length that reads it back).
    fn sync_data(&mut self) -> io::Result<()>;
    /// fsync the file's data and metadata.
    fn sync_all(&mut self) -> io::Result<()>;
    /// Truncate (or extend with zeros) to `len` bytes.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// The file's length now.
    fn len(&self) -> io::Result<u64>;
}

/// The operating system's file system.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct OsFs;

#[derive(Debug)]
struct OsFile(File);

impl FsFile for OsFile {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn sync_all(&mut self) -> io::Result<()> {
        self.0.sync_all()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

impl Fs for OsFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir)? {
            let e = e?;
            let meta = e.metadata()?;
            if let (true, Some(name)) = (meta.is_file(), e.file_name().to_str()) {
                out.push((name.to_owned(), meta.len()));
            }
        }
        Ok(out)
    }

    fn exists(&self, path: &Path) -> bool {
        fs::symlink_metadata(path).is_ok()
    }

    fn open_append(&self, path: &Path, create: bool) -> io::Result<Box<dyn FsFile>> {
        let f = OpenOptions::new()
            .read(true)
            .append(true)
            .create(create)
            .open(path)?;
        Ok(Box::new(OsFile(f)))
    }

    fn create(&self, path: &Path, private: bool) -> io::Result<Box<dyn FsFile>> {
        let f = if private {
            let mut opts = OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            opts.open(path)?
        } else {
            File::create(path)?
        };
        Ok(Box::new(OsFile(f)))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}
