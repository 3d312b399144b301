//! What the integration tests share: the real server binary on 127.0.0.1
//! with an ephemeral port, tokens minted by its CLI, and bounded waits on
//! the native client.

#![allow(dead_code)]

pub mod nats;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value as Json;
use syncline::client::SyncClient;
use syncline_core::{DbName, DocId};

/// The secret the test servers sign tokens with.
pub const SECRET: &str = "test-secret-0123456789-0123456789";

pub const WAIT: Duration = Duration::from_secs(20);

pub struct ServerProc {
    pub child: Child,
    pub addr: SocketAddr,
    /// Where `/metrics` is, when started with `--metrics-listen`.
    pub metrics: Option<SocketAddr>,
}

impl ServerProc {
    pub fn start(data: &Path, listen: &str, extra: &[&str]) -> Self {
        Self::start_with_env(data, listen, extra, &[])
    }

    pub fn start_with_env(data: &Path, listen: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn(data, listen, extra, env, Stdio::inherit())
    }

    /// With the server's log (stderr) going to the file `log`.
    pub fn start_logging_to(data: &Path, extra: &[&str], log: &Path) -> Self {
        let log = std::fs::File::create(log).unwrap();
        Self::spawn(data, "127.0.0.1:0", extra, &[], log.into())
    }

    fn spawn(
        data: &Path,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        stderr: Stdio,
    ) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_syncline"))
            .args(["serve", "--listen", listen, "--data"])
            .arg(data)
            .args(["--secret", SECRET])
            .args(extra)
            .env("SYNCLINE_LOG", "warn")
            // The binary's own memory settings unless a test asks otherwise.
            .env_remove("MIMALLOC_ALLOW_THP")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start syncline");
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .or_else(|| line.trim().strip_prefix("listening on https://"))
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        let mut metrics = None;
        if extra.contains(&"--metrics-listen") {
            line.clear();
            out.read_line(&mut line).unwrap();
            let at = line
                .trim()
                .strip_prefix("metrics on http://")
                .and_then(|l| l.strip_suffix("/metrics"))
                .unwrap_or_else(|| panic!("unexpected second line {line:?}"));
            metrics = Some(at.parse().unwrap());
        }
        ServerProc {
            child,
            addr,
            metrics,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/sync", self.addr)
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn db(s: &str) -> DbName {
    DbName::new(s).unwrap()
}

pub fn doc(s: &str) -> DocId {
    DocId::new(s).unwrap()
}

/// Wait (event-driven, bounded) until `doc` in `db` equals `want` on `c`.
pub async fn until_value(c: &SyncClient, db: &DbName, d: &DocId, want: &Json) {
    let mut events = c.events();
    tokio::time::timeout(WAIT, async {
        loop {
            if c.get(db, d).unwrap().as_ref() == Some(want) {
                return;
            }
            let _ = events.recv().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{db}/{d} never became {want}"));
}

pub async fn synced(c: &SyncClient, db: &DbName) {
    tokio::time::timeout(WAIT, c.wait_synced(db))
        .await
        .expect("synced in time")
        .expect("synced");
}

/// A token minted by `syncline token ARGS` for the server on `data`.
pub fn token(data: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_syncline"))
        .arg("token")
        .args(args)
        .args(["--secret", SECRET])
        .arg("--data")
        .arg(data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// `len` letters that deflate does not shrink much.
pub fn incompressible(len: usize, seed: u64) -> String {
    let mut x = 0x2545_F491_4F6C_DD1Du64 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}
