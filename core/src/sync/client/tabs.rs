//! Replicas of one app on one device (browser tabs) exchanging entries
//! directly, so they see each other's changes with no server.
//!
//! Each tab owns its replica and writes only its own entries; what it gets
//! from another tab is stored like what the server relays (the dots keep
//! their author), so the one-writer-per-replica rule holds. A tab announces
//! its own entries once they are durable here (an entry another tab holds
//! must never be lost by its author, who would reuse its counter), and a
//! tab opening a database asks the others for what it lacks
//! ([`Client::own_entries_since`]). Entries that arrive with a gap wait in
//! the database's pending queue until the missing ones come (from a tab or
//! from the server), so the version vector never claims what is not held.

use super::{Client, ClientError};
use crate::clock::VersionVector;
use crate::entry::Entry;
use crate::ids::DbName;

/// Most bytes of entries one answer to another tab carries (the rest comes
/// from the server, or from the next answer).
pub const MAX_TAB_ANSWER_BYTES: usize = 8 << 20;

impl Client {
    /// Apply entries another local replica wrote (persisted and announced
    /// as remote changes, like a server's). Entries under this replica's
    /// own id are ignored: only this replica writes those.
    pub fn apply_tab_entries(
        &mut self,
        db: &DbName,
        entries: Vec<Entry>,
    ) -> Result<(), ClientError> {
        let me = self.replica;
        let c = self
            .dbs
            .get_mut(db)
            .ok_or_else(|| ClientError::NotOpen(db.clone()))?;
        let foreign = entries.into_iter().filter(|e| e.dot.replica != me);
        let applied = c.db.apply_entries(foreign);
        self.absorb(db, applied, false);
        Ok(())
    }

    /// This replica's own entries of `db` that a holder of `since` lacks,
    /// oldest first, up to [`MAX_TAB_ANSWER_BYTES`] (at least one): only
    /// those durable here, as another tab must never hold an entry this
    /// replica could still lose in a crash and write again differently.
    pub fn own_entries_since(&self, db: &DbName, since: &VersionVector) -> Vec<Entry> {
        let Some(c) = self.dbs.get(db) else {
            return Vec::new();
        };
        let from = since.get(&self.replica).saturating_add(1);
        let mut bytes = 0;
        c.db.log()
            .entries_of(&self.replica, from, c.local_durable)
            .into_iter()
            .take_while(|e| {
                let first = bytes == 0;
                bytes += e.change.len();
                first || bytes <= MAX_TAB_ANSWER_BYTES
            })
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::clock::VersionVector;
    use crate::ids::{DocId, ReplicaId};
    use crate::store::StoredDatabase;
    use crate::sync::{ClientConfig, ClientEvent, ClientOutput};

    fn tab(n: u8) -> Client {
        let mut c = Client::new(ReplicaId([n; 16]), "", ClientConfig::default());
        c.open(db(), StoredDatabase::default());
        c.take_outputs();
        c
    }

    fn db() -> DbName {
        DbName::new("notes").expect("name")
    }

    fn doc(s: &str) -> DocId {
        DocId::new(s).expect("id")
    }

    /// Persist everything `c` asked to persist; returns the events it emitted.
    fn settle(c: &mut Client) -> Vec<ClientEvent> {
        let mut events = Vec::new();
        for out in c.take_outputs() {
            match out {
                ClientOutput::Persist { db, seq, .. } => c.persisted(&db, seq),
                ClientOutput::Event(e) => events.push(e),
                ClientOutput::Send(_) => {}
            }
        }
        events
    }

    #[test]
    fn tabs_see_each_other_through_their_own_entries_only() {
        let (mut a, mut b) = (tab(1), tab(2));
        a.update(&db(), &doc("n1"), &json!({"t": "from a"}))
            .expect("write");
        a.update(&db(), &doc("n1"), &json!({"t": "from a, edited"}))
            .expect("write");
        settle(&mut a);
        // B opens later and asks: A answers with its own entries.
        let answer = a.own_entries_since(&db(), b.database(&db()).expect("open").vv());
        assert_eq!(answer.len(), 2);
        b.apply_tab_entries(&db(), answer).expect("apply");
        let events = settle(&mut b);
        assert!(
            events
                .iter()
                .any(|e| matches!(e, ClientEvent::Changed { remote: true, .. }))
        );
        let read = |c: &Client| c.database(&db()).expect("open").get(&doc("n1"));
        assert_eq!(read(&b), Some(json!({"t": "from a, edited"})));
        // B writes on top; A gets it. Neither holds the other's entries as its own.
        b.update(&db(), &doc("n1"), &json!({"t": "from b"}))
            .expect("write");
        settle(&mut b);
        let from_b = b.own_entries_since(&db(), a.database(&db()).expect("open").vv());
        assert_eq!(from_b.len(), 1);
        a.apply_tab_entries(&db(), from_b).expect("apply");
        settle(&mut a);
        assert_eq!(read(&a), Some(json!({"t": "from b"})));
        assert_eq!(
            b.own_entries_since(&db(), a.database(&db()).expect("open").vv()),
            []
        );
        // An entry under A's own id, from elsewhere, is not taken.
        let a_vv = a.database(&db()).expect("open").vv().clone();
        let mut c = tab(1);
        c.update(&db(), &doc("other"), &json!({"x": 1}))
            .expect("write");
        settle(&mut c);
        let forged = c.own_entries_since(&db(), &VersionVector::new());
        a.apply_tab_entries(&db(), forged).expect("apply");
        assert_eq!(a.database(&db()).expect("open").vv(), &a_vv);
    }

    #[test]
    fn entries_after_a_gap_wait_until_the_gap_is_filled() {
        let (mut a, mut b) = (tab(1), tab(2));
        for i in 0..3 {
            a.update(&db(), &doc("n"), &json!({"i": i})).expect("write");
        }
        settle(&mut a);
        let all = a.own_entries_since(&db(), &VersionVector::new());
        // B missed the first announcement: the later ones wait, unclaimed.
        b.apply_tab_entries(&db(), all[1..].to_vec())
            .expect("apply");
        settle(&mut b);
        let vv = b.database(&db()).expect("open").vv().clone();
        assert_eq!(vv.get(&ReplicaId([1; 16])), 0, "a gap is never claimed");
        // Its ask fills the gap, and everything applies.
        b.apply_tab_entries(&db(), a.own_entries_since(&db(), &vv))
            .expect("apply");
        settle(&mut b);
        assert_eq!(
            b.database(&db())
                .expect("open")
                .vv()
                .get(&ReplicaId([1; 16])),
            3
        );
        assert_eq!(
            b.database(&db()).expect("open").get(&doc("n")),
            Some(json!({"i": 2}))
        );
    }

    #[test]
    fn an_answer_is_bounded_in_bytes() {
        let mut a = tab(1);
        // Hardly compressible: each change is over 1 MiB.
        let mut seed = 7u64;
        let mut noise = |n: usize| -> String {
            (0..n)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    char::from(b'a' + (seed >> 59) as u8)
                })
                .collect()
        };
        for i in 0..8 {
            let value = json!({"i": i, "blob": noise(2 << 20)});
            a.update_with(
                &db(),
                &doc("n"),
                &value,
                crate::Strings::Values { text: &[] },
            )
            .expect("write");
        }
        settle(&mut a);
        let answer = a.own_entries_since(&db(), &VersionVector::new());
        let bytes: usize = answer.iter().map(|e| e.change.len()).sum();
        assert!(
            !answer.is_empty() && answer.len() < 12,
            "{} entries",
            answer.len()
        );
        assert!(bytes <= MAX_TAB_ANSWER_BYTES, "{bytes} bytes");
    }
}

