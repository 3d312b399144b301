//! The server driver of the `server` fuzz target (`tests/server_driver/`),
//! run on stable: every kept crasher in `tests/fuzz-crashers/server/`, then
//! seeded pseudo-random inputs.
//!
//! `SYNCLINE_SERVER_FUZZ_CASES=<n>` sets how many random inputs run
//! (default 3,000); `SYNCLINE_SERVER_FUZZ_SEED=<n>` runs only that one. A
//! failing input is written under the target directory, ready to be kept
//! as a regression file.

mod server_driver;

use std::path::Path;

/// xorshift64*: small, seeded, reproducible (as in `sim.rs`).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn input(seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let len = 64 + (rng.next() % (2048 - 64 + 1)) as usize;
    (0..len).map(|_| (rng.next() >> 24) as u8).collect()
}

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap())
}

#[test]
fn kept_crashers_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-crashers/server");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_none_or(|x| x != "md"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no crashers in {}", dir.display());
    for path in files {
        let bytes = std::fs::read(&path).unwrap();
        eprintln!("{}", path.display());
        server_driver::run(&bytes);
    }
}

#[test]
fn seeded_random_inputs() {
    let seeds: Vec<u64> = match env("SYNCLINE_SERVER_FUZZ_SEED") {
        Some(seed) => vec![seed],
        None => (0..env("SYNCLINE_SERVER_FUZZ_CASES").unwrap_or(3_000)).collect(),
    };
    for seed in seeds {
        let data = input(seed);
        if std::panic::catch_unwind(|| server_driver::run(&data)).is_err() {
            let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("server-fuzz-{seed}"));
            std::fs::write(&path, &data).unwrap();
            panic!(
                "seed {seed} failed (SYNCLINE_SERVER_FUZZ_SEED={seed} replays it); its input is {}: \
                 name it for what it does and copy it into core/tests/fuzz-crashers/server/",
                path.display()
            );
        }
    }
}
