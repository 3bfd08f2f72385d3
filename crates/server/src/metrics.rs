//! Prometheus metrics: the runner's counters and histograms (as an [`Observer`]), and
//! lane / DLQ gauges read from the backend at scrape time.
//!
//! Names follow `redrive_<thing>_<unit>`, counters end in `_total`; labels are queue,
//! lane and error class, never a message id.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use redrive_core::{Cost, DeadStats, Lane, QueueDepths, QueueName, now_ms};
use redrive_runner::{BreakerState, Observer, Settled};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLane {
    queue: String,
    lane: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueClass {
    queue: String,
    error_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueClassDirection {
    queue: String,
    error_class: String,
    /// `input` or `output`.
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueOnly {
    queue: String,
}

fn duration_histogram() -> Histogram {
    // 1 ms .. ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn lateness_histogram() -> Histogram {
    // 1 ms .. ~16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// What the backend looked like at the last scrape.
#[derive(Debug, Default)]
struct Snapshot {
    depths: Vec<QueueDepths>,
    dead: Vec<DeadStats>,
    at_ms: i64,
}

/// Emits lane and DLQ gauges from the last snapshot.
#[derive(Debug, Default)]
struct BackendGauges {
    snapshot: Mutex<Snapshot>,
}

impl Collector for BackendGauges {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Ok(snap) = self.snapshot.lock() else {
            return Ok(());
        };
        let depth_of = |d: &QueueDepths| {
            let mut lanes = vec![("main".to_owned(), d.main)];
            lanes.extend(
                d.retry
                    .iter()
                    .map(|(t, n)| (Lane::Retry(t.clone()).label(), *n)),
            );
            lanes.push(("isolated".to_owned(), d.isolated));
            lanes.push(("dlq".to_owned(), d.dlq));
            lanes
        };
        let gauge = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "redrive_lane_depth_messages",
            "Messages waiting in each lane (in-flight ones excluded)",
            None,
            gauge.metric_type(),
        )?;
        for d in &snap.depths {
            for (lane, n) in depth_of(d) {
                let labels = QueueLane {
                    queue: d.queue.clone(),
                    lane,
                };
                ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "redrive_inflight_messages",
            "Deliveries leased to a consumer now",
            None,
            gauge.metric_type(),
        )?;
        for d in &snap.depths {
            let labels = QueueOnly {
                queue: d.queue.clone(),
            };
            ConstGauge::new(i64::try_from(d.inflight).unwrap_or(i64::MAX))
                .encode(family.encode_family(&labels)?)?;
        }
        let fgauge = ConstGauge::new(0f64);
        let mut family = encoder.encode_descriptor(
            "redrive_lane_oldest_age_seconds",
            "Age of the oldest message waiting in the lane",
            None,
            fgauge.metric_type(),
        )?;
        for d in &snap.depths {
            if let Some(age) = d.oldest_main_age_ms {
                let labels = QueueLane {
                    queue: d.queue.clone(),
                    lane: "main".into(),
                };
                ConstGauge::new(age as f64 / 1000.0).encode(family.encode_family(&labels)?)?;
            }
            let oldest_dead = snap
                .dead
                .iter()
                .filter(|s| s.queue == d.queue)
                .filter_map(|s| s.oldest_dead_at_ms)
                .min();
            if let Some(at) = oldest_dead {
                let labels = QueueLane {
                    queue: d.queue.clone(),
                    lane: "dlq".into(),
                };
                ConstGauge::new((snap.at_ms - at).max(0) as f64 / 1000.0)
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "redrive_dlq_messages",
            "Dead messages in the dead-letter store, by error class",
            None,
            gauge.metric_type(),
        )?;
        for s in &snap.dead {
            let labels = QueueClass {
                queue: s.queue.clone(),
                error_class: s.error_class.clone(),
            };
            ConstGauge::new(i64::try_from(s.dead).unwrap_or(i64::MAX))
                .encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// All of redrive's metrics in one registry.
pub struct Metrics {
    registry: Registry,
    gauges: Arc<BackendGauges>,
    processed: Family<QueueLane, Counter>,
    succeeded: Family<QueueLane, Counter>,
    retried: Family<QueueClass, Counter>,
    dead_lettered: Family<QueueClass, Counter>,
    isolated: Family<QueueLane, Counter>,
    spared: Family<QueueClass, Counter>,
    breaker_open: Family<QueueOnly, Gauge>,
    breaker_opened: Family<QueueOnly, Counter>,
    handler_seconds: Family<QueueOnly, Histogram, fn() -> Histogram>,
    lateness_seconds: Family<QueueLane, Histogram, fn() -> Histogram>,
    replays: Family<QueueOnly, Counter>,
    failed_usd: Family<QueueClass, Counter<f64, AtomicU64>>,
    failed_tokens: Family<QueueClassDirection, Counter>,
    notifications: Family<NotificationLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NotificationLabels {
    notifier: String,
    kind: String,
    result: String,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let gauges = Arc::new(BackendGauges::default());
        registry.register_collector(Box::new(Arc::clone(&gauges)));
        let m = Self {
            registry,
            gauges,
            processed: Family::default(),
            succeeded: Family::default(),
            retried: Family::default(),
            dead_lettered: Family::default(),
            isolated: Family::default(),
            spared: Family::default(),
            breaker_open: Family::default(),
            breaker_opened: Family::default(),
            handler_seconds: Family::new_with_constructor(duration_histogram),
            lateness_seconds: Family::new_with_constructor(lateness_histogram),
            replays: Family::default(),
            failed_usd: Family::default(),
            failed_tokens: Family::default(),
            notifications: Family::default(),
        };
        let mut m = m;
        let r = &mut m.registry;
        r.register(
            "redrive_messages_processed",
            "Deliveries settled by this process",
            m.processed.clone(),
        );
        r.register(
            "redrive_messages_succeeded",
            "Deliveries acknowledged by this process",
            m.succeeded.clone(),
        );
        r.register(
            "redrive_messages_retried",
            "Deliveries moved to a retry tier, by error class",
            m.retried.clone(),
        );
        r.register(
            "redrive_messages_dead_lettered",
            "Deliveries moved to the DLQ, by error class",
            m.dead_lettered.clone(),
        );
        r.register(
            "redrive_messages_isolated",
            "Crash suspects moved, uncounted, to the isolation lane to be run alone, by the lane they came from",
            m.isolated.clone(),
        );
        r.register(
            "redrive_breaker_open",
            "1 while the queue's outage breaker is open (no new messages taken), 0 once it closed",
            m.breaker_open.clone(),
        );
        r.register(
            "redrive_breaker_opened",
            "Times the queue's outage breaker opened",
            m.breaker_opened.clone(),
        );
        r.register(
            "redrive_breaker_spared",
            "Failed attempts not counted against their messages because the queue's breaker was open, by error class",
            m.spared.clone(),
        );
        r.register(
            "redrive_handler_duration_seconds",
            "How long handlers ran",
            m.handler_seconds.clone(),
        );
        r.register(
            "redrive_retry_lateness_seconds",
            "How long after its due time a retry was handed out",
            m.lateness_seconds.clone(),
        );
        r.register(
            "redrive_replays",
            "Dead messages replayed by this process",
            m.replays.clone(),
        );
        r.register(
            "redrive_failed_attempt_cost_usd",
            "US dollars spent on failed attempts, as their handlers reported, by error class",
            m.failed_usd.clone(),
        );
        r.register(
            "redrive_failed_attempt_tokens",
            "Model tokens spent on failed attempts, as their handlers reported, by error class and direction (input, output)",
            m.failed_tokens.clone(),
        );
        r.register(
            "redrive_alert_notifications",
            "Alert notification attempts by notifier, kind and result (sent, failed, gave_up)",
            m.notifications.clone(),
        );
        m
    }

    /// Records the backend's state for the next scrape.
    pub fn set_backend(&self, depths: Vec<QueueDepths>, dead: Vec<DeadStats>) {
        if let Ok(mut snap) = self.gauges.snapshot.lock() {
            *snap = Snapshot {
                depths,
                dead,
                at_ms: now_ms(),
            };
        }
    }

    /// Counts replayed messages.
    pub fn replayed(&self, by_queue: &[(String, u64)]) {
        for (queue, n) in by_queue {
            self.replays
                .get_or_create(&QueueOnly {
                    queue: queue.clone(),
                })
                .inc_by(*n);
        }
    }

    /// Counts a notification attempt.
    pub fn notification(&self, notifier: &str, kind: &str, result: &str) {
        let labels = NotificationLabels {
            notifier: notifier.to_owned(),
            kind: kind.to_owned(),
            result: result.to_owned(),
        };
        self.notifications.get_or_create(&labels).inc();
    }

    /// Counts what a failed attempt cost; an attempt that reported nothing adds no
    /// series.
    fn count_cost(&self, labels: &QueueClass, cost: Cost) {
        if cost.usd_micros > 0 {
            self.failed_usd.get_or_create(labels).inc_by(cost.usd());
        }
        for (direction, tokens) in [("input", cost.input_tokens), ("output", cost.output_tokens)] {
            if tokens > 0 {
                let labels = QueueClassDirection {
                    queue: labels.queue.clone(),
                    error_class: labels.error_class.clone(),
                    direction,
                };
                self.failed_tokens.get_or_create(&labels).inc_by(tokens);
            }
        }
    }

    /// The exposition text (OpenMetrics).
    ///
    /// # Errors
    ///
    /// Fails only if a metric cannot be formatted.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

impl Observer for Metrics {
    fn delivered(&self, queue: &QueueName, lane: &Lane, lateness_ms: Option<i64>) {
        if let Some(ms) = lateness_ms {
            let labels = QueueLane {
                queue: queue.to_string(),
                lane: lane.label(),
            };
            self.lateness_seconds
                .get_or_create(&labels)
                .observe(ms.max(0) as f64 / 1000.0);
        }
    }

    fn settled(
        &self,
        queue: &QueueName,
        lane: &Lane,
        settled: Settled<'_>,
        handler_secs: Option<f64>,
    ) {
        let q = queue.to_string();
        let ql = QueueLane {
            queue: q.clone(),
            lane: lane.label(),
        };
        if let Some(secs) = handler_secs {
            self.handler_seconds
                .get_or_create(&QueueOnly { queue: q.clone() })
                .observe(secs);
        }
        match settled {
            Settled::Ok => {
                self.processed.get_or_create(&ql).inc();
                self.succeeded.get_or_create(&ql).inc();
            }
            Settled::Retried { class, cost, .. } => {
                self.processed.get_or_create(&ql).inc();
                let qc = QueueClass {
                    queue: q,
                    error_class: class.to_owned(),
                };
                self.count_cost(&qc, cost);
                self.retried.get_or_create(&qc).inc();
            }
            Settled::Dead { class, cost, .. } => {
                self.processed.get_or_create(&ql).inc();
                let qc = QueueClass {
                    queue: q,
                    error_class: class.to_owned(),
                };
                self.count_cost(&qc, cost);
                self.dead_lettered.get_or_create(&qc).inc();
            }
            Settled::Isolated => {
                self.isolated.get_or_create(&ql).inc();
            }
            Settled::Spared { class } => {
                let qc = QueueClass {
                    queue: q,
                    error_class: class.to_owned(),
                };
                self.spared.get_or_create(&qc).inc();
            }
            Settled::Unsettled => {}
        }
    }

    fn breaker(&self, queue: &QueueName, state: BreakerState) {
        let q = QueueOnly {
            queue: queue.to_string(),
        };
        let open = state == BreakerState::Open;
        self.breaker_open.get_or_create(&q).set(i64::from(open));
        if open {
            self.breaker_opened.get_or_create(&q).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_attempt_cost_is_counted_per_queue_and_class() {
        let m = Metrics::new();
        let q = QueueName::new("agent.tasks").unwrap();
        let failed = |cost| Settled::Retried {
            class: "http_503",
            kind: redrive_core::FailureKind::Retry,
            cost,
        };
        m.settled(&q, &Lane::Main, failed(Cost::new(1000, 200, 0.25)), None);
        m.settled(&q, &Lane::Main, failed(Cost::new(500, 0, 0.5)), None);
        m.settled(&q, &Lane::Main, failed(Cost::default()), None);
        let text = m.encode().unwrap();
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} in\n{text}"))
                .to_owned()
        };
        assert!(
            line("redrive_failed_attempt_cost_usd_total{").ends_with(" 0.75"),
            "{text}"
        );
        let input = line(
            "redrive_failed_attempt_tokens_total{queue=\"agent.tasks\",error_class=\"http_503\",direction=\"input\"}",
        );
        assert!(input.ends_with(" 1500"), "{input}");
        let output = line(
            "redrive_failed_attempt_tokens_total{queue=\"agent.tasks\",error_class=\"http_503\",direction=\"output\"}",
        );
        assert!(output.ends_with(" 200"), "{output}");
        assert!(line("redrive_messages_retried_total{").ends_with(" 3"));
    }

    #[test]
    fn the_breaker_state_and_what_it_spared_are_exported() {
        let m = Metrics::new();
        let q = QueueName::new("agent.tasks").unwrap();
        m.breaker(&q, BreakerState::Open);
        m.settled(&q, &Lane::Main, Settled::Spared { class: "http_503" }, None);
        m.settled(&q, &Lane::Main, Settled::Spared { class: "http_503" }, None);
        let text = m.encode().unwrap();
        let has = |l: &str| assert!(text.lines().any(|t| t == l), "no {l} in\n{text}");
        has("redrive_breaker_open{queue=\"agent.tasks\"} 1");
        has("redrive_breaker_opened_total{queue=\"agent.tasks\"} 1");
        has("redrive_breaker_spared_total{queue=\"agent.tasks\",error_class=\"http_503\"} 2");
        m.breaker(&q, BreakerState::Closed);
        let text = m.encode().unwrap();
        assert!(
            text.lines()
                .any(|t| t == "redrive_breaker_open{queue=\"agent.tasks\"} 0"),
            "{text}"
        );
    }
}
