//! The real server binary on 127.0.0.1 with an ephemeral port, and tokens
//! minted by its CLI, for the integration tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The longest any single wait of a test may take.
pub const WAIT: Duration = Duration::from_secs(20);

/// The secret the test servers sign tokens with.
pub const SECRET: &str = "test-secret-0123456789-0123456789";

/// A running `syncline serve`, killed when dropped.
pub struct ServerProc {
    child: Child,
    pub addr: SocketAddr,
}

impl ServerProc {
    /// `syncline serve` on `data`, listening on 127.0.0.1:0.
    pub fn start(data: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_syncline"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .args(["--secret", SECRET])
            .args(extra)
            .env("SYNCLINE_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start syncline");
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
        out.read_line(&mut line).expect("the server's first line");
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("an address");
        ServerProc { child, addr }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/sync", self.addr)
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
        .expect("run syncline token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("a token is text")
        .trim()
        .to_owned()
}
