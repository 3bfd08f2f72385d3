//! What every broker bench shares: numbered messages, redrive's no-op consumer, CPU
//! time, and the output.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Result;
use redrive_core::{Envelope, QueueName, RetryPolicy, Transport};
use redrive_runner::{Runner, RunnerConfig, handler_fn};

/// Publishes `{"n":0}` … `{"n":N-1}` to `queue` in batches of `chunk`; returns the
/// seconds it took.
pub async fn publish_numbered<T: Transport>(
    transport: &T,
    queue: &QueueName,
    n: usize,
    chunk: usize,
) -> Result<f64> {
    let started = Instant::now();
    for batch in (0..n).collect::<Vec<_>>().chunks(chunk) {
        transport
            .publish(
                queue,
                batch
                    .iter()
                    .map(|i| Envelope::new(queue.clone(), format!("{{\"n\":{i}}}")))
                    .collect(),
            )
            .await?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Consumes `n` messages of `queue` with a no-op handler on `concurrency` slots; returns
/// the seconds from the first message handed out to the last.
pub async fn consume_noop<T: Transport>(
    transport: T,
    queue: QueueName,
    n: usize,
    concurrency: usize,
) -> Result<f64> {
    let config = RunnerConfig {
        concurrency,
        lease: Duration::from_secs(30),
        idle_poll: Duration::from_millis(20),
        max_messages: Some(n as u64),
        ..RunnerConfig::default()
    };
    // The clock is read for the first and the last message only (a read per message
    // showed in profiles).
    let first = Arc::new(OnceLock::new());
    let last = Arc::new(OnceLock::new());
    let handed = Arc::new(AtomicUsize::new(0));
    let (f, l) = (Arc::clone(&first), Arc::clone(&last));
    Runner::new(transport, queue, RetryPolicy::parse("1s")?, config)
        .run(
            handler_fn(move |_m: Envelope| {
                f.get_or_init(Instant::now);
                if handed.fetch_add(1, Ordering::Relaxed) + 1 == n {
                    l.get_or_init(Instant::now);
                }
                async { Ok(()) }
            }),
            std::future::pending(),
        )
        .await?;
    let ended = last.get().copied().unwrap_or_else(Instant::now);
    let started = first.get().copied().unwrap_or(ended);
    Ok(ended.duration_since(started).as_secs_f64().max(0.001))
}

/// CPU time this process has used so far (user + system, all threads), in seconds;
/// `None` where `/proc` is not there. Ten-millisecond resolution: meaningful over a
/// phase of a second or more.
pub fn cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start after its ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    // utime and stime are fields 14 and 15 of the line (indexes 11 and 12 from the state
    // field, the third), in clock ticks of 1/100 s (Linux's USER_HZ).
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

/// Client CPU per consumed message, in microseconds, between two [`cpu_secs`] readings.
pub fn cpu_us_per_msg(before: Option<f64>, after: Option<f64>, n: usize) -> Option<f64> {
    Some((after? - before?) * 1e6 / n.max(1) as f64)
}

/// The message number in `{"n":123}`.
pub fn number(payload: &[u8]) -> u64 {
    payload
        .iter()
        .filter(|b| b.is_ascii_digit())
        .fold(0, |acc, b| acc * 10 + u64::from(b - b'0'))
}

/// The median of `values` (sorted in place); 0 for none.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() {
        0 => 0.0,
        n if n % 2 == 0 => f64::midpoint(values[mid - 1], values[mid]),
        _ => values[mid],
    }
}

/// Prints one JSON value on a line.
pub fn json_line<T: serde::Serialize>(value: &T) {
    match serde_json::to_string(value) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("error: cannot encode JSON: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut []), 0.0);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn numbers_are_read_back_from_payloads() {
        assert_eq!(number(br#"{"n":0}"#), 0);
        assert_eq!(number(br#"{"n":40917}"#), 40917);
    }
}