/// Concurrent edits of one string by two tabs merge, whichever replica id
/// sorts first.
#[cfg(test)]
mod merge {
    use super::*;
    use crate::clock::VersionVector;
    use crate::ids::{DocId, ReplicaId};
    use crate::store::StoredDatabase;
    use crate::sync::{ClientConfig, ClientOutput};
    use serde_json::json;

    fn tab(n: u8) -> Client {
        let config = ClientConfig {
            keep_views: true,
            encoding: automerge::TextEncoding::Utf16CodeUnit,
            ..ClientConfig::default()
        };
        let mut c = Client::new(ReplicaId([n; 16]), "", config);
        c.open(DbName::new("notes").unwrap(), StoredDatabase::default());
        c.take_outputs();
        c
    }
    fn settle(c: &mut Client) {
        for out in c.take_outputs() {
            if let ClientOutput::Persist { db, seq, .. } = out {
                c.persisted(&db, seq)
            }
        }
    }
    #[test]
    fn concurrent_title_edits_between_tabs_merge() {
        for (x, y) in [(1u8, 2u8), (2, 1)] {
            let db = DbName::new("notes").unwrap();
            let d = DocId::new("note").unwrap();
            let (mut a, mut b) = (tab(x), tab(y));
            b.update(&db, &d, &json!({"title": "buy milk"})).unwrap();
            settle(&mut b);
            a.apply_tab_entries(&db, b.own_entries_since(&db, &VersionVector::new()))
                .unwrap();
            settle(&mut a);
            let (va, vb) = (
                a.database(&db).unwrap().vv().clone(),
                b.database(&db).unwrap().vv().clone(),
            );
            a.update(&db, &d, &json!({"title": "buy oat milk"}))
                .unwrap();
            b.update(&db, &d, &json!({"title": "buy milk today"}))
                .unwrap();
            settle(&mut a);
            settle(&mut b);
            let from_a = a.own_entries_since(&db, &vb);
            let from_b = b.own_entries_since(&db, &va);
            a.apply_tab_entries(&db, from_b).unwrap();
            b.apply_tab_entries(&db, from_a).unwrap();
            settle(&mut a);
            settle(&mut b);
            for c in [&a, &b] {
                assert_eq!(
                    c.database(&db).unwrap().get(&d),
                    Some(json!({"title": "buy oat milk today"})),
                    "{x} {y}"
                );
            }
        }
    }
}
