//! Quotas that keep anonymous clients from filling the server: how many
//! databases an anonymous pattern may hold, and a storage quota the adapter
//! reports. Each refusal is typed (`TooLarge`, naming the database) and
//! stores nothing; what was stored before stays writable.

use std::collections::HashMap;

use serde_json::json;
use syncline_core::Identity;
use syncline_core::entry::Entry;
use syncline_core::ids::{DbName, DocId};
use syncline_core::protocol::{ErrorCode, Hello, Message, Push, Subscribe};
use syncline_core::store::StoredDatabase;
use syncline_core::sync::{
    AuthError, Authenticator, DatabaseQuota, Grant, Grants, PeerId, Right, Server, ServerConfig,
    ServerOutput, ValidateJob,
};

/// Anonymous clients may write `todo-*` and `other-*`; the token `admin`
/// may do anything.
struct Anonymous;

impl Authenticator for Anonymous {
    fn authenticate(&self, token: &str) -> Result<Grants, AuthError> {
        Ok(match token {
            "admin" => Grants::all(),
            _ => Grants::new(
                ["todo-*", "other-*"]
                    .map(|p| Grant {
                        pattern: p.into(),
                        right: Right::Write,
                    })
                    .to_vec(),
            ),
        })
    }
}

fn name(s: &str) -> DbName {
    DbName::new(s).unwrap()
}

/// One change by replica `r` to database `db`, holding `len` bytes of text.
fn change(db: &str, r: u8, counter: u64, len: usize) -> Entry {
    let mut d = syncline_core::database::Database::new(
        name(db),
        Identity::from_seed([r; 32]).replica(),
        automerge::TextEncoding::UnicodeCodePoint,
    );
    let mut last = None;
    for k in 0..counter {
        let v = json!({ "t": format!("{k}{}", "x".repeat(len)) });
        last = d.update(&DocId::new("doc").unwrap(), &v).unwrap();
    }
    last.unwrap()
}

/// A core server whose store is a map: what it persists, it loads again.
struct Hub {
    server: Server<Anonymous>,
    stored: HashMap<DbName, StoredDatabase>,
    sent: Vec<(PeerId, Message)>,
    jobs: Vec<(PeerId, ValidateJob)>,
}

impl Hub {
    fn new(quota: usize, defer_validation: bool) -> Self {
        let config = ServerConfig {
            database_quotas: vec![DatabaseQuota {
                pattern: "todo-*".into(),
                max_databases: quota,
            }],
            defer_validation,
            ..ServerConfig::default()
        };
        Hub {
            server: Server::new(config, Anonymous),
            stored: HashMap::new(),
            sent: Vec::new(),
            jobs: Vec::new(),
        }
    }

    /// A new server over the same store, counting its databases at start
    /// as the native server does.
    fn restart(&mut self, quota: usize) {
        let stored = std::mem::take(&mut self.stored);
        *self = Hub::new(quota, false);
        self.stored = stored;
        let names: Vec<DbName> = self.stored.keys().cloned().collect();
        self.server.count_databases(&names);
    }

    fn peer(&mut self, r: u8, token: &str) -> PeerId {
        let p = self.server.connect();
        self.server.handle(
            p,
            Message::Hello(Box::new(Hello::signed(
                &Identity::from_seed([r; 32]),
                token,
                "",
                0,
            ))),
        );
        self.drain();
        p
    }

    /// Subscribe `p` to `db` and push `entry` there.
    fn push(&mut self, p: PeerId, db: &str, entry: Entry) {
        self.server.handle(
            p,
            Message::Subscribe(Box::new(Subscribe {
                horizon: None,
                db: name(db),
                since: Default::default(),
                req: 1,
            })),
        );
        self.server.handle(
            p,
            Message::Push(Box::new(Push {
                db: name(db),
                entries: vec![entry],
            })),
        );
        self.drain();
    }

    fn drain(&mut self) {
        loop {
            let outs = self.server.take_outputs();
            if outs.is_empty() {
                return;
            }
            for o in outs {
                match o {
                    ServerOutput::Send { peer, msg } => self.sent.push((peer, msg)),
                    ServerOutput::Load { db } => {
                        let s = self.stored.get(&db).cloned().unwrap_or_default();
                        self.server.loaded(db, s);
                    }
                    ServerOutput::Persist { db, seq, batch } => {
                        self.stored.entry(db.clone()).or_default().apply(&batch);
                        self.server.persisted(&db, seq);
                    }
                    ServerOutput::Validate { peer, job } => self.jobs.push((peer, *job)),
                    _ => {}
                }
            }
        }
    }

    fn run_jobs(&mut self) {
        for (peer, job) in std::mem::take(&mut self.jobs) {
            self.server.validated(peer, job.run());
        }
        self.drain();
    }

