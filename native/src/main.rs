//! `syncline`: the self-hosted sync server and its command-line tools.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde::Deserialize;
use syncline::auth::{Claims, GrantClaim, MIN_SECRET_LEN, TokenAuth, TokenConfig, mint};
use syncline::server::{ServeOptions, run};
use syncline::{ClientError, ClientEvent, Status, SyncClient};
use syncline_core::sync::Right;

mod cli_replica;
mod memory;
mod offline;

#[derive(Parser, Debug)]
#[command(name = "syncline", version, about = "Offline-first CRDT sync server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the sync server (WebSocket /sync, /healthz, /metrics, static demos).
    Serve(Box<ServeArgs>),
    /// Mint a signed access token for databases matching a pattern.
    Token(TokenArgs),
    /// Print a document as JSON (from a server, as a native client).
    Get(DocArgs),
    /// Replace a document with JSON (minimal changes), durably on the server.
    Put(PutArgs),
    /// Delete a document (a synced tombstone).
    Delete(DocArgs),
    /// List the documents of a database (or, with --databases, the databases).
    List(ListArgs),
    /// Print every document of a stopped server's data dir as JSON lines.
    Dump(DumpArgs),
    /// Fold a stopped server's logs into snapshots and rewrite the files.
    Compact(OfflineArgs),
    /// Check a stopped server's logs: records, checksums, counters, changes.
    Verify(OfflineArgs),
}

/// How get/put/delete/list reach the server.
#[derive(clap::Args, Debug)]
struct RemoteArgs {
    /// Server WebSocket URL, e.g. ws://127.0.0.1:7070/sync.
    #[arg(long, env = "SYNCLINE_URL", default_value = "ws://127.0.0.1:7070/sync")]
    url: String,
    /// Access token (empty for anonymous databases).
    #[arg(
        long,
        env = "SYNCLINE_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    token: String,
    /// Seconds to wait for a server that does not answer (a refused
    /// connection or a bad address fails at once).
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// Where the command keeps its replica between calls (one per server,
    /// and one more per command running at the same time) [default: the
    /// user's config directory, e.g. ~/.config/syncline/cli].
    #[arg(long, env = "SYNCLINE_CLI_DIR")]
    replica_dir: Option<PathBuf>,
    /// PEM certificates of a private CA to trust for wss:// (besides the
    /// system's roots and Mozilla's).
    #[arg(long, env = "SYNCLINE_CA")]
    ca_file: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct DocArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// Database.
    db: String,
    /// Document id.
    doc: String,
}

#[derive(clap::Args, Debug)]
struct PutArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// Database.
    db: String,
    /// Document id.
    doc: String,
    /// The document, a JSON object.
    json: String,
}

#[derive(clap::Args, Debug)]
struct ListArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// List the databases (admin token) instead of a database's documents.
    #[arg(long, conflicts_with = "db")]
    databases: bool,
    /// Database.
    #[arg(required_unless_present = "databases")]
    db: Option<String>,
}

#[derive(clap::Args, Debug)]
struct OfflineArgs {
    /// Data directory of a stopped server.
    #[arg(long, env = "SYNCLINE_DATA")]
    data: PathBuf,
    /// Only this database (default: all).
    db: Option<String>,
}

#[derive(clap::Args, Debug)]
struct DumpArgs {
    #[command(flatten)]
    offline: OfflineArgs,
    /// Print each stored change (database, document, replica, counter)
    /// with who wrote it (the token subjects its replica connected with),
    /// instead of the documents: the audit trail.
    #[arg(long)]
    changes: bool,
}

