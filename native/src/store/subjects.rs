//! Who writes as which replica: `DATA/subjects.jsonl`, the server's audit
//! trail.
//!
//! A replica id is owned (its `Hello` proves the replica's key), so every
//! stored change's dot names the replica that made it. When a connection
//! whose token names a subject (`sub`) is accepted, the pairing of its
//! replica and subject is appended here once, as a JSON line
//! `{"replica": HEX, "subject": SUB, "at": UNIX_SECS}`: `syncline dump
//! --changes` then shows, for each change, who wrote it. A replica seen
//! with another subject later gets another line (a device whose user logged
//! in again as someone else). Anonymous connections name no one and add
//! nothing.
//!
//! Lines are appended and fsynced off the hub; one lost in a crash (before
//! its fsync) is written again when its replica next connects.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use syncline_core::ReplicaId;

/// The file in the data directory.
pub const SUBJECTS_FILE: &str = "subjects.jsonl";

/// Longest subject kept (longer ones are cut at a character boundary).
const MAX_SUBJECT: usize = 512;

/// One line of the file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SubjectLine {
    /// The replica (32 hex digits).
    pub replica: String,
    /// The token's `sub`.
    pub subject: String,
    /// When first seen together, Unix seconds.
    pub at: u64,
}

/// The pairings already in the file (so each is appended once).
#[derive(Debug)]
pub struct Subjects {
    path: PathBuf,
    known: HashSet<(ReplicaId, String)>,
}

fn cut(subject: &str) -> String {
    let mut end = subject.len().min(MAX_SUBJECT);
    while !subject.is_char_boundary(end) {
        end -= 1;
    }
    subject[..end].to_owned()
}

/// Every line of `DATA/subjects.jsonl` (none if it does not exist); lines
/// that do not parse (a torn last line) are skipped.
pub fn read_lines(data: &Path) -> io::Result<Vec<SubjectLine>> {
    let file = match File::open(data.join(SUBJECTS_FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for line in BufReader::new(file).lines() {
        if let Ok(l) = serde_json::from_str::<SubjectLine>(&line?) {
            out.push(l);
        }
    }
    Ok(out)
}

/// Who each replica wrote as, from `DATA/subjects.jsonl`.
pub fn by_replica(data: &Path) -> io::Result<HashMap<String, Vec<String>>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for l in read_lines(data)? {
        let subjects = out.entry(l.replica).or_default();
        if !subjects.contains(&l.subject) {
            subjects.push(l.subject);
        }
    }
    Ok(out)
}

impl Subjects {
    /// The pairings of `data`'s file.
    pub fn open(data: &Path) -> io::Result<Self> {
        let known = read_lines(data)?
            .into_iter()
            .filter_map(|l| {
                let bytes: Vec<u8> = (0..l.replica.len() / 2)
                    .map(|i| u8::from_str_radix(l.replica.get(2 * i..2 * i + 2)?, 16).ok())
                    .collect::<Option<_>>()?;
                Some((ReplicaId::from_slice(&bytes).ok()?, l.subject))
            })
            .collect();
        let path = data.join(SUBJECTS_FILE);
        // A line torn by a crash must not swallow the next one.
        if let Ok(bytes) = std::fs::read(&path)
            && bytes.last().is_some_and(|&b| b != b'\n')
        {
            append(&path, b"\n")?;
        }
        Ok(Subjects { path, known })
    }

    /// The line to append for `replica` writing as `subject`, if the
    /// pairing is new (it is remembered as written from now on).
    pub fn note(&mut self, replica: ReplicaId, subject: &str, now_secs: u64) -> Option<Vec<u8>> {
        let subject = cut(subject);
        if !self.known.insert((replica, subject.clone())) {
            return None;
        }
        let line = SubjectLine {
            replica: replica.to_hex(),
            subject,
            at: now_secs,
        };
        let mut bytes = serde_json::to_vec(&line).ok()?;
        bytes.push(b'\n');
        Some(bytes)
    }

    /// Where lines go.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Append `line` to `path` and fsync it (blocking: run it off the hub).
pub fn append(path: &Path, line: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    // One write: appends of whole lines do not interleave.
    f.write_all(line)?;
    f.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_pairing_is_written_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let r = ReplicaId([7; 16]);
        let mut s = Subjects::open(dir.path()).unwrap();
        let line = s.note(r, "alice", 1).unwrap();
        append(s.path(), &line).unwrap();
        assert_eq!(s.note(r, "alice", 2), None);
        let other = s.note(r, "bob", 3).unwrap();
        append(s.path(), &other).unwrap();
        // A torn last line is skipped, and the next line starts afresh.
        append(s.path(), b"{\"replica\":\"07").unwrap();
        let mut again = Subjects::open(dir.path()).unwrap();
        assert_eq!(again.note(r, "alice", 4), None);
        let carol = again.note(r, "carol", 4).unwrap();
        append(again.path(), &carol).unwrap();
        let who = by_replica(dir.path()).unwrap();
        assert_eq!(
            who[&r.to_hex()],
            ["alice", "bob", "carol"].map(String::from)
        );
        let long = "é".repeat(1000);
        let line = again.note(r, &long, 5).unwrap();
        assert!(line.len() < MAX_SUBJECT + 100);
    }
}
