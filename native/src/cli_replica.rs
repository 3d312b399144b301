//! The replica `get`/`put`/`delete`/`list` run on: one per user and server,
//! kept between calls, instead of a throw-away one per call. Every replica
//! id a database ever sees stays in its version vector, which every frame
//! to its subscribers carries, so a script calling `syncline put` in a loop
//! used to grow every client's frames by ~24 bytes a call. Kept, the
//! replica also resumes (it fetches only what changed since its last call)
//! and a write whose acknowledgement never came is pushed again by the
//! next call instead of being lost with a temporary directory.
//!
//! Two commands running at once must not share a replica (both would stamp
//! the same counter on different changes), so replicas live in numbered
//! slots, each taken with an exclusive lock on its `lock` file for as long
//! as the command runs: a second concurrent command takes the next slot.

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// Slots per server: more commands than this at once are refused.
const SLOTS: usize = 16;

/// A replica directory, locked for this process until dropped.
pub struct CliReplica {
    /// The client's data directory.
    pub dir: PathBuf,
    _lock: File,
}

/// Where replicas are kept when not told: the user's config directory.
pub fn default_root() -> Option<PathBuf> {
    dirs::config_dir().map(|d| d.join("syncline").join("cli"))
}

/// Take a free slot for `url` under `root`. Each server has its own
/// replicas (named by a hash of its URL): a database of one server is never
/// pushed to another that has one of the same name.
pub fn take(root: &Path, url: &str) -> Result<CliReplica> {
    let digest = Sha256::digest(url.as_bytes());
    let server: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let base = root.join(server);
    for slot in 0..SLOTS {
        let dir = base.join(slot.to_string());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match lock.try_lock() {
            Ok(()) => return Ok(CliReplica { dir, _lock: lock }),
            Err(TryLockError::WouldBlock) => continue,
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
    }
    bail!(
        "{SLOTS} syncline commands are already running against {url} (replicas in {})",
        base.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_commands_get_distinct_slots_and_a_freed_slot_is_reused() {
        let root = tempfile::tempdir().unwrap();
        let a = take(root.path(), "ws://a/sync").unwrap();
        let b = take(root.path(), "ws://a/sync").unwrap();
        assert_ne!(a.dir, b.dir);
        let other = take(root.path(), "ws://b/sync").unwrap();
        assert_ne!(other.dir.parent(), a.dir.parent(), "a server of its own");
        let first = a.dir.clone();
        drop(a);
        assert_eq!(take(root.path(), "ws://a/sync").unwrap().dir, first);
    }
}