#[derive(clap::Args, Debug, Default)]
struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:7070]; port 0 picks a free one.
    #[arg(long, env = "SYNCLINE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data directory [default: ./syncline-data].
    #[arg(long, env = "SYNCLINE_DATA")]
    data: Option<PathBuf>,
    /// HS256 secret for tokens, at least 32 bytes; prefer --secret-file (a
    /// command line shows in `ps`) [default: generated on first start, kept
    /// in DATA/secret].
    #[arg(long, env = "SYNCLINE_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// A file holding the HS256 secret (at least 32 bytes; a trailing
    /// newline is ignored).
    #[arg(long, env = "SYNCLINE_SECRET_FILE", conflicts_with = "secret")]
    secret_file: Option<PathBuf>,
    /// A JWKS file (JSON Web Key Set) of public keys for EdDSA, ES256 and
    /// RS256 tokens, e.g. your identity provider's; each key needs a "kid".
    /// Reread when it changes, so keys rotate without a restart.
    #[arg(long, env = "SYNCLINE_JWKS_FILE")]
    jwks_file: Option<PathBuf>,
    /// The token claim that lists the grants [default: grants].
    #[arg(long, env = "SYNCLINE_GRANTS_CLAIM")]
    grants_claim: Option<String>,
    /// Accept only tokens with this issuer (`iss`).
    #[arg(long, env = "SYNCLINE_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// Accept only tokens for this audience (`aud`).
    #[arg(long, env = "SYNCLINE_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
    /// Database pattern open to anonymous clients (read and write); repeatable.
    #[arg(long, env = "SYNCLINE_ANONYMOUS", value_delimiter = ',')]
    anonymous: Vec<String>,
    /// Name clients reach this server by (`host` or `host:port`, as in its
    /// URL); repeatable. Each client signs the host it dialled, and a
    /// connection signed for another is refused. Set it when a proxy in
    /// front rewrites the Host header [default: the request's Host].
    #[arg(
        long = "server-name",
        env = "SYNCLINE_SERVER_NAMES",
        value_delimiter = ','
    )]
    server_names: Vec<String>,
    /// TLS certificate chain (PEM) to serve https:// and wss:// on the
    /// listening port, with --tls-key. Reread when it changes (renewals
    /// need no restart).
    #[arg(long, env = "SYNCLINE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "SYNCLINE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Web origins whose pages may open /sync, e.g. https://app.example.com
    /// (`*` wildcards); repeatable. Pages of other sites are refused (403).
    /// Native clients send no Origin and are not affected [default: any].
    #[arg(
        long = "allowed-origins",
        env = "SYNCLINE_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    allowed_origins: Vec<String>,
    /// Most simultaneous connections [default: 10000].
    #[arg(long, env = "SYNCLINE_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Most simultaneous connections from one IP address, loopback
    /// included (behind a reverse proxy every client shares its address:
    /// raise this) [default: 256].
    #[arg(long, env = "SYNCLINE_MAX_CONNECTIONS_PER_IP")]
    max_connections_per_ip: Option<usize>,
    /// WebSocket handshakes per second one IP address may open, in bursts
    /// of up to --max-connections-per-ip [default: 64].
    #[arg(long, env = "SYNCLINE_HANDSHAKES_PER_IP")]
    handshakes_per_ip: Option<u32>,
    /// Largest frame in bytes, 65536 to 134217728 [default: 16777216].
    #[arg(long, env = "SYNCLINE_MAX_FRAME")]
    max_frame: Option<usize>,
    /// Most entries in one push [default: 10000].
    #[arg(long, env = "SYNCLINE_MAX_ENTRIES_PER_PUSH")]
    max_entries_per_push: Option<usize>,
    /// Bytes queued for a connection before it is dropped as too slow [default: 33554432].
    #[arg(long, env = "SYNCLINE_MAX_QUEUED_BYTES")]
    max_queued_bytes: Option<usize>,
    /// Directory of static files to serve (the built demos). Never served
    /// from it: dotfiles and dot-directories, and symlinks that resolve
    /// outside it (symlinks within it are followed). Refused if it contains
    /// the data directory or lies inside it.
    #[arg(long = "static", env = "SYNCLINE_STATIC")]
    static_dir: Option<PathBuf>,
    /// Compact a database in the background once its log holds this many bytes of changes [default: 67108864].
    #[arg(long, env = "SYNCLINE_COMPACT_AFTER_BYTES")]
    compact_after_bytes: Option<usize>,
    /// Build JSON views of documents when a database is quiet and send them
    /// with cold syncs, so clients show documents without applying their
    /// history [default: true].
    #[arg(long, env = "SYNCLINE_VIEWS")]
    views: Option<bool>,
    /// Seconds a database must go without a write before its changed
    /// documents' views are built [default: 0.1].
    #[arg(long, env = "SYNCLINE_VIEWS_QUIET")]
    views_quiet: Option<f64>,
    /// Seconds at most a changed document waits for its view while writes
    /// keep coming, so a database that is never quiet still has views
    /// [default: 1].
    #[arg(long, env = "SYNCLINE_VIEWS_MAX_WAIT")]
    views_max_wait: Option<f64>,
    /// Seconds a new connection may take to send Hello [default: 10].
    #[arg(long, env = "SYNCLINE_HELLO_TIMEOUT")]
    hello_timeout: Option<f64>,
    /// Seconds between pings to each connection; one silent (or unable to
    /// take a frame) for two intervals is closed [default: 30].
    #[arg(long, env = "SYNCLINE_PING_INTERVAL")]
    ping_interval: Option<f64>,
    /// Most databases one connection may subscribe to at once [default: 1000].
    #[arg(long, env = "SYNCLINE_MAX_SUBSCRIPTIONS_PER_CONNECTION")]
    max_subscriptions_per_connection: Option<usize>,
    /// Largest presence state a client may publish, in bytes, 1 to 16384
    /// (read-only clients may publish presence too) [default: 16384].
    #[arg(long, env = "SYNCLINE_MAX_PRESENCE_BYTES")]
    max_presence_bytes: Option<usize>,
    /// Presence updates per second one connection may cause; faster ones
    /// are coalesced, the latest announced a second later [default: 10].
    #[arg(long, env = "SYNCLINE_PRESENCE_PER_SECOND")]
    presence_per_second: Option<u32>,
    /// Database log files kept open at once; the least recently written
    /// are closed past it (each database ever written would otherwise
    /// hold a descriptor) [default: 256].
    #[arg(long, env = "SYNCLINE_MAX_OPEN_FILES")]
    max_open_files: Option<usize>,
    /// Bytes of databases kept in memory; past it, databases with no
    /// subscriber and no write on its way are unloaded, least recently
    /// used first (checked every 10 s) [default: 1073741824].
    #[arg(long, env = "SYNCLINE_MAX_LOADED_BYTES")]
    max_loaded_bytes: Option<usize>,
    /// Bytes one database may hold (changes and snapshots); pushes to a
    /// database past it are refused with TooLarge and stored nowhere, the
    /// clients keep them and push again later [default: 1073741824].
    #[arg(long, env = "SYNCLINE_MAX_DATABASE_BYTES")]
    max_database_bytes: Option<usize>,
    /// Databases each --anonymous pattern may hold; a push that would
    /// create one more is refused with TooLarge (an admin token may still
    /// create one) [default: 10000].
    #[arg(long, env = "SYNCLINE_MAX_ANONYMOUS_DATABASES")]
    max_anonymous_databases: Option<usize>,
    /// Bytes the database logs may take on disk in all; past it, every
    /// push is refused with TooLarge until compaction or an operator frees
    /// space (0: no limit) [default: 0].
    #[arg(long, env = "SYNCLINE_MAX_DISK_BYTES")]
    max_disk_bytes: Option<u64>,
    /// Bytes a second one connection's frames are read at, at most (each
    /// frame counted as at least 512 bytes); a faster peer waits in its
    /// own socket [default: 16777216].
    #[arg(long, env = "SYNCLINE_MAX_READ_BYTES_PER_SECOND")]
    max_read_bytes_per_second: Option<u64>,
    /// Serve /metrics on this address only (not beside /sync), e.g. a
    /// private interface; port 0 picks a free one [default: beside /sync].
    #[arg(long, env = "SYNCLINE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Let /metrics name databases (per-database subscriptions and view
    /// builds). Off by default: database names can be secrets (shared by
    /// link) and /metrics needs no token [default: false].
    #[arg(long, env = "SYNCLINE_METRICS_DB_LABELS")]
    metrics_db_labels: Option<bool>,
    /// Cluster mode: NATS JetStream servers (comma-separated URLs) that
    /// hold every database, shared by all the nodes started with them;
    /// this node then keeps no database on disk. Needs JetStream with
    /// `sync_interval: always` on 3 servers (`scripts/cluster` starts one)
    /// [default: the embedded file store in --data].
    #[arg(long, env = "SYNCLINE_CLUSTER", value_delimiter = ',')]
    cluster: Vec<String>,
    /// Cluster mode: replicas of each stream the first node creates; the
    /// engine refuses more than it has servers [default: 3].
    #[arg(long, env = "SYNCLINE_CLUSTER_REPLICAS")]
    cluster_replicas: Option<usize>,
    /// TOML file with any of the settings above (flags and environment win).
    #[arg(long, env = "SYNCLINE_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    listen: Option<SocketAddr>,
    data: Option<PathBuf>,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    jwks_file: Option<PathBuf>,
    grants_claim: Option<String>,
    jwt_issuer: Option<String>,
    jwt_audience: Option<String>,
    #[serde(default)]
    anonymous: Vec<String>,
    #[serde(default)]
    server_names: Vec<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default)]
    allowed_origins: Vec<String>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    handshakes_per_ip: Option<u32>,
    max_frame: Option<usize>,
    max_entries_per_push: Option<usize>,
    max_queued_bytes: Option<usize>,
    #[serde(rename = "static")]
    static_dir: Option<PathBuf>,
    compact_after_bytes: Option<usize>,
    views: Option<bool>,
    views_quiet: Option<f64>,
    views_max_wait: Option<f64>,
    hello_timeout: Option<f64>,
    ping_interval: Option<f64>,
    metrics_listen: Option<SocketAddr>,
    metrics_db_labels: Option<bool>,
    max_subscriptions_per_connection: Option<usize>,
    max_presence_bytes: Option<usize>,
    presence_per_second: Option<u32>,
    max_open_files: Option<usize>,
    max_loaded_bytes: Option<usize>,
    max_database_bytes: Option<usize>,
    max_anonymous_databases: Option<usize>,
    max_disk_bytes: Option<u64>,
    max_read_bytes_per_second: Option<u64>,
    #[serde(default)]
    cluster: Vec<String>,
    cluster_replicas: Option<usize>,
}

