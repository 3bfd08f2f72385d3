//! The outage breaker: when most attempts of a queue fail with retryable errors across
//! many messages (an LLM provider answering 503, a tool that is down), the failure is
//! the world's, not the messages'. Charging each message an attempt would walk the
//! whole backlog through its retry tiers into the DLQ; instead the runner stops taking
//! messages (open), sends one message at a growing interval to see whether the outage
//! is over (half-open), and resumes on its first success (closed).
//!
//! Failures that trip the breaker, and those of deliveries still running when it
//! opens, are not counted against their messages: they go back to a retry lane with
//! the failure in their history marked uncounted. Deliveries leased ahead and not yet
//! started are released. A probe that fails is spared the same way, and waits in a
//! retry lane, so the next probe is another message: one message that fails on its own
//! cannot keep the breaker open.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use redrive_core::{FailureKind, MessageId, Outcome};
use tokio::time::Instant;

/// When the breaker opens, and how it probes.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Failing messages (distinct) within the window needed to open.
    pub min_failures: usize,
    /// Share of the attempts in the window that failed, needed to open (0 to 1).
    pub failure_ratio: f64,
    /// How far back failures count.
    pub window: Duration,
    /// The wait before the first probe; it doubles after each failed probe.
    pub first_probe: Duration,
    /// The longest wait between probes.
    pub max_probe: Duration,
}

impl Default for BreakerConfig {
    /// Fits a provider outage: 20 failing messages and 80% of attempts failing within
    /// 30 s; probes after 5 s, then 10, 20, … up to every 2 minutes.
    fn default() -> Self {
        Self {
            min_failures: 20,
            failure_ratio: 0.8,
            window: Duration::from_secs(30),
            first_probe: Duration::from_secs(5),
            max_probe: Duration::from_secs(120),
        }
    }
}

/// Whether the breaker is open, for observers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Messages flow.
    Closed,
    /// No messages are taken but a probe now and then.
    Open,
}

/// What the fetch loop may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Fetch as usual.
    Flow,
    /// Fetch one message: the probe.
    Probe,
    /// Fetch nothing; look again at this time (or sooner, when woken).
    Shut(Instant),
}

/// What to do with a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Charge {
    /// Count it against the message, as always.
    Count,
    /// The breaker is open: schedule the message again without counting the attempt.
    Spare,
}

/// The breaker changed state (for observers and the log).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Change {
    Opened { failures: usize, ratio: f64 },
    Closed,
}

/// Recent failures kept to judge the window; enough to see `min_failures` distinct
/// messages among them unless a few messages fail over and over.
const KEPT: usize = 1024;

pub(crate) struct Breaker {
    config: Option<BreakerConfig>,
    /// A probe with no outcome after this long (it was isolated, or lost) is given up.
    probe_lost: Duration,
    /// Attempts that ended (any outcome) since the run started.
    attempts: AtomicU64,
    /// Anything but closed: the fast path reads this alone.
    open: AtomicBool,
    state: Mutex<State>,
}

enum State {
    Closed {
        failures: VecDeque<Failed>,
    },
    Open {
        probe_at: Instant,
        interval: Duration,
    },
    /// A probe is fetched or running.
    Probing {
        since: Instant,
        interval: Duration,
        /// The probe's message, once a worker took it.
        probe: Option<MessageId>,
    },
}

struct Failed {
    at: Instant,
    id: MessageId,
    /// The attempts counter before this one: the window's attempts are counted from it.
    attempts_before: u64,
}

