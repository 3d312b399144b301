//! Soak (`abuse --soak`): what a long-running server holds while many
//! clients come and go.
//!
//! After a quiet window for the honest client's baseline, it runs at once,
//! for `--seconds` (120 by default):
//! - `--conns` holders (10,000): each connects from one of 50 loopback
//!   addresses, says Hello as a new replica, subscribes to one of `--dbs`
//!   databases (2,000), pushes one change, reads what it is sent for
//!   20–60 s, disconnects and starts again as another new replica (so
//!   tens of thousands of throwaway replicas write);
//! - a Subscribe storm: two connections that subscribe to a new database,
//!   create it with one change and unsubscribe, again and again (many
//!   databases loaded, written and left idle: the loaded-bytes budget, the
//!   open-file budget and the anonymous databases quota);
//! - a presence flood: one client publishing 16 KiB states as fast as its
//!   socket takes them to 20 subscribers.
//!
//! Every `--sample` seconds (5) it prints the server's connections, RSS
//! (peak in the window and at its end), open descriptors, CPU, the loaded
//! bytes and open logs it reports, and the honest client's ping and push
//! p99 in that window; then the summary against the budgets.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

use super::*;

/// Loopback addresses the holders connect from (the server allows 256
/// connections per address).
const ADDRESSES: usize = 50;

/// What the load did, counted as it goes.
#[derive(Default)]
struct Counts {
    lives: AtomicU64,
    acked: AtomicU64,
    created: AtomicU64,
}

/// The server settings the soak runs with (the budgets it checks).
pub(crate) const SERVER_ARGS: [&str; 6] = [
    "--max-connections",
    "11000",
    "--max-loaded-bytes",
    "67108864",
    "--max-open-files",
    "256",
];

