//! The retry policy: which tier a failed message moves to, after what delay, and when it
//! is dead.
//!
//! Policy is kept apart from classification (`outcome.rs` decides *what* a failure is;
//! this module decides *where it goes*), so either can change without the other.

use std::time::Duration;

use crate::duration::{DurationError, format_duration, parse_duration};

/// The default tiers (docs/design.md, "Lanes and tiers").
pub const DEFAULT_TIERS: &str = "5s,30s,5m";

/// The longest delay a handler may ask for with `RetryAfter`; longer requests are capped.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(12 * 3600);

/// Deliveries a message gets with `tiers` retry tiers: one per tier plus the first.
pub(crate) fn attempts_for(tiers: usize) -> u32 {
    u32::try_from(tiers)
        .unwrap_or(u32::MAX - 1)
        .saturating_add(1)
}

/// Why a policy could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A tier's delay did not parse.
    #[error("invalid tier {index} in {list:?}: {source}")]
    Tier {
        /// The whole list as given.
        list: String,
        /// 1-based position of the bad tier.
        index: usize,
        /// What was wrong.
        source: DurationError,
    },
    /// No tiers were given.
    #[error("no retry tiers in {0:?}: give a comma-separated list such as 5s,30s,5m")]
    Empty(String),
    /// Two tiers share a name, so they would share a lane.
    #[error("tier {0} appears twice in the tier list: each tier needs a distinct delay")]
    Duplicate(String),
    /// A zero delay is not a tier.
    #[error("tier {index} in {list:?} has a zero delay: a retry tier must wait")]
    Zero {
        /// The whole list as given.
        list: String,
        /// 1-based position of the bad tier.
        index: usize,
    },
    /// A delay longer than [`MAX_TIER`].
    #[error(
        "tier {index} in {list:?} waits longer than 7d, the longest tier: a message parked \
         longer is as good as lost (use the DLQ and replay it instead)"
    )]
    TooLong {
        /// The whole list as given.
        list: String,
        /// 1-based position of the bad tier.
        index: usize,
    },
    /// Jitter out of range.
    #[error("jitter {0} is out of range: use a fraction from 0 (off) to 1")]
    Jitter(String),
}

/// The longest a retry tier may wait: 7 days.
pub const MAX_TIER: Duration = Duration::from_secs(7 * 86_400);

/// One retry tier: a lane whose messages wait `delay` before they are handed out again.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tier {
    name: String,
    delay: Duration,
}

impl Tier {
    /// A tier with the given delay; its name is the delay's canonical form (`5s`).
    #[must_use]
    pub fn new(delay: Duration) -> Self {
        Self {
            name: format_duration(delay),
            delay,
        }
    }

    /// The tier's name, e.g. `5s`; the lane is `<queue>.retry.<name>`.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How long a message waits in this tier.
    #[must_use]
    pub fn delay(&self) -> Duration {
        self.delay
    }
}

/// Where a failed delivery goes next.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Into a retry tier, due after `delay`.
    Retry {
        /// The tier (its lane).
        tier: Tier,
        /// The delay actually applied, jitter or `RetryAfter` included.
        delay: Duration,
    },
    /// Into the dead-letter queue.
    Dead,
}

/// Tiers, jitter and the attempt limit that follows from them.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    tiers: Vec<Tier>,
    jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::parse(DEFAULT_TIERS).unwrap_or_else(|_| Self {
            tiers: Vec::new(),
            jitter: 0.0,
        })
    }
}

impl RetryPolicy {
    /// Parses a tier list such as `5s,30s,5m`; jitter starts off.
    ///
    /// # Errors
    ///
    /// Returns a [`PolicyError`] naming the offending tier when a delay does not parse,
    /// is zero, appears twice, or the list is empty.
    pub fn parse(list: &str) -> Result<Self, PolicyError> {
        let mut tiers: Vec<Tier> = Vec::new();
        for (i, part) in list.split(',').map(str::trim).enumerate() {
            if part.is_empty() && list.trim().is_empty() {
                return Err(PolicyError::Empty(list.to_owned()));
            }
            let delay = parse_duration(part).map_err(|source| PolicyError::Tier {
                list: list.to_owned(),
                index: i + 1,
                source,
            })?;
            if delay.is_zero() {
                return Err(PolicyError::Zero {
                    list: list.to_owned(),
                    index: i + 1,
                });
            }
            if delay > MAX_TIER {
                return Err(PolicyError::TooLong {
                    list: list.to_owned(),
                    index: i + 1,
                });
            }
            let tier = Tier::new(delay);
            if tiers.iter().any(|t| t.name == tier.name) {
                return Err(PolicyError::Duplicate(tier.name));
            }
            tiers.push(tier);
        }
        Ok(Self { tiers, jitter: 0.0 })
    }

