//! Prometheus metrics, every series prefixed `syncline_`.
//!
//! No series names a database unless the operator opts in
//! (`--metrics-db-labels`): database names can be secrets (the TodoMVC
//! demo shares lists by name), and a label per database ever seen would
//! grow without bound. Opted in, a database's series go when it has none
//! to report.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label: a database name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DbLabel {
    /// The database.
    pub db: String,
}

/// Label: an error code name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// The code.
    pub code: String,
}

/// Every series the server exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Open WebSocket connections.
    pub connections: Gauge,
    /// Whether series name databases (`--metrics-db-labels`).
    pub db_labels: bool,
    /// Subscriptions, over all databases.
    pub subscriptions_all: Gauge,
    /// Subscribed connections per database (with `db_labels`).
    pub subscriptions: Family<DbLabel, Gauge>,
    /// Entries received in pushes.
    pub entries_in: Counter,
    /// Entries sent in deltas (counted per recipient).
    pub entries_out: Counter,
    /// Bytes of pushed changes parsed off the hub (resends of held
    /// entries are dropped before and not counted).
    pub validated_bytes: Counter,
    /// Frame bytes received.
    pub bytes_in: Counter,
    /// Frame bytes sent.
    pub bytes_out: Counter,
    /// Most bytes one connection has had queued for sending, since start
    /// (a frame that would take a connection past `--max-queued-bytes` is
    /// not queued: the connection is dropped instead).
    pub queued_bytes_peak: Gauge,
    /// Latency of each fsync.
    pub fsync_seconds: Histogram,
    /// Compactions done (snapshots durable and the log file rewritten).
    pub compactions: Counter,
    /// Cluster mode: time from publishing a message to the engine's
    /// acknowledgement (retries included).
    pub engine_publish_seconds: Histogram,
    /// Cluster mode: messages the engine did not acknowledge by the deadline.
    pub engine_publish_failed: Counter,
    /// Cluster mode: messages of the streams not yet read by this node
    /// (its lag behind the engine), as of the last message read.
    pub engine_tail_lag: Gauge,
    /// Cluster mode: entries from other nodes' messages taken in.
    pub engine_ingested: Counter,
    /// Cluster mode: stream messages this node could not read (skipped).
    pub engine_bad_messages: Counter,
    /// Documents a compaction could not fold (their entries stay in the log).
    pub compaction_skipped_docs: Counter,
    /// Errors sent to peers, by code.
    pub errors: Family<CodeLabel, Counter>,
    /// Connections closed because the peer went silent or stopped taking frames.
    pub dead_connections: Counter,
    /// Document views built in the background.
    pub views_built: Counter,
    /// Document views sent with replies (counted per recipient).
    pub views_out: Counter,
    /// Frames after which a connection waited for its read rate.
    pub read_waits: Counter,
    /// Idle databases unloaded to stay within `--max-loaded-bytes`.
    pub unloaded: Counter,
    /// Bytes the loaded databases hold, roughly (as of the last check).
    pub loaded_bytes: Gauge,
    /// Bytes the database logs take on disk (`--max-disk-bytes`).
    pub disk_bytes: Gauge,
    /// Log files the store holds open (`--max-open-files`).
    pub open_files: Gauge,
    /// Databases with view building scheduled or running.
    pub views_pending_all: Gauge,
    /// 1 while a database has view building scheduled or running (with
    /// `db_labels`; its series is removed when done).
    pub views_pending: Family<DbLabel, Gauge>,
}

