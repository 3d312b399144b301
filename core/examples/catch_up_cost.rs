//! What a reader of one long live stream pays (a benchmark, not a test):
//! one replica writes `N` small changes to a `ticker` document (W3's
//! `{seq, t}`), another applies each as it arrives, as a subscriber does,
//! patching it and handing automerge its waiting changes at its limit
//! (`LIMIT_CATCH_UP_STEP`). Prints the reader's CPU per change, its worst
//! single changes (the catch-ups) and its cost per 1,000 changes as the
//! document's history grows (BENCHMARKS.md §27); then, the stream stopped,
//! what the idle catch-up of the changes still waiting costs per call.
//!
//! `cargo run --release -p syncline-core --example catch_up_cost -- 20000`

use std::time::Instant;

use automerge::TextEncoding;
use serde_json::json;
use syncline_core::sync::CATCH_UP_STEP;
use syncline_core::{Database, DbName, DocId, Entry, ReplicaId};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = match std::env::args().nth(1) {
        Some(a) => a.parse()?,
        None => 20_000,
    };
    let name = DbName::new("live")?;
    let encoding = TextEncoding::UnicodeCodePoint;
    let mut writer = Database::new(name.clone(), ReplicaId([1; 16]), encoding);
    let mut reader = Database::new(name, ReplicaId([2; 16]), encoding);
    let ticker = DocId::new("ticker")?;
    writer.update(&ticker, &json!({"seq": 0, "t": 0.0}))?;
    reader.apply_entries(writer.log().entries().cloned().collect::<Vec<Entry>>());

    let mut each_us = Vec::with_capacity(n);
    let mut per_thousand_us = vec![0.0f64; n / 1000 + 1];
    for seq in 1..=n {
        let held = writer.log().entries().len();
        let t = 1.7e12 + seq as f64 * 50.3;
        writer.update(&ticker, &json!({"seq": seq, "t": t}))?;
        let new: Vec<Entry> = writer.log().entries().skip(held).cloned().collect();
        let start = Instant::now();
        reader.apply_entries(new);
        let us = start.elapsed().as_secs_f64() * 1e6;
        each_us.push(us);
        per_thousand_us[seq / 1000] += us;
    }
    if reader.get(&ticker) != writer.get(&ticker) {
        return Err("the reader does not show what the writer wrote".into());
    }

    let total_us: f64 = each_us.iter().sum();
    each_us.sort_by(|a, b| b.total_cmp(a));
    let worst = |i: usize| each_us.get(i).copied().unwrap_or(0.0);
    println!(
        "{n} changes, reader's limit {}: {:.2} µs per change, worst {:.0} / 10th {:.0} / 100th {:.0} µs",
        reader.behind_limit(),
        total_us / n as f64,
        worst(0),
        worst(10),
        worst(100)
    );
    let per_change: Vec<String> = per_thousand_us
        .iter()
        .take(n / 1000)
        .map(|us| format!("{:.0}", us / 1000.0))
        .collect();
    println!("µs per change, by thousand: {}", per_change.join(" "));

    // Then the stream stops: the idle catch-up (`Database::catch_up`, as the
    // adapters call it) hands automerge what still waits.
    let waiting = reader.changes_behind(&ticker);
    let mut calls_ms = Vec::new();
    loop {
        let start = Instant::now();
        let (more, errors) = reader.catch_up(CATCH_UP_STEP);
        calls_ms.push(start.elapsed().as_secs_f64() * 1e3);
        if !errors.is_empty() {
            return Err(format!("automerge refused a change: {errors:?}").into());
        }
        if !more {
            break;
        }
    }
    let longest = calls_ms.iter().copied().fold(0.0, f64::max);
    println!(
        "idle: {waiting} waiting, {} catch_up calls, {:.1} ms in all, longest {longest:.1} ms",
        calls_ms.len(),
        calls_ms.iter().sum::<f64>()
    );
    Ok(())
}
