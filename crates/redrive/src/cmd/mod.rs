//! One module per subcommand. Each takes the parsed arguments, calls into the library
//! crates, and prints; none holds logic the library should own.

pub mod admin;
pub mod bench;
pub mod bench_crash;
pub mod bench_crashpoints;
pub mod bench_handlers;
pub mod bench_lateness;
pub mod bench_triage;
pub mod consume;
pub mod demo;
pub mod dlq;
pub mod jobs;
pub mod publish;
pub mod queues;
pub mod serve;

use std::time::Duration;

use anyhow::{Context, Result};

/// Parses a duration flag, naming the flag in the error.
pub fn duration_flag(flag: &str, value: &str) -> Result<Duration> {
    redrive_core::parse_duration(value).with_context(|| format!("invalid {flag}"))
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops gracefully");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: no new messages; in-flight ones get the grace period");
}

/// Who is acting, for the audit log.
pub fn actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".to_owned());
    format!("cli:{user}")
}