    /// Errors sent to `p` since the last call: (code, database, message).
    fn errors(&mut self, p: PeerId) -> Vec<(ErrorCode, Option<DbName>, String)> {
        let sent = std::mem::take(&mut self.sent);
        let (mine, rest): (Vec<_>, Vec<_>) = sent.into_iter().partition(|(q, _)| *q == p);
        self.sent = rest;
        mine.into_iter()
            .filter_map(|(_, m)| match m {
                Message::Error(e) => Some((e.code(), e.db.clone(), e.message.clone())),
                _ => None,
            })
            .collect()
    }

    fn entries(&self, db: &str) -> usize {
        self.stored.get(&name(db)).map_or(0, |s| s.entries.len())
    }
}

/// An anonymous pattern holds at most its quota of databases, counted
/// from the store at start; existing databases stay writable, other
/// patterns are not limited, and an admin may still create one.
#[test]
fn an_anonymous_pattern_holds_at_most_its_quota_of_databases() {
    let mut hub = Hub::new(2, false);
    let a = hub.peer(1, "");
    hub.push(a, "todo-a", change("todo-a", 1, 1, 10));
    hub.push(a, "todo-b", change("todo-b", 1, 1, 10));
    assert!(hub.errors(a).is_empty());
    assert_eq!(hub.server.databases_created(), [2]);

    hub.push(a, "todo-c", change("todo-c", 1, 1, 10));
    let errors = hub.errors(a);
    assert_eq!(errors.len(), 1, "{errors:?}");
    let (code, db, message) = &errors[0];
    assert_eq!(
        (*code, db.as_ref()),
        (ErrorCode::TooLarge, Some(&name("todo-c")))
    );
    assert!(message.contains("\"todo-*\""), "{message}");
    assert_eq!(hub.entries("todo-c"), 0, "nothing stored");

    // What exists takes more; another pattern is not counted.
    hub.push(a, "todo-a", change("todo-a", 1, 2, 10));
    hub.push(a, "other-x", change("other-x", 1, 1, 10));
    assert!(hub.errors(a).is_empty());
    assert_eq!(hub.entries("todo-a"), 2);

    // An admin may create one past the quota.
    let admin = hub.peer(9, "admin");
    hub.push(admin, "todo-c", change("todo-c", 9, 1, 10));
    assert!(hub.errors(admin).is_empty());
    assert_eq!(hub.entries("todo-c"), 1);
    assert_eq!(hub.server.databases_created(), [3]);

    // A restarted server counts what its store holds.
    hub.restart(3);
    assert_eq!(hub.server.databases_created(), [3]);
    let a = hub.peer(1, "");
    hub.push(a, "todo-d", change("todo-d", 1, 1, 10));
    assert_eq!(hub.errors(a)[0].0, ErrorCode::TooLarge);
    hub.push(a, "todo-b", change("todo-b", 1, 2, 10));
    assert!(hub.errors(a).is_empty());
}

/// A push that would have created a database but stored nothing (its
/// change refused, checked where it arrived or off the hub) gives its
/// place back, so invalid pushes cannot use the quota up.
#[test]
fn a_creation_that_stores_nothing_does_not_count() {
    for defer in [false, true] {
        let mut hub = Hub::new(1, defer);
        let a = hub.peer(1, "");
        // Small and large changes that are not automerge: refused.
        for len in [10, 200_000] {
            let mut bad = change("todo-a", 1, 1, len);
            let at = bad.change.len() / 2;
            bad.change.truncate(at);
            hub.push(a, "todo-a", bad);
            hub.run_jobs();
            let errors = hub.errors(a);
            assert_eq!(errors.len(), 1, "defer {defer}, len {len}: {errors:?}");
            assert_eq!(errors[0].0, ErrorCode::InvalidChange);
            assert_eq!(hub.server.databases_created(), [0], "defer {defer}");
        }
        hub.push(a, "todo-b", change("todo-b", 1, 1, 10));
        assert!(hub.errors(a).is_empty(), "defer {defer}");
        assert_eq!(hub.entries("todo-b"), 1);
        assert_eq!(hub.server.databases_created(), [1]);
    }
}

/// While the adapter says its storage is at its quota, every push is
/// refused with `TooLarge` and nothing is stored; once it is back under,
/// pushes are stored again.
#[test]
fn pushes_are_refused_while_storage_is_full() {
    let mut hub = Hub::new(10, false);
    let a = hub.peer(1, "");
    hub.push(a, "other-x", change("other-x", 1, 1, 10));
    hub.server.storage_full(true);
    hub.push(a, "other-x", change("other-x", 1, 2, 10));
    let errors = hub.errors(a);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, ErrorCode::TooLarge);
    assert_eq!(errors[0].1, Some(name("other-x")));
    assert_eq!(hub.entries("other-x"), 1);
    hub.server.storage_full(false);
    hub.push(a, "other-x", change("other-x", 1, 2, 10));
    assert!(hub.errors(a).is_empty());
    assert_eq!(hub.entries("other-x"), 2);
}