impl Breaker {
    /// `probe_lost`: how long a probe may go without an outcome (the handler's timeout
    /// and a lease, say).
    pub(crate) fn new(config: Option<BreakerConfig>, probe_lost: Duration) -> Self {
        Self {
            config,
            probe_lost,
            attempts: AtomicU64::new(0),
            open: AtomicBool::new(false),
            state: Mutex::new(State::Closed {
                failures: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Never held across a call that can panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the fetch loop may do at `now`.
    pub(crate) fn gate(&self, now: Instant) -> Gate {
        if !self.open.load(Ordering::Acquire) {
            return Gate::Flow;
        }
        let mut st = self.lock();
        match *st {
            State::Closed { .. } => Gate::Flow,
            State::Open { probe_at, .. } if now >= probe_at => Gate::Probe,
            State::Open { probe_at, .. } => Gate::Shut(probe_at),
            State::Probing {
                since, interval, ..
            } if now >= since + self.probe_lost => {
                *st = State::Open {
                    probe_at: now,
                    interval,
                };
                Gate::Probe
            }
            State::Probing { since, .. } => Gate::Shut(since + self.probe_lost),
        }
    }

    /// The fetch loop sent the probe's fetch.
    pub(crate) fn probe_sent(&self, now: Instant) {
        let mut st = self.lock();
        if let State::Open { interval, .. } = *st {
            *st = State::Probing {
                since: now,
                interval,
                probe: None,
            };
        }
    }

    /// The probe's fetch found nothing (or failed): try again after the same interval.
    pub(crate) fn probe_missed(&self, now: Instant) {
        let mut st = self.lock();
        if let State::Probing {
            interval,
            probe: None,
            ..
        } = *st
        {
            *st = State::Open {
                probe_at: now + interval,
                interval,
            };
        }
    }

    /// Whether a worker may run this delivery: always while closed; while open, only
    /// the probe (the first delivery taken once its fetch went out).
    pub(crate) fn admit(&self, id: MessageId) -> bool {
        if !self.open.load(Ordering::Acquire) {
            return true;
        }
        let mut st = self.lock();
        match &mut *st {
            State::Closed { .. } => true,
            State::Probing {
                probe: probe @ None,
                ..
            } => {
                *probe = Some(id);
                true
            }
            State::Open { .. } | State::Probing { .. } => false,
        }
    }

    /// Records how an attempt ended; says whether a failure is counted, and whether
    /// this changed the breaker's state.
    pub(crate) fn record(
        &self,
        id: MessageId,
        outcome: &Outcome,
        now: Instant,
    ) -> (Charge, Option<Change>) {
        let Some(config) = &self.config else {
            return (Charge::Count, None);
        };
        let attempts = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        let outage = matches!(
            outcome,
            Outcome::Failed { failure, .. }
                if matches!(failure.kind, FailureKind::Retry | FailureKind::Timeout)
        );
        if !outage && !self.open.load(Ordering::Acquire) {
            return (Charge::Count, None);
        }
        let mut st = self.lock();
        match &mut *st {
            State::Closed { failures } => {
                if !outage {
                    return (Charge::Count, None);
                }
                failures.push_back(Failed {
                    at: now,
                    id,
                    attempts_before: attempts - 1,
                });
                let since = now.checked_sub(config.window);
                while failures
                    .front()
                    .is_some_and(|f| since.is_some_and(|s| f.at < s))
                    || failures.len() > KEPT
                {
                    failures.pop_front();
                }
                if failures.len() < config.min_failures {
                    return (Charge::Count, None);
                }
                let first = failures.front().map_or(0, |f| f.attempts_before);
                let ratio = failures.len() as f64 / (attempts - first).max(1) as f64;
                if ratio < config.failure_ratio {
                    return (Charge::Count, None);
                }
                let distinct: HashSet<MessageId> = failures.iter().map(|f| f.id).collect();
                if distinct.len() < config.min_failures {
                    return (Charge::Count, None);
                }
                let failures = failures.len();
                *st = State::Open {
                    probe_at: now + config.first_probe,
                    interval: config.first_probe,
                };
                self.open.store(true, Ordering::Release);
                (Charge::Spare, Some(Change::Opened { failures, ratio }))
            }
            State::Probing {
                interval,
                probe: Some(probe),
                ..
            } if *probe == id => {
                let interval = *interval;
                match outcome {
                    Outcome::Ok => {
                        *st = State::Closed {
                            failures: VecDeque::new(),
                        };
                        self.open.store(false, Ordering::Release);
                        (Charge::Count, Some(Change::Closed))
                    }
                    _ if outage => {
                        let interval = (interval * 2).min(config.max_probe);
                        *st = State::Open {
                            probe_at: now + interval,
                            interval,
                        };
                        (Charge::Spare, None)
                    }
                    // A failure of the message's own (poison, a panic): it says nothing
                    // about the outage; probe with another message at once.
                    _ => {
                        *st = State::Open {
                            probe_at: now,
                            interval,
                        };
                        (Charge::Count, None)
                    }
                }
            }
            // Open, or another delivery that was running when the breaker opened.
            State::Open { .. } | State::Probing { .. } => {
                (if outage { Charge::Spare } else { Charge::Count }, None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use redrive_core::{Failure, FailureKind, Outcome};

    use super::*;

    fn failed(kind: FailureKind) -> Outcome {
        Outcome::Failed {
            failure: Failure::new(kind, "http_503", "service unavailable", 0),
            retry_after: None,
        }
    }

    fn config() -> BreakerConfig {
        BreakerConfig {
            min_failures: 5,
            failure_ratio: 0.8,
            window: Duration::from_secs(30),
            first_probe: Duration::from_secs(5),
            max_probe: Duration::from_secs(12),
        }
    }

    #[test]
    fn opens_on_many_messages_failing_and_probes_at_a_growing_interval() {
        let b = Breaker::new(Some(config()), Duration::from_secs(90));
        let t0 = Instant::now();
        // One good attempt, then retryable failures of distinct messages.
        assert_eq!(
            b.record(MessageId::new(), &Outcome::Ok, t0).0,
            Charge::Count
        );
        for _ in 0..4 {
            let r = b.record(MessageId::new(), &failed(FailureKind::Retry), t0);
            assert_eq!(r, (Charge::Count, None));
        }
        // The fifth failing message: 5 of 6 attempts failed (83%).
        let (charge, change) = b.record(MessageId::new(), &failed(FailureKind::Timeout), t0);
        assert_eq!(charge, Charge::Spare);
        assert!(
            matches!(change, Some(Change::Opened { failures: 5, .. })),
            "{change:?}"
        );
        // Open: nothing flows, running deliveries' failures are spared, not the poison.
        assert_eq!(b.gate(t0), Gate::Shut(t0 + Duration::from_secs(5)));
        assert!(!b.admit(MessageId::new()));
        assert_eq!(
            b.record(MessageId::new(), &failed(FailureKind::Retry), t0)
                .0,
            Charge::Spare
        );
        assert_eq!(
            b.record(MessageId::new(), &failed(FailureKind::Poison), t0)
                .0,
            Charge::Count
        );

        // A failed probe doubles the interval (up to the maximum) and is spared.
        let mut at = t0 + Duration::from_secs(5);
        for wait in [10, 12, 12] {
            assert_eq!(b.gate(at), Gate::Probe);
            b.probe_sent(at);
            assert_eq!(b.gate(at), Gate::Shut(at + Duration::from_secs(90)));
            let probe = MessageId::new();
            assert!(b.admit(probe));
            assert!(!b.admit(MessageId::new()), "one probe at a time");
            assert_eq!(
                b.record(probe, &failed(FailureKind::Retry), at),
                (Charge::Spare, None)
            );
            assert_eq!(b.gate(at), Gate::Shut(at + Duration::from_secs(wait)));
            at += Duration::from_secs(wait);
        }
        // A probe whose fetch found nothing waits the same interval again.
        b.probe_sent(at);
        b.probe_missed(at);
        assert_eq!(b.gate(at), Gate::Shut(at + Duration::from_secs(12)));
        at += Duration::from_secs(12);
        // A probe that never reports (isolated, say) is given up: another goes out.
        assert_eq!(b.gate(at), Gate::Probe);
        b.probe_sent(at);
        assert!(b.admit(MessageId::new()));
        at += Duration::from_secs(90);
        assert_eq!(b.gate(at), Gate::Probe);
        // A successful probe closes it, with a fresh window.
        b.probe_sent(at);
        let probe = MessageId::new();
        assert!(b.admit(probe));
        assert_eq!(
            b.record(probe, &Outcome::Ok, at),
            (Charge::Count, Some(Change::Closed))
        );
        assert_eq!(b.gate(at), Gate::Flow);
        assert!(b.admit(MessageId::new()));
        assert_eq!(
            b.record(MessageId::new(), &failed(FailureKind::Retry), at),
            (Charge::Count, None)
        );
    }

    #[test]
    fn stays_closed_below_the_ratio_for_one_message_and_for_old_failures() {
        let b = Breaker::new(Some(config()), Duration::from_secs(90));
        let t0 = Instant::now();
        // Half the attempts fail: under 80%.
        for _ in 0..10 {
            b.record(MessageId::new(), &Outcome::Ok, t0);
            assert_eq!(
                b.record(MessageId::new(), &failed(FailureKind::Retry), t0)
                    .0,
                Charge::Count
            );
        }
        let b = Breaker::new(Some(config()), Duration::from_secs(90));
        // One message failing over and over is not an outage.
        let same = MessageId::new();
        for _ in 0..10 {
            assert_eq!(
                b.record(same, &failed(FailureKind::Retry), t0).0,
                Charge::Count
            );
        }
        // Failures spread over more than the window never count together.
        let b = Breaker::new(Some(config()), Duration::from_secs(90));
        for i in 0..10 {
            let at = t0 + Duration::from_secs(10 * i);
            assert_eq!(
                b.record(MessageId::new(), &failed(FailureKind::Retry), at)
                    .0,
                Charge::Count
            );
        }
        // Poison and panics are the messages' own.
        let b = Breaker::new(Some(config()), Duration::from_secs(90));
        for _ in 0..10 {
            b.record(MessageId::new(), &failed(FailureKind::Poison), t0);
            b.record(MessageId::new(), &failed(FailureKind::Panic), t0);
        }
        assert_eq!(b.gate(t0), Gate::Flow);
        // Turned off, nothing ever opens.
        let off = Breaker::new(None, Duration::from_secs(90));
        for _ in 0..100 {
            assert_eq!(
                off.record(MessageId::new(), &failed(FailureKind::Retry), t0)
                    .0,
                Charge::Count
            );
        }
        assert_eq!(off.gate(t0), Gate::Flow);
    }

    #[test]
    fn a_probe_failing_on_its_own_is_counted_and_another_probes_at_once() {
        let b = Breaker::new(Some(config()), Duration::from_secs(90));
        let t0 = Instant::now();
        for _ in 0..5 {
            b.record(MessageId::new(), &failed(FailureKind::Retry), t0);
        }
        let at = t0 + Duration::from_secs(5);
        assert_eq!(b.gate(at), Gate::Probe);
        b.probe_sent(at);
        let probe = MessageId::new();
        assert!(b.admit(probe));
        assert_eq!(
            b.record(probe, &failed(FailureKind::Poison), at),
            (Charge::Count, None)
        );
        assert_eq!(b.gate(at), Gate::Probe);
    }
}
