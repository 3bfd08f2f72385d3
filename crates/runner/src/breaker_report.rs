//! Reports a consumer's open breakers to the store, where `serve` shows them (a banner,
//! `queues`) and pages on them (`breaker.opened`, `breaker.closed`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redrive_core::{BreakerBoard, QueueName, now_ms};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::BreakerState;
use crate::observer::Observer;

/// How often an open breaker's report is renewed (a third of how long it holds).
const RENEW: Duration = Duration::from_secs(30);

/// An observer that writes the runner's breaker changes to the store, and renews the
/// report of an open breaker while it stays open. Add it with
/// [`crate::Runner::observe`]; call [`Self::close`] when the runner has stopped: a
/// consumer that stopped holds nothing back, so its reports are withdrawn.
pub struct BreakerReporter {
    tx: Mutex<Option<mpsc::UnboundedSender<(String, bool)>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl BreakerReporter {
    /// Starts the task that reports for `consumer` (a name for this process) to `store`.
    pub fn new<S: BreakerBoard + Clone>(store: S, consumer: String) -> Arc<Self> {
        let (tx, mut rx) = mpsc::unbounded_channel::<(String, bool)>();
        let task = tokio::spawn(async move {
            let mut open: HashMap<String, i64> = HashMap::new();
            let mut tick = tokio::time::interval(RENEW);
            loop {
                let renew = tokio::select! {
                    change = rx.recv() => match change {
                        Some((queue, true)) => {
                            let since = now_ms();
                            open.insert(queue.clone(), since);
                            vec![(queue, Some((since, since)))]
                        }
                        Some((queue, false)) => {
                            open.remove(&queue);
                            vec![(queue, None)]
                        }
                        None => {
                            // The consumer stopped: nothing of it is held back any more.
                            open.drain().map(|(q, _)| (q, None)).collect()
                        }
                    },
                    _ = tick.tick() => {
                        let now = now_ms();
                        open.iter().map(|(q, since)| (q.clone(), Some((*since, now)))).collect()
                    }
                };
                let stopping = rx.is_closed() && open.is_empty();
                for (queue, state) in renew {
                    if let Err(e) = store.report_breaker(&queue, &consumer, state).await {
                        tracing::warn!(queue = %queue, error = %e, "could not report the breaker to the store; serve will not show it");
                    }
                }
                if stopping {
                    return;
                }
            }
        });
        Arc::new(Self {
            tx: Mutex::new(Some(tx)),
            task: Mutex::new(Some(task)),
        })
    }

    /// Withdraws this consumer's reports and stops the task.
    pub async fn close(&self) {
        drop(self.tx.lock().ok().and_then(|mut t| t.take()));
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Observer for BreakerReporter {
    fn breaker(&self, queue: &QueueName, state: BreakerState) {
        if let Ok(tx) = self.tx.lock()
            && let Some(tx) = tx.as_ref()
        {
            let _ = tx.send((queue.to_string(), state == BreakerState::Open));
        }
    }
}
