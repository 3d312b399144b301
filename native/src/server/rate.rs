//! A connection's read rate: a token bucket its reader pays into for every
//! frame before it reads the next. A peer sending faster than the rate
//! waits in its own socket (TCP pushes back on it); the server decodes
//! and handles no more of its frames than the rate allows, so a flood of
//! presence states or of re-sent pushes costs everyone else little.

use std::time::{Duration, Instant};

/// Every frame is charged at least this many bytes: a flood of tiny
/// frames costs the server per frame, not per byte.
pub const MIN_CHARGE: usize = 512;

/// Bytes a second, in bursts of up to `burst` bytes.
#[derive(Debug)]
pub struct ReadRate {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl ReadRate {
    /// A full bucket. `burst` is raised to at least one second's worth.
    pub fn new(per_sec: u64, burst: u64, now: Instant) -> Self {
        let per_sec = per_sec.max(1) as f64;
        let burst = (burst as f64).max(per_sec);
        ReadRate {
            per_sec,
            burst,
            tokens: burst,
            at: now,
        }
    }

    /// Pay for a frame of `len` bytes read at `now`; the wait before the
    /// next read (zero within the rate).
    pub fn spend(&mut self, len: usize, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.tokens -= len.max(MIN_CHARGE) as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_sec)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn within_the_burst_nothing_waits() {
        let t = Instant::now();
        let mut r = ReadRate::new(MIB, 4 * MIB, t);
        for _ in 0..4 {
            assert_eq!(r.spend(MIB as usize, t), Duration::ZERO);
        }
        // The fifth MiB, at once, waits a second.
        assert_eq!(r.spend(MIB as usize, t), Duration::from_secs(1));
    }

    #[test]
    fn a_flood_is_held_to_the_rate_and_tiny_frames_pay_the_minimum() {
        let t = Instant::now();
        let mut r = ReadRate::new(MIB, MIB, t);
        let mut now = t;
        // 16 KiB frames as fast as the rate lets them in, for 10 s.
        let mut read = 0u64;
        while now < t + Duration::from_secs(10) {
            now += r.spend(16 << 10, now);
            read += 16 << 10;
        }
        // One second's burst plus ten seconds' worth, and no more.
        assert!(read <= 11 * MIB + (16 << 10), "{read}");
        assert!(read >= 10 * MIB, "{read}");
        // A 1-byte frame costs MIN_CHARGE.
        let mut r = ReadRate::new(MIB, MIB, t);
        let frames = (0..).take_while(|_| r.spend(1, t).is_zero()).count();
        assert_eq!(frames, MIB as usize / MIN_CHARGE);
    }

    #[test]
    fn an_idle_connection_refills_up_to_the_burst_only() {
        let t = Instant::now();
        let mut r = ReadRate::new(MIB, 2 * MIB, t);
        assert_eq!(r.spend(2 * MIB as usize, t), Duration::ZERO);
        let later = t + Duration::from_secs(3600);
        assert_eq!(r.spend(2 * MIB as usize, later), Duration::ZERO);
        assert_eq!(r.spend(MIB as usize, later), Duration::from_secs(1));
    }
}