pub(crate) fn run(env: &Env, total: Duration, conns: usize, dbs: usize, sample: Duration) {
    eprintln!("soak: quiet baseline");
    env.honest_cmd
        .send(Duration::from_secs(10))
        .expect("honest client");
    let quiet = env.honest_res.recv().expect("honest samples");
    let (q_ping, q_push) = (pct(&quiet.ping, 0.99), pct(&quiet.push, 0.99));
    let rss_quiet = rss_kib(&env.pid);
    let fds_quiet = fds(&env.pid);

    eprintln!(
        "soak: {conns} holders over {dbs} databases, a Subscribe storm and a presence flood for {} s",
        total.as_secs()
    );
    let counts = Arc::new(Counts::default());
    let tally = Tally::default();
    let ctx = Ctx {
        url: env.url.clone(),
        until: Instant::now() + total,
        tally: tally.clone(),
        token: env.token.clone(),
        conns,
        from: None,
    };
    let load = env
        .rt
        .spawn(load(ctx, env.prepared.clone(), counts.clone(), dbs));

    println!(
        "soak: {conns} holders over {dbs} databases (each a new replica per life of 20–60 s, one change each), \
         a Subscribe storm (2 conns creating databases) and a presence flood (16 KiB states to 20 subscribers), \
         {} s; server started with {}",
        total.as_secs(),
        SERVER_ARGS.join(" ")
    );
    println!();
    println!(
        "| t (s) | connections | RSS peak / end (MiB) | descriptors | server CPU (%) | load CPU (%) | \
         loaded (MiB) | open logs | lives / acked / created | ping p99 (ms) | push p99 (ms) | samples (failed) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| quiet | — | {:.0} / {:.0} | {fds_quiet} | — | — | — | — | — | {} | {} | {} ({}) |",
        mib(rss_quiet),
        mib(rss_quiet),
        ms(q_ping),
        ms(q_push),
        quiet.ping.len(),
        quiet.failed
    );
    let start = Instant::now();
    let mut rows: Vec<(f64, u64, u64)> = Vec::new(); // (t, rss peak, fds peak)
    let (mut all_ping, mut all_push, mut failed) = (Vec::new(), Vec::new(), 0);
    let after = start + total + Duration::from_secs(30);
    while Instant::now() < start + total {
        let (cpu0, gen0, t0) = (cpu_seconds(&env.pid), cpu_seconds("self"), Instant::now());
        env.honest_cmd.send(sample).expect("honest client");
        let (mut rss_peak, mut fds_peak) = (0, 0);
        let samples = loop {
            rss_peak = rss_peak.max(rss_kib(&env.pid));
            fds_peak = fds_peak.max(fds(&env.pid));
            match env.honest_res.recv_timeout(Duration::from_millis(100)) {
                Ok(s) => break s,
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < after => {}
                Err(e) => panic!("the honest client stopped: {e}"),
            }
        };
        let dt = t0.elapsed().as_secs_f64();
        let (cpu, gen_cpu) = (cpu_seconds(&env.pid) - cpu0, cpu_seconds("self") - gen0);
        let m = metrics(&env.url);
        let rss_end = rss_kib(&env.pid);
        let t = start.elapsed().as_secs_f64();
        println!(
            "| {t:.0} | {:.0} | {:.0} / {:.0} | {fds_peak} | {:.0} | {:.0} | {:.1} | {:.0} | {} / {} / {} | {} | {} | {} ({}) |",
            m.get("syncline_connections").copied().unwrap_or(0.0),
            mib(rss_peak),
            mib(rss_end),
            100.0 * cpu / dt,
            100.0 * gen_cpu / dt,
            m.get("syncline_loaded_bytes").copied().unwrap_or(0.0) / (1 << 20) as f64,
            m.get("syncline_open_files").copied().unwrap_or(0.0),
            counts.lives.load(Relaxed),
            counts.acked.load(Relaxed),
            counts.created.load(Relaxed),
            ms(pct(&samples.ping, 0.99)),
            ms(pct(&samples.push, 0.99)),
            samples.ping.len(),
            samples.failed,
        );
        rows.push((t, rss_peak, fds_peak));
        all_ping.extend(samples.ping);
        all_push.extend(samples.push);
        failed += samples.failed;
    }
    let finished = env
        .rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(60), load).await });
    if finished.is_err() {
        tally.add("load aborted 60 s after its end", 1);
    }
    let settle = settle(&env.pid);
    let (rss_after, fds_after) = (rss_kib(&env.pid), fds(&env.pid));

    let half = rows.len() / 2;
    let peak = |r: &[(f64, u64, u64)]| r.iter().map(|x| x.1).max().unwrap_or(0);
    let fds_max = rows.iter().map(|x| x.2).max().unwrap_or(0);
    let (s_ping, s_push) = (pct(&all_ping, 0.99), pct(&all_push, 0.99));
    println!();
    println!(
        "honest p99 over the whole soak: ping {} ms ({:.1}× quiet), push {} ms ({:.1}× quiet); \
         {} samples, {failed} failed",
        ms(s_ping),
        s_ping.as_secs_f64() / q_ping.as_secs_f64().max(1e-9),
        ms(s_push),
        s_push.as_secs_f64() / q_push.as_secs_f64().max(1e-9),
        all_ping.len(),
    );
    println!(
        "server RSS: {:.0} MiB quiet, peak {:.0} MiB in the first half and {:.0} MiB in the second, \
         {:.0} MiB {:.1} s after the load stopped",
        mib(rss_quiet),
        mib(peak(&rows[..half])),
        mib(peak(&rows[half..])),
        mib(rss_after),
        settle.as_secs_f64(),
    );
    println!(
        "server descriptors: {fds_quiet} quiet, at most {fds_max} under load \
         (budget: connections + --max-open-files 256 + 64), {fds_after} after"
    );
    println!("load: {}", tally.summary());
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Open descriptors of a process.
fn fds(pid: &str) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

