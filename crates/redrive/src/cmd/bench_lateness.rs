//! Retry lateness at low load: how long after its due time a retry's next attempt
//! starts, on an otherwise idle consumer. Runs on the embedded store or on the backend of
//! `--broker`.
//!
//! Messages are published in small rounds to a consumer that fails each one once with a
//! retryable error (tier 1 s, no jitter). Rounds are 700 ms apart, so each round's
//! retries come due 300 ms from any other activity: the consumer is idle when they are
//! due, and must wake for them. For each message the handler notes
//! when attempt 0 returned its failure and when attempt 1 started; the lateness is the
//! gap minus the tier's delay. The delay is a promise both ways: never before, and not
//! much after. The process's CPU time over the run shows whether the consumer busy-polls
//! to keep it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use redrive_core::{Envelope, HandlerError, MessageId, QueueName, RetryPolicy, Transport};
use redrive_runner::{Runner, RunnerConfig, handler_fn};
use serde::Serialize;
use tokio::sync::Notify;

use super::bench::percentile;

/// Rounds of a lateness run, and messages published at once in each.
const ROUNDS: usize = 10;
const PER_ROUND: usize = 20;
/// Messages a lateness run publishes.
pub const MESSAGES: usize = ROUNDS * PER_ROUND;
/// The gap between two rounds: not a divisor of the tier, so no round's publish or
/// first attempts fall near another round's retries.
const GAP: Duration = Duration::from_millis(700);
/// The one retry tier: long enough that every retry waits idle in its lane.
const TIER: Duration = Duration::from_secs(1);
/// How long the retries may take, past the last publish, before the run is called failed.
const PATIENCE: Duration = Duration::from_secs(60);

#[derive(Serialize, Clone, Debug)]
pub struct Lateness {
    pub backend: String,
    pub messages: usize,
    pub tier_ms: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Earliest start relative to the due time (never negative when the promise holds).
    pub min_ms: f64,
    /// The whole process's CPU time over the run, as a share of one core.
    pub cpu_share: f64,
}

#[derive(Default)]
struct Notes {
    failed_at: HashMap<MessageId, Instant>,
    late_ms: Vec<f64>,
}

/// Seconds of CPU this process has used (user + system), from `/proc/self/stat`.
pub fn process_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    // USER_HZ is 100 on every Linux the kernel ABI allows user space to see.
    ticks as f64 / 100.0
}

/// Runs the lateness scenario on `transport`, in `queue` (which should be new).
///
/// # Errors
///
/// Fails when publishing or consuming fails, or when the retries have not all come
/// back within a minute of the last publish.
pub async fn measure<T: Transport>(
    transport: Arc<T>,
    backend: &str,
    queue: QueueName,
    config: RunnerConfig,
) -> Result<Lateness> {
    let policy = RetryPolicy::parse("1s").context("the lateness tier")?;
    let notes = Arc::new(Mutex::new(Notes::default()));
    let all_back = Arc::new(Notify::new());
    let handler = {
        let notes = Arc::clone(&notes);
        let all_back = Arc::clone(&all_back);
        handler_fn(move |msg: Envelope| {
            let started = Instant::now();
            let notes = Arc::clone(&notes);
            let all_back = Arc::clone(&all_back);
            async move {
                if msg.attempt == 0 {
                    let mut n = notes.lock().expect("lateness notes");
                    n.failed_at.insert(msg.id, Instant::now());
                    return Err(HandlerError::retry("BenchLate", "fails once by design"));
                }
                let mut n = notes.lock().expect("lateness notes");
                if let Some(failed) = n.failed_at.remove(&msg.id) {
                    let gap = started.duration_since(failed).as_secs_f64() * 1000.0;
                    n.late_ms.push(gap - TIER.as_secs_f64() * 1000.0);
                    if n.late_ms.len() == MESSAGES {
                        all_back.notify_one();
                    }
                }
                Ok(())
            }
        })
    };
    let runner: Runner<T> = Runner::new(Arc::clone(&transport), queue.clone(), policy, config);
    let cpu_before = process_cpu_secs();
    let started = Instant::now();
    let consuming = tokio::spawn({
        let all_back = Arc::clone(&all_back);
        async move { runner.run(handler, all_back.notified()).await }
    });
    for round in 0..ROUNDS {
        let at = started + GAP * u32::try_from(round).unwrap_or(u32::MAX);
        tokio::time::sleep_until(at.into()).await;
        let batch = (0..PER_ROUND)
            .map(|i| {
                Envelope::new(
                    queue.clone(),
                    format!("{{\"n\":{}}}", round * PER_ROUND + i),
                )
            })
            .collect();
        transport
            .publish(&queue, batch)
            .await
            .context("publishing")?;
    }
    let summary = tokio::time::timeout(PATIENCE, consuming).await;
    let wall = started.elapsed().as_secs_f64();
    let cpu = process_cpu_secs() - cpu_before;
    match summary {
        Ok(joined) => {
            joined.context("the consumer task")?.context("consuming")?;
        }
        Err(_) => {
            let back = notes.lock().expect("lateness notes").late_ms.len();
            bail!(
                "only {back} of {MESSAGES} retries came back within {}s of the last publish",
                PATIENCE.as_secs()
            );
        }
    }
    let mut late = std::mem::take(&mut notes.lock().expect("lateness notes").late_ms);
    late.sort_by(f64::total_cmp);
    Ok(Lateness {
        backend: backend.to_owned(),
        messages: late.len(),
        tier_ms: TIER.as_millis() as u64,
        p50_ms: percentile(&late, 50.0),
        p99_ms: percentile(&late, 99.0),
        max_ms: late.last().copied().unwrap_or(0.0),
        min_ms: late.first().copied().unwrap_or(0.0),
        cpu_share: cpu / wall,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_grows_with_work() {
        let before = process_cpu_secs();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        assert!(process_cpu_secs() - before >= 0.1, "{x}");
    }
}
