//! The process-wide gate that lets a crash suspect run alone.
//!
//! When a consumer process dies, every delivery it had in flight comes back unfinished,
//! and any of them may be the one that killed it. Charging each an attempt sends innocent
//! messages towards the DLQ for a crash they did not cause. Instead, such a delivery is
//! moved to its queue's isolation lane uncounted, and isolation-lane deliveries run one
//! at a time with no other handler of the process running: if the process dies then,
//! the message that was running is the only one that can have done it, and its next
//! delivery counts the crash.
//!
//! The gate is process-wide, not per runner, because a process may run several runners
//! (one per queue) and one crash stops them all. Handlers of ordinary deliveries do not
//! take a lock: a runner's line already counts its busy deliveries under its own mutex,
//! so the gate only asks every registered line whether it is busy, and a line refuses to
//! start a delivery while the gate wants the process to itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex, PoisonError, Weak};

use tokio::sync::Notify;

/// A runner's line of deliveries, as the gate sees it.
pub(crate) trait Quiet: Send + Sync {
    /// Deliveries taken by a worker and not yet finished.
    fn busy(&self) -> usize;
    /// The gate is open again: wake the workers waiting for it.
    fn resume(&self);
}

/// See the module documentation.
pub(crate) struct Gate {
    /// One alone run at a time in the process.
    alone: tokio::sync::Mutex<()>,
    /// An alone run holds or waits for the gate: lines start nothing new.
    wanted: AtomicBool,
    /// A line became idle while the gate was wanted.
    quiet: Notify,
    lines: Mutex<Vec<Weak<dyn Quiet>>>,
}

/// The process's gate.
pub(crate) static GATE: LazyLock<Gate> = LazyLock::new(|| Gate {
    alone: tokio::sync::Mutex::new(()),
    wanted: AtomicBool::new(false),
    quiet: Notify::new(),
    lines: Mutex::new(Vec::new()),
});

/// Held while a delivery runs alone; dropping it reopens the gate.
pub(crate) struct Alone<'a> {
    gate: &'a Gate,
    _one: tokio::sync::MutexGuard<'a, ()>,
}

impl Drop for Alone<'_> {
    fn drop(&mut self) {
        self.gate.wanted.store(false, Ordering::SeqCst);
        for line in self.gate.live_lines() {
            line.resume();
        }
    }
}

impl Gate {
    /// Whether an alone run holds or waits for the gate. A line reads it under its own
    /// lock before starting a delivery, and [`Self::alone`] reads each line's busy count
    /// under that same lock after setting it, so no start can slip past unseen.
    pub(crate) fn wanted(&self) -> bool {
        self.wanted.load(Ordering::SeqCst)
    }

    /// Makes a runner's line known to the gate for as long as it lives.
    pub(crate) fn register(&self, line: Weak<dyn Quiet>) {
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        lines.retain(|l| l.strong_count() > 0);
        lines.push(line);
    }

    /// A line has nothing busy any more: an alone run waiting for that looks again.
    pub(crate) fn went_quiet(&self) {
        if self.wanted() {
            self.quiet.notify_waiters();
        }
    }

    fn live_lines(&self) -> Vec<std::sync::Arc<dyn Quiet>> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Waits until no handler of the process runs and keeps it so until the returned
    /// guard is dropped.
    pub(crate) async fn alone(&self) -> Alone<'_> {
        let one = self.alone.lock().await;
        self.wanted.store(true, Ordering::SeqCst);
        let alone = Alone {
            gate: self,
            _one: one,
        };
        loop {
            let quiet = self.quiet.notified();
            tokio::pin!(quiet);
            quiet.as_mut().enable();
            if self.live_lines().iter().all(|l| l.busy() == 0) {
                return alone;
            }
            quiet.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    struct Counter(AtomicUsize, Notify);

    impl Quiet for Counter {
        fn busy(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
        fn resume(&self) {
            self.1.notify_waiters();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_alone_run_waits_for_busy_lines_and_holds_the_gate_until_dropped() {
        let gate = Gate {
            alone: tokio::sync::Mutex::new(()),
            wanted: AtomicBool::new(false),
            quiet: Notify::new(),
            lines: Mutex::new(Vec::new()),
        };
        let gate = Arc::new(gate);
        let line = Arc::new(Counter(AtomicUsize::new(1), Notify::new()));
        gate.register(Arc::downgrade(&line) as Weak<dyn Quiet>);
        let waiting = {
            let gate = Arc::clone(&gate);
            tokio::spawn(async move {
                let _alone = gate.alone().await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(gate.wanted(), "the gate is wanted while a line is busy");
        assert!(!waiting.is_finished(), "not alone while the line is busy");
        line.0.store(0, Ordering::SeqCst);
        gate.went_quiet();
        waiting.await.expect("the alone run ends");
        assert!(!gate.wanted(), "dropping the guard reopens the gate");
    }
}