async fn load(ctx: Ctx, p: Arc<Prepared>, counts: Arc<Counts>, dbs: usize) {
    let mut tasks = Vec::new();
    for _ in 0..20 {
        tasks.push(tokio::spawn(passive(ctx.clone(), p.presence_db.clone())));
    }
    tasks.push(tokio::spawn(presence_loop(ctx.clone(), p.clone())));
    for s in 0..2 {
        tasks.push(tokio::spawn(storm(ctx.clone(), counts.clone(), s)));
    }
    // Holders start in batches so that connecting does not crowd out
    // everything else for the first seconds.
    for i in 0..ctx.conns {
        if !ctx.live() {
            break;
        }
        tasks.push(tokio::spawn(holder(ctx.clone(), counts.clone(), i, dbs)));
        if i % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// One change by a new replica to `db`.
fn one_change(db: &DbName, replica: ReplicaId, n: u64) -> Entry {
    let mut local = Database::new(
        db.clone(),
        replica,
        automerge::TextEncoding::UnicodeCodePoint,
    );
    let doc = DocId::new(format!("r{}", n % 100)).expect("doc id");
    local
        .update(&doc, &json!({ "n": n }))
        .expect("update")
        .expect("a change")
}

/// Push `entry` and wait for its Ack (or a refusal, tallied).
async fn push_one(ws: &mut Ws, ctx: &Ctx, db: &DbName, entry: Entry) -> bool {
    let replica = entry.dot.replica;
    if !send(ws, &push_msg(db, vec![entry])).await {
        return false;
    }
    let acked = wait_for(ws, ctx.left(Duration::from_secs(30)), |m| match m {
        Message::Ack(a) if a.vv.get(&replica) >= 1 => Some(Ok(())),
        m => refusal(m),
    })
    .await;
    match acked {
        Ok(_) => true,
        Err(e) => {
            ctx.add(&format!("push: {e}"));
            false
        }
    }
}

/// A client that lives 20–60 s as a new replica, writes once, reads what
/// it is sent, and comes back as another.
async fn holder(ctx: Ctx, counts: Arc<Counts>, i: usize, dbs: usize) {
    let a = i % ADDRESSES;
    let from = IpAddr::V4(Ipv4Addr::new(127, 1, (a / 250) as u8, (a % 250 + 1) as u8));
    let db = DbName::new(format!("open-soak-{}", i % dbs)).expect("db name");
    let none = VersionVector::new();
    for life in 0..1_000u64 {
        if !ctx.live() {
            return;
        }
        let me = Identity::generate();
        let replica = me.replica();
        let (mut ws, _) = match greet(&ctx.url, Some(from), &me, "", Some((&db, &none))).await {
            Ok(x) => x,
            Err(e) => {
                ctx.add(&format!("holder: {e}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        counts.lives.fetch_add(1, Relaxed);
        if push_one(&mut ws, &ctx, &db, one_change(&db, replica, life)).await {
            counts.acked.fetch_add(1, Relaxed);
        }
        // A lifetime spread over 20–60 s, different per holder and life.
        let spread = (i as u64 * 7_919 + life * 104_729) % 40_000;
        let end = Instant::now() + Duration::from_millis(20_000 + spread);
        while Instant::now() < end && ctx.live() {
            let wait = end
                .saturating_duration_since(Instant::now())
                .min(ctx.left(Duration::from_secs(60)));
            match recv(&mut ws, wait, false).await {
                Got::Closed => {
                    ctx.add("holder closed by the server");
                    break;
                }
                Got::Timeout | Got::Raw(_) | Got::Msg(..) => {}
            }
        }
        let _ = ws.close(None).await;
    }
}

/// Subscribe to a new database, create it with one change, unsubscribe;
/// again and again on one connection (reconnecting if closed).
async fn storm(ctx: Ctx, counts: Arc<Counts>, s: usize) {
    let from = IpAddr::V4(Ipv4Addr::new(127, 2, 0, 1 + s as u8));
    let mut k = 0u64;
    while ctx.live() && k < 1_000_000 {
        let me = Identity::generate();
        let replica = me.replica();
        let mut ws = match greet(&ctx.url, Some(from), &me, "", None).await {
            Ok((ws, _)) => ws,
            Err(e) => {
                ctx.add(&format!("storm: {e}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        while ctx.live() && k < 1_000_000 {
            k += 1;
            let db = DbName::new(format!("open-storm-{s}-{k}")).expect("db name");
            let sub = Message::Subscribe(Box::new(Subscribe {
                horizon: None,
                db: db.clone(),
                since: VersionVector::new(),
                req: k as u32,
            }));
            if !send(&mut ws, &sub).await {
                break;
            }
            let replied = wait_for(&mut ws, ctx.left(Duration::from_secs(30)), |m| match m {
                Message::Delta(d) if d.last => Some(Ok(())),
                m => refusal(m),
            })
            .await;
            if let Err(e) = replied {
                ctx.add(&format!("storm subscribe: {e}"));
                break;
            }
            ctx.add("storm subscribes");
            if push_one(&mut ws, &ctx, &db, one_change(&db, replica, k)).await {
                counts.created.fetch_add(1, Relaxed);
            }
            if !send(&mut ws, &Message::Unsubscribe { db }).await {
                break;
            }
        }
    }
}