    /// Adds up to `fraction` of each tier's delay at random (0.1 = up to +10%), so that
    /// messages that failed together do not all come back in the same instant. Jitter
    /// only lengthens a delay: a message is never handed out before its tier's delay.
    ///
    /// # Errors
    ///
    /// Returns [`PolicyError::Jitter`] when `fraction` is not within 0..=1.
    pub fn with_jitter(mut self, fraction: f64) -> Result<Self, PolicyError> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(PolicyError::Jitter(fraction.to_string()));
        }
        self.jitter = fraction;
        Ok(self)
    }

    /// The tiers, in order.
    #[must_use]
    pub fn tiers(&self) -> &[Tier] {
        &self.tiers
    }

    /// The jitter fraction.
    #[must_use]
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// Deliveries a message gets before it is dead: one per tier plus the first.
    #[must_use]
    pub fn max_attempts(&self) -> u32 {
        attempts_for(self.tiers.len())
    }

    /// Decides where a message goes after its `failed`-th failed attempt (1-based).
    ///
    /// `poison` sends it to the DLQ at once. `retry_after` replaces the tier's delay
    /// (capped at 12 hours, `MAX_RETRY_AFTER`) when the handler asked for a specific wait.
    #[must_use]
    pub fn decide(&self, failed: u32, poison: bool, retry_after: Option<Duration>) -> Step {
        if poison || failed >= self.max_attempts() || failed == 0 {
            return Step::Dead;
        }
        let tier = self.tiers[(failed - 1) as usize].clone();
        let delay = match retry_after {
            Some(wait) => wait.min(MAX_RETRY_AFTER),
            None => self.jittered(tier.delay),
        };
        Step::Retry { tier, delay }
    }

    fn jittered(&self, delay: Duration) -> Duration {
        if self.jitter == 0.0 {
            return delay;
        }
        delay + delay.mul_f64(self.jitter * fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(p: &RetryPolicy) -> Vec<&str> {
        p.tiers().iter().map(Tier::name).collect()
    }

    #[test]
    fn default_is_5s_30s_5m_with_four_attempts() {
        let p = RetryPolicy::default();
        assert_eq!(names(&p), ["5s", "30s", "5m"]);
        assert_eq!(p.max_attempts(), 4);
    }

    #[test]
    fn parses_every_unit() {
        let p = RetryPolicy::parse("100ms, 2s,1m,1h").unwrap();
        assert_eq!(names(&p), ["100ms", "2s", "1m", "1h"]);
        assert_eq!(p.tiers()[3].delay(), Duration::from_secs(3600));
        assert_eq!(p.max_attempts(), 5);
    }

    #[test]
    fn refuses_bad_lists() {
        assert!(matches!(RetryPolicy::parse(""), Err(PolicyError::Empty(_))));
        assert!(matches!(
            RetryPolicy::parse("5s,,1m"),
            Err(PolicyError::Tier { index: 2, .. })
        ));
        assert!(matches!(
            RetryPolicy::parse("5s,fast"),
            Err(PolicyError::Tier { index: 2, .. })
        ));
        assert!(
            matches!(RetryPolicy::parse("5s,5000ms"), Err(PolicyError::Duplicate(t)) if t == "5s")
        );
        assert!(matches!(
            RetryPolicy::parse("0s"),
            Err(PolicyError::Zero { index: 1, .. })
        ));
        let msg = RetryPolicy::parse("5s,3x").unwrap_err().to_string();
        assert!(msg.contains("tier 2") && msg.contains("3x"), "{msg}");
        // Regression: `18446744073709551615ms` was accepted and parked a message for ever.
        assert!(matches!(
            RetryPolicy::parse("5s,18446744073709551615ms"),
            Err(PolicyError::TooLong { index: 2, .. })
        ));
        assert!(RetryPolicy::parse("7d").is_ok());
        assert!(matches!(
            RetryPolicy::parse("7d,169h"),
            Err(PolicyError::TooLong { index: 2, .. })
        ));
    }

    #[test]
    fn failures_walk_the_tiers_then_die() {
        let p = RetryPolicy::parse("5s,30s,5m").unwrap();
        let step = |n| p.decide(n, false, None);
        assert_eq!(
            step(1),
            Step::Retry {
                tier: Tier::new(Duration::from_secs(5)),
                delay: Duration::from_secs(5)
            }
        );
        assert_eq!(
            step(2),
            Step::Retry {
                tier: Tier::new(Duration::from_secs(30)),
                delay: Duration::from_secs(30)
            }
        );
        assert_eq!(
            step(3),
            Step::Retry {
                tier: Tier::new(Duration::from_secs(300)),
                delay: Duration::from_secs(300)
            }
        );
        assert_eq!(step(4), Step::Dead);
        assert_eq!(step(9), Step::Dead);
    }

    #[test]
    fn poison_dies_at_once_and_retry_after_overrides_the_delay() {
        let p = RetryPolicy::default();
        assert_eq!(p.decide(1, true, None), Step::Dead);
        let Step::Retry { tier, delay } = p.decide(2, false, Some(Duration::from_secs(2))) else {
            panic!("expected a retry")
        };
        assert_eq!((tier.name(), delay), ("30s", Duration::from_secs(2)));
        let Step::Retry { delay, .. } = p.decide(1, false, Some(Duration::from_secs(86_400)))
        else {
            panic!("expected a retry")
        };
        assert_eq!(delay, MAX_RETRY_AFTER);
    }

    #[test]
    fn jitter_only_lengthens_and_stays_in_bounds() {
        let p = RetryPolicy::parse("1s").unwrap().with_jitter(0.5).unwrap();
        let mut distinct = std::collections::HashSet::new();
        for _ in 0..200 {
            let Step::Retry { delay, .. } = p.decide(1, false, None) else {
                panic!()
            };
            assert!(
                delay >= Duration::from_secs(1) && delay <= Duration::from_millis(1500),
                "{delay:?}"
            );
            distinct.insert(delay);
        }
        assert!(distinct.len() > 10, "jitter should spread delays");
        assert!(RetryPolicy::default().with_jitter(1.5).is_err());
    }
}