#[derive(clap::Args, Debug)]
struct TokenArgs {
    /// A grant, PATTERN=RIGHTS (`*` in the pattern matches any run of
    /// characters; rights are read, write or admin); repeatable, e.g.
    /// --grant 'org-42-*=read' --grant user-7=write.
    #[arg(long = "grant", value_name = "PATTERN=RIGHTS")]
    grants: Vec<String>,
    /// One database pattern (with --rights): the same as --grant PATTERN=RIGHTS.
    #[arg(long, requires = "rights")]
    db: Option<String>,
    /// read, write or admin, for --db.
    #[arg(long, requires = "db")]
    rights: Option<String>,
    /// Who the token is for (its `sub` claim; the server logs it).
    #[arg(long)]
    sub: Option<String>,
    /// Lifetime, e.g. 30s, 15m, 12h, 7d, or `never`.
    #[arg(long, default_value = "24h")]
    expires: String,
    /// HS256 secret (or SYNCLINE_SECRET; else --secret-file, else DATA/secret).
    #[arg(long, env = "SYNCLINE_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// A file holding the secret.
    #[arg(long, env = "SYNCLINE_SECRET_FILE", conflicts_with = "secret")]
    secret_file: Option<PathBuf>,
    /// Data directory holding the generated secret [default: ./syncline-data].
    #[arg(long, env = "SYNCLINE_DATA")]
    data: Option<PathBuf>,
    /// The server's TOML config file: its secret, secret-file and data are
    /// read as `serve` reads them (flags and environment win).
    #[arg(long, env = "SYNCLINE_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SYNCLINE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Before the work allocates (tracing's set-up above takes a few bytes).
    memory::tune();
    match Cli::parse().command {
        Command::Serve(args) => serve(*args),
        Command::Token(args) => token(args),
        Command::Get(a) => remote(&a.remote, &a.db, Op::Get(&a.doc)),
        Command::Put(a) => remote(&a.remote, &a.db, Op::Put(&a.doc, &a.json)),
        Command::Delete(a) => remote(&a.remote, &a.db, Op::Delete(&a.doc)),
        Command::List(a) if a.databases => list_databases(&a.remote),
        Command::List(a) => remote(&a.remote, a.db.as_deref().unwrap_or_default(), Op::List),
        Command::Dump(a) if a.changes => {
            offline::dump_changes(&a.offline.data, a.offline.db.as_deref())
        }
        Command::Dump(a) => offline::dump(&a.offline.data, a.offline.db.as_deref()),
        Command::Compact(a) => offline::compact(&a.data, a.db.as_deref()),
        Command::Verify(a) => offline::verify(&a.data, a.db.as_deref()),
    }
}

