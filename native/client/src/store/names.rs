//! Database names ↔ log file names.
//!
//! A [`DbName`] is `[A-Za-z0-9._-]`, but file systems that ignore case
//! (macOS, Windows) would give `ORG-1` and `org-1` one file, and Windows
//! opens a device instead of a file for `CON`, `nul.x`, `com1` and the like.
//! So a file name (its stem, before `.log` or `.compact`) never holds an
//! upper-case letter nor starts with a device name:
//!
//! * a name without upper-case letters is its own stem (`org-42`);
//! * a name with some is lower-cased and followed by `+` and, in lower-case
//!   hex, the mask of its upper-case positions (bit *i* = byte *i*):
//!   `ORG-1` → `org-1+7`, `todoList` → `todolist+10`;
//! * a stem whose part before the first dot is a Windows device name (`CON`,
//!   `PRN`, `AUX`, `NUL`, `COM0`-`COM9`, `LPT0`-`LPT9`, in any case) gets a
//!   leading `+`: `nul` → `+nul`, `com1.x` → `+com1.x`.
//!
//! `+` is not a [`DbName`] character, so the mapping is injective, and since
//! stems are lower-case, distinct names get stems that differ ignoring case
//! too. Stems are at most 1 + 128 + 1 + 32 bytes, far under file systems'
//! 255. [`db_from_stem`] accepts only the stem [`file_stem`] makes.
//!
//! Data directories written before this mapping named every log
//! `<name>.log`; [`upgrade_legacy_names`] renames such logs (names with
//! upper-case letters or device names) when a store opens.

use super::fs::{Fs, OsFs};
use std::fmt::Write as _;
use std::io;
use std::path::Path;

use syncline_core::DbName;

/// Whether Windows takes `base` (a file name up to its first dot) for a
/// device.
fn is_device(base: &str) -> bool {
    let b = base.to_ascii_lowercase();
    match b.as_bytes() {
        [_, _, _] => matches!(b.as_str(), "con" | "prn" | "aux" | "nul"),
        [p @ .., d] if d.is_ascii_digit() => matches!(p, b"com" | b"lpt"),
        _ => false,
    }
}

/// The stem of `db`'s files in `dbs/` (see the module docs).
pub fn file_stem(db: &DbName) -> String {
    let name = db.as_str();
    // DbName::MAX_LEN is 128, so every position fits a u128.
    let mask = name
        .bytes()
        .enumerate()
        .filter(|(_, b)| b.is_ascii_uppercase())
        .fold(0u128, |m, (i, _)| {
            m | 1u128.checked_shl(i as u32).unwrap_or(0)
        });
    let mut stem = name.to_ascii_lowercase();
    if mask != 0 {
        let _ = write!(stem, "+{mask:x}");
    }
    if stem.split('.').next().is_some_and(is_device) {
        stem.insert(0, '+');
    }
    stem
}

/// The database whose stem is `stem`, if `stem` is exactly what
/// [`file_stem`] makes for some name.
pub fn db_from_stem(stem: &str) -> Option<DbName> {
    let body = stem.strip_prefix('+').unwrap_or(stem);
    let (lower, mask) = match body.split_once('+') {
        Some((lower, mask)) => (lower, u128::from_str_radix(mask, 16).ok()?),
        None => (body, 0),
    };
    if lower.len() > DbName::MAX_LEN {
        return None;
    }
    let name: String = lower
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> i & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    let db = DbName::new(name).ok()?;
    (file_stem(&db) == stem).then_some(db)
}

/// Rename every log in `dbs` named by the old mapping (`<name>.log` for a
/// name with upper-case letters or a device name) to its stem, then fsync
/// the directory. A log whose new name is taken is an error: both are kept
/// as they are for an operator to merge.
pub fn upgrade_legacy_names(dbs: &Path) -> io::Result<()> {
    upgrade_legacy_names_in(&OsFs, dbs)
}

/// [`upgrade_legacy_names`] on the file system `fs`.
pub(crate) fn upgrade_legacy_names_in(fs: &dyn Fs, dbs: &Path) -> io::Result<()> {
    let mut renamed = false;
    for (name, _) in fs.list(dbs)? {
        let Some(stem) = name.strip_suffix(".log") else {
            continue;
        };
        let Ok(db) = DbName::new(stem) else { continue };
        let new = file_stem(&db);
        if new == stem {
            continue;
        }
        let (from, to) = (dbs.join(&name), dbs.join(format!("{new}.log")));
        if fs.exists(&to) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} (database {db} in the old naming) and {} both exist; \
                     move one away",
                    from.display(),
                    to.display()
                ),
            ));
        }
        fs.rename(&from, &to)?;
        tracing::info!(%db, "renamed {} to {}", from.display(), to.display());
        renamed = true;
    }
    if renamed {
        fs.sync_dir(dbs)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stem(name: &str) -> String {
        file_stem(&DbName::new(name).unwrap())
    }

    #[test]
    fn common_names_are_their_own_stem() {
        for name in [
            "todo-shared",
            "ttt-3f9a",
            "org-42",
            "a.b_c-1",
            "...",
            "console",
            "com10",
            "lpt",
        ] {
            assert_eq!(stem(name), name);
            assert_eq!(db_from_stem(name).unwrap().as_str(), name);
        }
    }

    #[test]
    fn upper_case_and_devices_are_escaped_and_round_trip() {
        let cases = [
            ("ORG-1", "org-1+7"),
            ("todoList", "todolist+10"),
            ("nul", "+nul"),
            ("CON", "con+7"),
            ("Con.x", "+con.x+1"),
            ("com1.x", "+com1.x"),
            ("LPT9", "lpt9+7"),
            ("aux.tar.gz", "+aux.tar.gz"),
        ];
        for (name, want) in cases {
            assert_eq!(stem(name), want, "{name}");
            assert_eq!(db_from_stem(want).unwrap().as_str(), name);
        }
    }

    #[test]
    fn stems_differ_ignoring_case_and_are_never_devices() {
        let names = [
            "ORG-1", "org-1", "Org-1", "oRG-1", "CON", "con", "Con", "nul", "NUL.x", "com1",
            "COM1", "com1.x", "lpt0", "Aux", "prn.log", "a+b", "A", "a",
        ];
        let mut seen = std::collections::HashSet::new();
        for name in names.into_iter().filter(|n| DbName::is_valid(n)) {
            let s = stem(name);
            assert!(seen.insert(s.to_ascii_lowercase()), "{name} shares {s}");
            for file in [format!("{s}.log"), format!("{s}.compact")] {
                let base = file.split('.').next().unwrap();
                assert!(!is_device(base), "{name} -> {file}");
            }
        }
    }

    #[test]
    fn the_longest_names_fit_a_file_name() {
        let upper = "A".repeat(DbName::MAX_LEN);
        let s = stem(&upper);
        assert!(s.len() + ".compact".len() <= 255, "{}", s.len());
        assert_eq!(db_from_stem(&s).unwrap().as_str(), upper);
        let mixed: String = (0..DbName::MAX_LEN)
            .map(|i| if i % 2 == 0 { 'a' } else { 'B' })
            .collect();
        assert_eq!(db_from_stem(&stem(&mixed)).unwrap().as_str(), mixed);
    }

    #[test]
    fn other_stems_are_refused() {
        for s in [
            "ORG-1", "con", "org-1+", "org-1+8", "org-1+07", "org-1++7", "+org-1", "a+g", "",
        ] {
            assert!(db_from_stem(s).is_none(), "{s}");
        }
    }
}
