//! Expensive work on a few threads of its own, at a lower CPU priority:
//! decoding large frames, checking large pushes, encoding replies to
//! Subscribe. Any client can ask for such work (a 16 MiB frame, a cold sync
//! of a large database), and on a small machine it would otherwise take the
//! cores from the hub and the connection tasks, so an honest client's ping
//! waited behind someone else's cold sync. At nice 10 the scheduler runs
//! the hub and the connections first whenever they have work; the heavy
//! threads get what is left (all of it, on a quiet server). Background
//! work nobody waits on (building views, planning compactions) has a pool
//! of its own, lower still, so it never holds up a client's heavy work.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, mpsc};

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of threads taking jobs in order.
#[derive(Clone)]
pub struct Heavy {
    jobs: mpsc::Sender<Job>,
}

/// How much lower the heavy threads' priority is (Linux `nice`).
pub const NICE: i32 = 10;
/// And the background threads'.
pub const BACKGROUND_NICE: i32 = 15;

impl Heavy {
    /// Start `threads` threads (at least one) named `name-N`, at `nice`.
    pub fn start(name: &str, threads: usize, nice: i32) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    lower_priority(nice);
                    loop {
                        // The lock is held only while taking a job.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return, // the server is gone
                        }
                    }
                })?;
        }
        Ok(Heavy { jobs: tx })
    }

    /// Run `f` on a heavy thread and wait for it. `None` if it panicked (the
    /// thread lives on) or the pool is gone.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(catch_unwind(AssertUnwindSafe(f)).ok());
        });
        self.jobs.send(job).ok()?;
        rx.await.ok().flatten()
    }
}

/// The server's two pools.
pub struct Pools {
    /// Work a client waits on, one thread fewer than the cores, at [`NICE`].
    pub heavy: Heavy,
    /// Work nobody waits on, one thread at [`BACKGROUND_NICE`].
    pub background: Heavy,
}

impl Pools {
    /// Start both.
    pub fn start(heavy_threads: usize) -> std::io::Result<Self> {
        Ok(Pools {
            heavy: Heavy::start("syncline-heavy", heavy_threads, NICE)?,
            background: Heavy::start("syncline-background", 1, BACKGROUND_NICE)?,
        })
    }
}

#[cfg(target_os = "linux")]
fn lower_priority(nice: i32) {
    // On Linux `nice` is per thread: PRIO_PROCESS with 0 is this thread.
    // SAFETY: setpriority reads no memory of ours; failure leaves the
    // priority as it was, which is only slower under load.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if r != 0 {
        tracing::debug!(
            "could not lower a worker thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority(_nice: i32) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_survives_a_panic_and_lowers_its_priority() {
        let heavy = Heavy::start("test-heavy", 1, NICE).unwrap();
        assert_eq!(heavy.run(|| 2 + 2).await, Some(4));
        assert_eq!(heavy.run(|| -> u8 { panic!("boom") }).await, None);
        // The one thread is still there.
        assert_eq!(heavy.run(|| "after").await, Some("after"));
        #[cfg(target_os = "linux")]
        {
            let nice = heavy
                .run(|| unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) })
                .await;
            assert!(nice.is_some_and(|n| n >= NICE), "{nice:?}");
        }
    }
}
