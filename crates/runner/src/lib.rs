//! The redrive consume loop, shared by the `redrive consume` sidecar and by Rust agents
//! that use redrive as a library.
//!
//! A [`Runner`] pulls due deliveries from a [`Transport`](redrive_core::Transport),
//! hands each to a [`Handler`] under a concurrency limit, a timeout and panic
//! isolation, keeps long handlers' leases alive, and settles every delivery by the
//! [`RetryPolicy`](redrive_core::RetryPolicy): ack, next retry tier, or the DLQ.
//! Settling returns only once the next place is durable.
//!
//! ```no_run
//! # async fn demo(transport: redrive_sqlite::Sqlite) {
//! use redrive_core::{HandlerError, LaneSet, QueueName, RetryPolicy};
//! use redrive_runner::{Runner, RunnerConfig, handler_fn};
//!
//! let queue = QueueName::new("agent.tasks").unwrap();
//! let policy = RetryPolicy::parse("5s,30s,5m").unwrap();
//! let runner = Runner::new(transport, queue, policy, RunnerConfig::default());
//! let handler = handler_fn(|msg: redrive_core::Envelope| async move {
//!     if msg.payload.is_empty() {
//!         return Err(HandlerError::poison("EmptyTask", "the task payload is empty"));
//!     }
//!     Ok(())
//! });
//! runner.run(handler, std::future::pending()).await.unwrap();
//! # }
//! ```

mod breaker;
mod breaker_report;
mod handler;
mod isolation;
mod observer;
mod replay_job;
mod runner;
mod stats;

pub use breaker::{BreakerConfig, BreakerState};
pub use breaker_report::BreakerReporter;
pub use handler::{Handler, handler_fn, json_handler};
pub use observer::{Observer, Settled};
pub use replay_job::{
    Canary, JobOptions, JobSpec, ReplayReporter, replay_as_job, resume_job, run_job, start_job,
    this_process,
};
pub use runner::{MAX_CONCURRENCY, RunError, Runner, RunnerConfig, Summary};
pub use stats::{Stats, StatsSnapshot};
