//! DLQ depth over time, sampled in the background for the overview chart.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redrive_core::now_ms;

use crate::triage::Triage;

/// One sample: when, and the DLQ depth of each queue.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When (unix ms).
    pub at_ms: i64,
    /// DLQ depth per queue.
    pub dlq: Vec<(String, u64)>,
}

/// A bounded ring of samples.
#[derive(Debug)]
pub struct DepthHistory {
    samples: Mutex<VecDeque<Sample>>,
    capacity: usize,
}

impl DepthHistory {
    /// Keeps the last `capacity` samples.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            samples: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
        }
    }

    /// Adds a sample, dropping the oldest beyond capacity.
    pub fn push(&self, sample: Sample) {
        if let Ok(mut s) = self.samples.lock() {
            if s.len() == self.capacity {
                s.pop_front();
            }
            s.push_back(sample);
        }
    }

    /// The samples, oldest first.
    #[must_use]
    pub fn samples(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// Samples DLQ depth every `every`, forever.
pub async fn sample(triage: Arc<dyn Triage>, history: Arc<DepthHistory>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match triage.depths().await {
            Ok(depths) => history.push(Sample {
                at_ms: now_ms(),
                dlq: depths.iter().map(|d| (d.queue.clone(), d.dlq)).collect(),
            }),
            Err(e) => tracing::warn!(error = %e, "cannot sample DLQ depth"),
        }
    }
}