/// What a get/put/delete/list command does.
enum Op<'a> {
    Get(&'a str),
    Put(&'a str, &'a str),
    Delete(&'a str),
    List,
}

/// get/put/delete/list through the user's replica for this server.
fn remote(a: &RemoteArgs, db: &str, op: Op<'_>) -> Result<()> {
    use syncline_core::{DbName, DocId};
    let db = DbName::new(db)?;
    let doc = match op {
        Op::Get(d) | Op::Put(d, _) | Op::Delete(d) => Some(DocId::new(d)?),
        Op::List => None,
    };
    let value: Option<serde_json::Value> = match op {
        Op::Put(_, j) => Some(serde_json::from_str(j).context("parsing the JSON argument")?),
        _ => None,
    };
    with_client(a, |client| async move {
        client.open(&db).await?;
        synced(&client, &db, a).await?;
        match (op, doc) {
            (Op::Get(_), Some(d)) => match client.get(&db, &d)? {
                Some(v) => println!("{v}"),
                None => bail!("no document {d} in {db}"),
            },
            (Op::Put(..), Some(d)) => {
                client.put(&db, &d, value.unwrap_or_default()).await?;
                synced(&client, &db, a).await?;
            }
            (Op::Delete(_), Some(d)) => {
                client.delete(&db, &d).await?;
                synced(&client, &db, a).await?;
            }
            _ => {
                for d in client.list(&db)? {
                    println!("{d}");
                }
            }
        }
        Ok(())
    })
}

/// Wait until `db` is in sync; fail as soon as connecting does (a one-shot
/// command has no use for the client's retries), or after `--timeout` for
/// a server that does not answer at all.
async fn synced(client: &SyncClient, db: &syncline_core::DbName, a: &RemoteArgs) -> Result<()> {
    let timeout = std::time::Duration::from_secs(a.timeout);
    let mut events = client.events();
    let failed = async {
        if let Some(cause) = client.last_failure().await {
            return cause;
        }
        loop {
            match events.recv().await {
                Ok(ClientEvent::ConnectFailed { message, .. }) => return message,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    return "the client stopped".into();
                }
                _ => {}
            }
        }
    };
    tokio::select! {
        r = client.wait_synced_for(db, timeout) => match r {
            Err(ClientError::Timeout { status: Status::Offline, last_failure: None, .. }) => bail!(
                "no answer from {} within {}s: nothing at that address answers \
                 (a wrong host or port, or a firewall dropping packets?)",
                a.url, a.timeout
            ),
            r => r.map_err(anyhow::Error::from),
        },
        cause = failed => bail!("cannot connect to {}: {cause}", a.url),
    }
}

