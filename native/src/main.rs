//! `syncline`: the self-hosted sync server, the native client and the CLI.
//!
//! Today this binary only reports its version: the server (`syncline serve`),
//! the client commands and the data-dir tools are the next piece of work
//! (see `ARCHITECTURE.md`, "Status"). The protocol and sync logic they will
//! drive already live in `syncline-core`.

use syncline_core::protocol::PROTOCOL_VERSION;

fn main() -> anyhow::Result<()> {
    let first = std::env::args().nth(1);
    match first.as_deref() {
        Some("--version" | "-V") => {
            println!(
                "syncline {} (protocol {PROTOCOL_VERSION})",
                env!("CARGO_PKG_VERSION")
            );
            Ok(())
        }
        other => {
            eprintln!(
                "syncline {}: `{}` is not available yet; the server, client and CLI \
                 are still being built (only --version works today)",
                env!("CARGO_PKG_VERSION"),
                other.unwrap_or("")
            );
            std::process::exit(2)
        }
    }
}
