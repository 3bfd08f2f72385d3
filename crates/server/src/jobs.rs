//! Replay jobs the server runs in the background: those started from the API or the
//! UI, and any running job whose process stopped holding it (a crashed `dlq replay`, a
//! `serve` restarted), so jobs survive the process that started them.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redrive_core::JobState;
use redrive_runner::JobOptions;

use crate::triage::Triage;

/// How a server names itself as a job's runner (`serve (pid N on HOST)`).
pub const SERVE: &str = "serve (";

/// This process's name as a server running jobs.
#[must_use]
pub fn server_owner() -> String {
    redrive_runner::this_process("serve")
}

/// Runs replay jobs in this process, each at most once at a time.
pub struct JobRunner {
    triage: Arc<dyn Triage>,
    running: Mutex<HashSet<String>>,
    owner: String,
}

impl JobRunner {
    /// A runner over `triage`; `owner` names this process in job listings.
    #[must_use]
    pub fn new(triage: Arc<dyn Triage>, owner: String) -> Arc<Self> {
        Arc::new(Self {
            triage,
            running: Mutex::new(HashSet::new()),
            owner,
        })
    }

    /// Runs job `id` in the background, unless this process already does.
    pub fn spawn(self: &Arc<Self>, id: String) {
        {
            let Ok(mut running) = self.running.lock() else {
                return;
            };
            if !running.insert(id.clone()) {
                return;
            }
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let options = JobOptions {
                owner: this.owner.clone(),
                ..JobOptions::default()
            };
            match this.triage.run_job(id.clone(), options).await {
                Ok(v) => {
                    tracing::info!(job = %id, state = v.state.as_str(), note = %v.note, "replay job stopped")
                }
                Err(e) => tracing::warn!(job = %id, error = %e, "replay job not run here"),
            }
            if let Ok(mut running) = this.running.lock() {
                running.remove(&id);
            }
        });
    }

    /// Every `every`, takes up running jobs that no process holds.
    pub async fn supervise(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            match self.triage.jobs(None, 200).await {
                Ok(jobs) => {
                    for v in jobs {
                        // A server's own jobs (and those it never got to claim) are taken
                        // up; one a `dlq replay` left behind when it was killed waits for
                        // a person to resume or cancel it, as they ran it by hand.
                        let servers = v.last_runner.is_empty() || v.last_runner.starts_with(SERVE);
                        if v.state == JobState::Running && v.runner.is_none() && servers {
                            self.spawn(v.job.id);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot list replay jobs"),
            }
        }
    }
}