fn list_databases(a: &RemoteArgs) -> Result<()> {
    with_client(a, |client| async move {
        let timeout = std::time::Duration::from_secs(a.timeout);
        let names = match tokio::time::timeout(timeout, client.list_databases()).await {
            Ok(r) => r?,
            Err(_) => bail!("no answer from {} within {}s", a.url, a.timeout),
        };
        for n in names {
            println!("{n}");
        }
        Ok(())
    })
}

/// Run `f` with a native client on the user's replica for this server
/// (`cli_replica`), or, with no config directory, on a throw-away one.
fn with_client<F, Fut>(a: &RemoteArgs, f: F) -> Result<()>
where
    F: FnOnce(syncline::client::SyncClient) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let kept = match a.replica_dir.clone().or_else(cli_replica::default_root) {
        Some(root) => Some(cli_replica::take(&root, &a.url)?),
        None => None,
    };
    let local = match &kept {
        Some(r) => r.dir.clone(),
        None => tempfile_dir()?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = runtime.block_on(async {
        let options = syncline::client::ClientOptions {
            ca_file: a.ca_file.clone(),
        };
        let client =
            syncline::client::SyncClient::connect_with(Some(&a.url), &a.token, &local, &options)
                .await?;
        let r = f(client.clone()).await;
        client.close().await;
        r
    });
    if kept.is_none() {
        let _ = std::fs::remove_dir_all(&local);
    }
    result
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "syncline-cli-{}",
        syncline_core::ReplicaId::random().to_hex()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn default_data() -> PathBuf {
    PathBuf::from("syncline-data")
}

/// The secret: given, or read from a file, or read from / generated into
/// DATA/secret (mode 0600).
fn secret_from(
    given: Option<String>,
    file: Option<&Path>,
    data: &Path,
    create: bool,
) -> Result<Vec<u8>> {
    let secret = match (given, file) {
        (Some(s), _) => s.into_bytes(),
        (None, Some(f)) => {
            let mut s = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            while s.last().is_some_and(|c| matches!(c, b'\n' | b'\r')) {
                s.pop();
            }
            s
        }
        (None, None) => return load_secret(data, create),
    };
    if secret.len() < MIN_SECRET_LEN {
        bail!(
            "the token secret must be at least {MIN_SECRET_LEN} bytes, not {} (e.g. `openssl rand -hex 32`)",
            secret.len()
        );
    }
    Ok(secret)
}

/// The secret kept in DATA/secret (mode 0600), generated when `create`.
fn load_secret(data: &Path, create: bool) -> Result<Vec<u8>> {
    let path = data.join("secret");
    match std::fs::read(&path) {
        Ok(s) if !s.is_empty() => return Ok(s),
        Ok(_) => bail!("{} is empty", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {}
        Err(e) => {
            return Err(e).with_context(|| format!("reading the secret from {}", path.display()));
        }
    }
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let secret: String = (0..2)
        .map(|_| syncline_core::ReplicaId::random().to_hex())
        .collect();
    write_private(&path, secret.as_bytes())?;
    tracing::info!("generated a token secret in {}", path.display());
    Ok(secret.into_bytes())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// The server's TOML config file (none: every setting unset).
fn read_config(path: Option<&Path>) -> Result<FileConfig> {
    match path {
        Some(p) => toml::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("parsing {}", p.display())),
        None => Ok(FileConfig::default()),
    }
}

/// The largest `--max-frame` accepted: half a log record.
const MAX_FRAME_LIMIT: usize = syncline::store::MAX_RECORD / 2;

fn serve(args: ServeArgs) -> Result<()> {
    let file = read_config(args.config.as_deref())?;
    let data = args.data.or(file.data).unwrap_or_else(default_data);
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7070)));
    let anonymous = if args.anonymous.is_empty() {
        file.anonymous
    } else {
        args.anonymous
    };
    let tls = match (
        args.tls_cert.or(file.tls_cert),
        args.tls_key.or(file.tls_key),
    ) {
        (Some(cert), Some(key)) => Some(syncline::tls::server_config(cert, key)?),
        (None, None) => None,
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    let allowed_origins = if args.allowed_origins.is_empty() {
        file.allowed_origins
    } else {
        args.allowed_origins
    };
    let server_names = if args.server_names.is_empty() {
        file.server_names
    } else {
        args.server_names
    };
    let max_frame = args.max_frame.or(file.max_frame).unwrap_or(16 << 20);
    // A push becomes one atomic log record, and Welcome carries the limit
    // as a u32: keep it well inside both.
    if !(64 << 10..=MAX_FRAME_LIMIT).contains(&max_frame) {
        bail!("--max-frame must be between 65536 and {MAX_FRAME_LIMIT} bytes, not {max_frame}");
    }
    let max_connections_per_ip = args
        .max_connections_per_ip
        .or(file.max_connections_per_ip)
        .unwrap_or(256);
    if max_connections_per_ip == 0 {
        bail!("--max-connections-per-ip must be at least 1");
    }
    let handshakes_per_ip = args
        .handshakes_per_ip
        .or(file.handshakes_per_ip)
        .unwrap_or(64);
    if handshakes_per_ip == 0 {
        bail!("--handshakes-per-ip must be at least 1");
    }
    let max_subscriptions_per_peer = args
        .max_subscriptions_per_connection
        .or(file.max_subscriptions_per_connection)
        .unwrap_or(1_000);
    if max_subscriptions_per_peer == 0 {
        bail!("--max-subscriptions-per-connection must be at least 1");
    }
    let max_presence_bytes = args
        .max_presence_bytes
        .or(file.max_presence_bytes)
        .unwrap_or(syncline_core::protocol::MAX_PRESENCE_LEN);
    // The protocol's own limit, a quarter of the smallest --max-frame: a
    // presence update of one state always fits a frame.
    if !(1..=16 << 10).contains(&max_presence_bytes) {
        bail!("--max-presence-bytes must be between 1 and 16384, not {max_presence_bytes}");
    }
    let presence_per_second = args
        .presence_per_second
        .or(file.presence_per_second)
        .unwrap_or(10);
    if presence_per_second == 0 {
        bail!("--presence-per-second must be at least 1");
    }
    let static_dir = match args.static_dir.or(file.static_dir) {
        Some(dir) => Some(static_root(&dir, &data)?),
        None => None,
    };
    let cluster_urls = if args.cluster.is_empty() {
        file.cluster
    } else {
        args.cluster
    };
    let cluster = if cluster_urls.is_empty() {
        None
    } else {
        let replicas = args.cluster_replicas.or(file.cluster_replicas).unwrap_or(3);
        if replicas == 0 {
            bail!("--cluster-replicas must be at least 1");
        }
        Some(syncline::cluster::ClusterOptions {
            urls: cluster_urls,
            replicas,
            ..syncline::cluster::ClusterOptions::default()
        })
    };
    let options = ServeOptions {
        cluster,
        engine: None,
        auth: TokenAuth::new(TokenConfig {
            secret: secret_from(
                args.secret.or(file.secret),
                args.secret_file.or(file.secret_file).as_deref(),
                &data,
                true,
            )?,
            anonymous: anonymous.clone(),
            jwks_file: args.jwks_file.or(file.jwks_file),
            grants_claim: args.grants_claim.or(file.grants_claim),
            issuer: args.jwt_issuer.or(file.jwt_issuer),
            audience: args.jwt_audience.or(file.jwt_audience),
        })
        .map_err(anyhow::Error::msg)?,
        data,
        anonymous,
        server_names,
        tls,
        allowed_origins,
        max_connections: args
            .max_connections
            .or(file.max_connections)
            .unwrap_or(10_000),
        max_connections_per_ip,
        handshakes_per_ip,
        max_frame,
        max_entries_per_push: args
            .max_entries_per_push
            .or(file.max_entries_per_push)
            .unwrap_or(10_000),
        max_queued_bytes: args
            .max_queued_bytes
            .or(file.max_queued_bytes)
            .unwrap_or(32 << 20),
        static_dir,
        compact_after_bytes: args
            .compact_after_bytes
            .or(file.compact_after_bytes)
            .unwrap_or(64 << 20),
        serve_views: args.views.or(file.views).unwrap_or(true),
        views_quiet: seconds(
            "--views-quiet",
            args.views_quiet.or(file.views_quiet).unwrap_or(0.1),
        )?,
        views_max_wait: seconds(
            "--views-max-wait",
            args.views_max_wait.or(file.views_max_wait).unwrap_or(1.0),
        )?,
        hello_timeout: seconds(
            "--hello-timeout",
            args.hello_timeout.or(file.hello_timeout).unwrap_or(10.0),
        )?,
        ping_interval: seconds(
            "--ping-interval",
            args.ping_interval.or(file.ping_interval).unwrap_or(30.0),
        )?,
        metrics_listener: None,
        max_subscriptions_per_peer,
        max_presence_bytes,
        presence_per_second,
        max_open_files: args
            .max_open_files
            .or(file.max_open_files)
            .unwrap_or(syncline::store::DEFAULT_MAX_OPEN_FILES)
            .max(1),
        max_loaded_bytes: args
            .max_loaded_bytes
            .or(file.max_loaded_bytes)
            .unwrap_or(1 << 30),
        max_database_bytes: args
            .max_database_bytes
            .or(file.max_database_bytes)
            .unwrap_or(1 << 30),
        max_anonymous_databases: args
            .max_anonymous_databases
            .or(file.max_anonymous_databases)
            .unwrap_or(10_000),
        max_disk_bytes: args.max_disk_bytes.or(file.max_disk_bytes).unwrap_or(0),
        read_bytes_per_sec: args
            .max_read_bytes_per_second
            .or(file.max_read_bytes_per_second)
            .unwrap_or(16 << 20)
            .max(1),
        metrics_db_labels: args
            .metrics_db_labels
            .or(file.metrics_db_labels)
            .unwrap_or(false),
    };
    let metrics_listen = args.metrics_listen.or(file.metrics_listen);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let mut options = options;
        if let Some(c) = options.cluster.clone() {
            // Before saying it listens: a node that cannot reach the engine
            // never looks ready.
            options.engine = Some(syncline::cluster::Engine::connect(c).await?);
        }
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        let mut metrics_line = String::new();
        if let Some(at) = metrics_listen {
            let l = tokio::net::TcpListener::bind(at)
                .await
                .with_context(|| format!("listening on {at} for metrics"))?;
            let at = l.local_addr().context("reading the bound address")?;
            metrics_line = format!("\nmetrics on http://{at}/metrics");
            options.metrics_listener = Some(l);
        }
        tracing::info!(data = %options.data.display(), anonymous = ?options.anonymous, "serving");
        // Tests and scripts read the first line to find an ephemeral port
        // (one write: a reader may close the pipe after that line).
        let scheme = if options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        println!("listening on {scheme}://{addr}{metrics_line}");
        run(listener, options, shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(())
    })
}

