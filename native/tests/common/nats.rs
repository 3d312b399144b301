//! A real 3-server NATS JetStream cluster on 127.0.0.1 for the cluster
//! tests: the `nats-server` that `scripts/install nats` puts in
//! `.tools/nats/` (or `SYNCLINE_NATS_SERVER`), file storage, every write
//! fsynced (`sync_interval: always`, checked on each server).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

pub struct NatsCluster {
    pub dir: tempfile::TempDir,
    bin: PathBuf,
    procs: Vec<Option<Child>>,
    pub client_ports: Vec<u16>,
    pub http_ports: Vec<u16>,
    route_ports: Vec<u16>,
}

/// The nats-server binary; a missing one fails the test (never skips it).
pub fn nats_server() -> PathBuf {
    if let Ok(p) = std::env::var("SYNCLINE_NATS_SERVER") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/nats/bin/nats-server");
    assert!(
        p.exists(),
        "{} is missing: run `scripts/install nats` (scripts/test does)",
        p.display()
    );
    p
}

fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

impl NatsCluster {
    /// Three servers, `max_payload` bytes per message; returns once each
    /// fsyncs every write and the cluster has a JetStream leader.
    pub fn start(max_payload: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(9);
        let (client_ports, route_ports, http_ports) = (
            ports[0..3].to_vec(),
            ports[3..6].to_vec(),
            ports[6..9].to_vec(),
        );
        let routes: Vec<String> = route_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect();
        for i in 0..3 {
            let conf = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\n\
                 max_payload: {max_payload}\n\
                 jetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n\
                 cluster {{\n  name: t\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                client_ports[i],
                http_ports[i],
                dir.path().join(format!("js-{i}")).display(),
                route_ports[i],
                routes.join(", ")
            );
            std::fs::write(dir.path().join(format!("n{i}.conf")), conf).unwrap();
        }
        let mut c = NatsCluster {
            dir,
            bin: nats_server(),
            procs: vec![None, None, None],
            client_ports,
            http_ports,
            route_ports,
        };
        for i in 0..3 {
            c.spawn(i);
        }
        c.wait_ready();
        c
    }

    fn spawn(&mut self, i: usize) {
        let log = std::fs::File::create(self.dir.path().join(format!("n{i}.log"))).unwrap();
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(self.dir.path().join(format!("n{i}.conf")))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.procs[i] = Some(child);
    }

    /// The client URLs, comma-separated (`--cluster`).
    pub fn urls(&self) -> String {
        self.client_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `GET path` on server `i`'s monitoring port, as JSON.
    pub fn monitor(&self, i: usize, path: &str) -> Option<Json> {
        let mut s = TcpStream::connect(("127.0.0.1", self.http_ports[i])).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        let json = body.split_once("\r\n\r\n")?.1;
        serde_json::from_str(json).ok()
    }

    /// Wait until every running server fsyncs every write and sees a
    /// 3-server meta group with a leader.
    pub fn wait_ready(&self) {
        let until = Instant::now() + Duration::from_secs(30);
        for i in 0..3 {
            if self.procs[i].is_none() {
                continue;
            }
            loop {
                if let (Some(varz), Some(jsz)) = (self.monitor(i, "/varz"), self.monitor(i, "/jsz"))
                {
                    assert_eq!(
                        varz["jetstream"]["config"]["sync_always"],
                        Json::Bool(true),
                        "nats n{i} must fsync every write"
                    );
                    let meta = &jsz["meta_cluster"];
                    if meta["leader"].as_str().is_some_and(|l| !l.is_empty())
                        && meta["cluster_size"] == 3
                    {
                        break;
                    }
                }
                assert!(Instant::now() < until, "nats n{i} not ready in 30 s");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The index of the server leading `stream`'s replicas.
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        for i in 0..3 {
            if self.procs[i].is_none() {
                continue;
            }
            let Some(jsz) = self.monitor(i, "/jsz?streams=true") else {
                continue;
            };
            for account in jsz["account_details"].as_array().into_iter().flatten() {
                for s in account["stream_detail"].as_array().into_iter().flatten() {
                    if s["name"] == stream
                        && let Some(l) = s["cluster"]["leader"].as_str()
                    {
                        return l.strip_prefix('n').and_then(|n| n.parse().ok());
                    }
                }
            }
        }
        None
    }

    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.procs[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self, i: usize) {
        self.kill9(i);
        self.spawn(i);
    }

    fn signal(&self, i: usize, sig: &str) {
        if let Some(c) = &self.procs[i] {
            let ok = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "kill {sig} n{i}");
        }
    }

    pub fn stop(&self, i: usize) {
        self.signal(i, "-STOP");
    }

    pub fn resume(&self, i: usize) {
        self.signal(i, "-CONT");
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..3 {
            self.resume(i);
            self.kill9(i);
        }
    }
}
