//! Static files (`--static`), confined to their directory.
//!
//! tower-http's `ServeDir` does the HTTP side (content types, `index.html`,
//! ranges, conditional requests) and reaches the file system only through a
//! [`Backend`]. [`Confined`] is that backend: before any metadata read or
//! open it resolves the path (following symlinks) and answers "not found"
//! unless both the requested path and the resolved one lie inside the root
//! with no segment starting with `.` below it. So a dotfile or dot-directory
//! (`.git/`, `.env`) is never served, nor is a symlink that leads out of the
//! root or onto a dotfile; a symlink that stays inside is followed. The file
//! opened is the resolved path that was checked. Checking and opening are
//! two steps, so this assumes that only the operator writes in the root
//! (whoever can swap a file for a symlink in between could escape it).

use std::future::Future;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use tower_http::services::ServeDir;
use tower_http::services::fs::{Backend, DefaultServeDirFallback, TokioBackend, TokioFile};

/// A `ServeDir` for the directory `root`, confined to it.
pub(super) fn serve_dir(root: &Path) -> io::Result<ServeDir<DefaultServeDirFallback, Confined>> {
    // Canonical, so that resolved paths can be compared with it.
    let root = std::fs::canonicalize(root)?;
    if !root.is_dir() {
        return Err(io::Error::other("not a directory"));
    }
    let backend = Confined {
        root: Arc::from(root.as_path()),
    };
    Ok(ServeDir::with_backend(root, backend))
}

/// The file system below one canonical directory; see the module docs.
#[derive(Clone, Debug)]
pub(super) struct Confined {
    root: Arc<Path>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send>>;

impl Confined {
    /// Where `path` really is, if it may be served; otherwise `NotFound`
    /// (which `ServeDir` answers with 404, as for a missing file).
    async fn resolve(&self, path: PathBuf) -> io::Result<PathBuf> {
        let real = tokio::fs::canonicalize(&path)
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::NotFound))?;
        if self.allows(&path) && self.allows(&real) {
            Ok(real)
        } else {
            Err(io::ErrorKind::NotFound.into())
        }
    }

    /// Inside the root, with no hidden segment below it.
    fn allows(&self, path: &Path) -> bool {
        path.strip_prefix(&self.root).is_ok_and(|rel| {
            rel.components().all(|c| match c {
                Component::Normal(name) => !name.as_encoded_bytes().starts_with(b"."),
                _ => false,
            })
        })
    }
}

impl Backend for Confined {
    type File = TokioFile;
    type Metadata = std::fs::Metadata;
    type OpenFuture = BoxFuture<TokioFile>;
    type MetadataFuture = BoxFuture<std::fs::Metadata>;

    fn open(&self, path: PathBuf) -> Self::OpenFuture {
        let this = self.clone();
        Box::pin(async move { TokioBackend.open(this.resolve(path).await?).await })
    }

    fn metadata(&self, path: PathBuf) -> Self::MetadataFuture {
        let this = self.clone();
        Box::pin(async move { tokio::fs::metadata(this.resolve(path).await?).await })
    }
}