/// The static directory, canonical, refused when it contains the data
/// directory (whose `secret` mints admin tokens) or lies inside it.
fn static_root(dir: &Path, data: &Path) -> Result<PathBuf> {
    let root = std::fs::canonicalize(dir)
        .with_context(|| format!("the static directory {}", dir.display()))?;
    if !root.is_dir() {
        bail!("the static directory {} is not a directory", dir.display());
    }
    // The server creates the data directory anyway; now, so it resolves.
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let data = std::fs::canonicalize(data)
        .with_context(|| format!("the data directory {}", data.display()))?;
    if data.starts_with(&root) {
        bail!(
            "the static directory {} contains the data directory {}, whose token secret \
             it would serve: use directories apart",
            root.display(),
            data.display()
        );
    }
    if root.starts_with(&data) {
        bail!(
            "the static directory {} is inside the data directory {}: use directories apart",
            root.display(),
            data.display()
        );
    }
    Ok(root)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// A positive number of seconds, at most a day.
fn seconds(flag: &str, s: f64) -> Result<std::time::Duration> {
    if !(0.01..=86_400.0).contains(&s) {
        bail!("{flag} must be between 0.01 and 86400 seconds, not {s}");
    }
    Ok(std::time::Duration::from_secs_f64(s))
}

fn parse_duration(s: &str) -> Result<u64> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().with_context(|| format!("bad duration {s:?}"))?;
    let mult = match unit {
        // A bare number was taken as seconds: `--expires 7` meant 7 days.
        "" => bail!("the duration {s:?} needs a unit: {s}s, {s}m, {s}h or {s}d"),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("bad duration unit in {s:?} (use s, m, h or d)"),
    };
    Ok(n.saturating_mul(mult))
}