impl Metrics {
    /// Register every series; per-database ones only with `db_labels`.
    pub fn new(db_labels: bool) -> Self {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("syncline")),
            connections: Gauge::default(),
            db_labels,
            subscriptions_all: Gauge::default(),
            subscriptions: Family::default(),
            entries_in: Counter::default(),
            entries_out: Counter::default(),
            validated_bytes: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            queued_bytes_peak: Gauge::default(),
            fsync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            compactions: Counter::default(),
            engine_publish_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 18)),
            engine_publish_failed: Counter::default(),
            engine_tail_lag: Gauge::default(),
            engine_ingested: Counter::default(),
            engine_bad_messages: Counter::default(),
            compaction_skipped_docs: Counter::default(),
            errors: Family::default(),
            dead_connections: Counter::default(),
            views_built: Counter::default(),
            views_out: Counter::default(),
            views_pending_all: Gauge::default(),
            unloaded: Counter::default(),
            read_waits: Counter::default(),
            loaded_bytes: Gauge::default(),
            disk_bytes: Gauge::default(),
            open_files: Gauge::default(),
            views_pending: Family::default(),
        };
        if let Ok(mut r) = m.registry.lock() {
            r.register(
                "connections",
                "Open WebSocket connections",
                m.connections.clone(),
            );
            if db_labels {
                r.register(
                    "subscriptions",
                    "Subscribed connections per database",
                    m.subscriptions.clone(),
                );
            } else {
                r.register(
                    "subscriptions",
                    "Subscriptions over all databases",
                    m.subscriptions_all.clone(),
                );
            }
            r.register(
                "entries_in",
                "Entries received in pushes",
                m.entries_in.clone(),
            );
            r.register(
                "entries_out",
                "Entries sent in deltas",
                m.entries_out.clone(),
            );
            r.register(
                "validated_bytes",
                "Bytes of pushed changes parsed off the hub",
                m.validated_bytes.clone(),
            );
            r.register("bytes_in", "Frame bytes received", m.bytes_in.clone());
            r.register("bytes_out", "Frame bytes sent", m.bytes_out.clone());
            r.register(
                "queued_bytes_peak",
                "Most bytes one connection has had queued for sending (at most --max-queued-bytes)",
                m.queued_bytes_peak.clone(),
            );
            r.register(
                "fsync_seconds",
                "Latency of each fsync",
                m.fsync_seconds.clone(),
            );
            r.register("compactions", "Compactions done", m.compactions.clone());
            r.register(
                "engine_publish_seconds",
                "Cluster mode: publish to the engine's acknowledgement",
                m.engine_publish_seconds.clone(),
            );
            r.register(
                "engine_publish_failed",
                "Cluster mode: messages not acknowledged by the engine in time",
                m.engine_publish_failed.clone(),
            );
            r.register(
                "engine_tail_lag",
                "Cluster mode: stream messages not yet read by this node",
                m.engine_tail_lag.clone(),
            );
            r.register(
                "engine_ingested",
                "Cluster mode: entries taken in from other nodes",
                m.engine_ingested.clone(),
            );
            r.register(
                "engine_bad_messages",
                "Cluster mode: stream messages that did not decode (skipped)",
                m.engine_bad_messages.clone(),
            );
            r.register(
                "compaction_skipped_documents",
                "Documents a compaction could not fold (left in the log)",
                m.compaction_skipped_docs.clone(),
            );
            r.register("errors", "Errors sent to peers, by code", m.errors.clone());
            r.register(
                "read_waits",
                "Frames after which a connection waited for its read rate",
                m.read_waits.clone(),
            );
            r.register(
                "unloaded_databases",
                "Idle databases unloaded to stay within --max-loaded-bytes",
                m.unloaded.clone(),
            );
            r.register(
                "loaded_bytes",
                "Bytes the loaded databases hold, roughly",
                m.loaded_bytes.clone(),
            );
            r.register(
                "disk_bytes",
                "Bytes the database logs take on disk",
                m.disk_bytes.clone(),
            );
            r.register(
                "open_files",
                "Log files the store holds open",
                m.open_files.clone(),
            );
            r.register(
                "dead_connections",
                "Connections closed as silent or unable to take frames",
                m.dead_connections.clone(),
            );
            r.register(
                "views_built",
                "Document views built in the background",
                m.views_built.clone(),
            );
            r.register(
                "views_out",
                "Document views sent with replies",
                m.views_out.clone(),
            );
            if db_labels {
                r.register(
                    "views_pending",
                    "1 while a database has view building scheduled or running",
                    m.views_pending.clone(),
                );
            } else {
                r.register(
                    "views_pending",
                    "Databases with view building scheduled or running",
                    m.views_pending_all.clone(),
                );
            }
        }
        m
    }

    /// Count one error sent.
    pub fn error(&self, code: &str) {
        self.errors
            .get_or_create(&CodeLabel { code: code.into() })
            .inc();
    }

    /// A connection now has `bytes` queued for sending.
    pub fn queued(&self, bytes: usize) {
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        self.queued_bytes_peak
            .inner()
            .fetch_max(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(false)
    }
}