fn token(args: TokenArgs) -> Result<()> {
    let mut grants = Vec::new();
    for g in &args.grants {
        let Some((db, rights)) = g.rsplit_once('=') else {
            bail!("--grant takes PATTERN=RIGHTS, e.g. 'org-*=read', not {g:?}");
        };
        grants.push((db.to_owned(), rights.to_owned()));
    }
    if let (Some(db), Some(rights)) = (args.db, args.rights) {
        grants.push((db, rights));
    }
    if grants.is_empty() {
        bail!("a token needs at least one grant: --grant PATTERN=RIGHTS (or --db and --rights)");
    }
    if let Some((_, r)) = grants.iter().find(|(_, r)| Right::parse(r).is_none()) {
        bail!("rights must be read, write or admin, not {r:?}");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs();
    let exp = match args.expires.as_str() {
        "never" => None,
        d => Some(now + parse_duration(d)?),
    };
    // Where `serve` finds its secret: flags and environment, then the
    // config file, then DATA/secret.
    let file = read_config(args.config.as_deref())?;
    let data = args.data.or(file.data).unwrap_or_else(default_data);
    let secret_file = args.secret_file.or(file.secret_file);
    let secret = secret_from(
        args.secret.or(file.secret),
        secret_file.as_deref(),
        &data,
        false,
    )
    .with_context(|| {
        format!(
            "no secret: the server keeps its generated one in its data directory; looked in {}{}. \
             Pass --data DIR (or SYNCLINE_DATA) to name the server's, --config FILE for its \
             config file, or --secret / --secret-file",
            data.join("secret").display(),
            if args.config.is_none() {
                " (no --config or SYNCLINE_CONFIG)"
            } else {
                ""
            }
        )
    })?;
    let claims = Claims {
        sub: args.sub,
        exp,
        iat: Some(now),
        grants: grants
            .into_iter()
            .map(|(db, rights)| GrantClaim { db, rights })
            .collect(),
    };
    println!("{}", mint(&secret, &claims).context("minting the token")?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_comes_from_a_file_and_must_be_long_enough() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("secret");
        std::fs::write(&good, "0123456789abcdef0123456789abcdef-x\n").unwrap();
        let s = secret_from(None, Some(&good), dir.path(), false).unwrap();
        assert_eq!(
            s, b"0123456789abcdef0123456789abcdef-x",
            "the newline is not part of it"
        );
        let short = dir.path().join("short");
        std::fs::write(&short, "tooshort\n").unwrap();
        let e = secret_from(None, Some(&short), dir.path(), false).unwrap_err();
        assert!(e.to_string().contains("at least 32 bytes"), "{e}");
        let e = secret_from(Some("tooshort".into()), None, dir.path(), false).unwrap_err();
        assert!(e.to_string().contains("at least 32 bytes"), "{e}");
        // Generated into the data directory when neither is given.
        let data = dir.path().join("data");
        let made = secret_from(None, None, &data, true).unwrap();
        assert!(made.len() >= MIN_SECRET_LEN);
        assert_eq!(secret_from(None, None, &data, false).unwrap(), made);
    }
}
