//! `redrive consume`: the sidecar worker.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use redrive_core::{LaneSet, QueueName, RetryPolicy, Transport};
use redrive_runner::{
    BreakerConfig, BreakerReporter, ReplayReporter, Runner, RunnerConfig, Summary,
};
use redrive_server::{LanesAndStore, Metrics, Triage};
use redrive_sidecar::{ExecHandler, WebhookHandler, WorkerHandler};
use serde::Serialize;

use super::{duration_flag, shutdown_signal};
use crate::backend;
use crate::cli::{Cli, ConsumeArgs};
use crate::output::json_line;

#[derive(Serialize)]
struct SummaryJson<'a> {
    queue: &'a str,
    stopped_by: &'a str,
    delivered: u64,
    succeeded: u64,
    retried: u64,
    dead_lettered: u64,
    released: u64,
    timeouts: u64,
    panics: u64,
    lease_expired: u64,
    isolated: u64,
    /// Failures not counted because the breaker was open.
    spared: u64,
    breaker_opened: u64,
}

pub async fn run(cli: &Cli, args: &ConsumeArgs) -> Result<ExitCode> {
    let queue = QueueName::new(&args.queue)?;
    let configured = cli.loaded.queues.get(queue.as_str());
    let timeout = match &args.timeout {
        Some(t) => duration_flag("--timeout", t)?,
        None => configured
            .and_then(|q| q.timeout)
            .unwrap_or(std::time::Duration::from_secs(60)),
    };
    let concurrency = args
        .concurrency
        .or_else(|| configured.and_then(|q| q.concurrency))
        .unwrap_or(8);
    let policy = match &args.tiers {
        Some(t) => RetryPolicy::parse(t).context("invalid --tiers")?,
        None => backend::configured_policy(cli, &queue),
    }
    .with_jitter(args.jitter)
    .context("invalid --jitter")?;
    let config = RunnerConfig {
        concurrency,
        timeout,
        lease: duration_flag("--lease", &args.lease)?,
        grace: duration_flag("--grace", &args.grace)?,
        max_messages: args.max_messages,
        idle_poll: duration_flag("--poll", &args.poll)?,
        max_payload: super::publish::parse_size(&args.max_payload)
            .context("invalid --max-payload")?,
        breaker: parse_breaker(&args.breaker)?,
        ..RunnerConfig::default()
    };
    anyhow::ensure!(
        (1..=redrive_runner::MAX_CONCURRENCY).contains(&config.concurrency),
        "invalid --concurrency {}: from 1 (one handler at a time) to {}",
        config.concurrency,
        redrive_runner::MAX_CONCURRENCY
    );
    let timeout = config.timeout;
    let store = backend::open_any(cli, true).await?;
    backend::create_configured_lanes(cli, &store).await?;
    store
        .create_lanes(&LaneSet {
            queue: queue.clone(),
            tiers: policy.tiers().to_vec(),
        })
        .await
        .with_context(|| format!("creating the lanes of {queue}"))?;
    let tiers: Vec<&str> = policy
        .tiers()
        .iter()
        .map(redrive_core::Tier::name)
        .collect();
    tracing::info!(
        queue = %queue,
        tiers = %tiers.join(","),
        max_attempts = policy.max_attempts(),
        concurrency = config.concurrency,
        "consuming"
    );
    // Replay jobs wait for how the messages they moved fare: reported to the store.
    let replays = ReplayReporter::new(store.clone());
    // And `serve` shows an open breaker, and pages on it, from the store.
    let breakers = BreakerReporter::new(store.clone(), redrive_runner::this_process("consume"));
    let mut runner = Runner::new(store.clone(), queue.clone(), policy, config)
        .observe(Arc::clone(&replays) as Arc<dyn redrive_runner::Observer>)
        .observe(Arc::clone(&breakers) as Arc<dyn redrive_runner::Observer>);
    if args.until_idle {
        runner = runner.until_idle();
    }
    if let Some(addr) = args.metrics_bind {
        let metrics = Arc::new(Metrics::new());
        runner = runner.observe(Arc::clone(&metrics) as Arc<dyn redrive_runner::Observer>);
        let triage: Arc<dyn Triage> = Arc::new(LanesAndStore::new(store.clone(), store.clone()));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on --metrics-bind {addr}"))?;
        let bound = listener.local_addr()?;
        tracing::info!(addr = %bound, "metrics at http://{bound}/metrics");
        tokio::spawn(async move {
            if let Err(e) =
                axum::serve(listener, redrive_server::metrics_router(triage, metrics)).await
            {
                tracing::error!(error = %e, "the metrics server stopped");
            }
        });
    }
    let stats = runner.stats();
    let summary: Summary = match (&args.exec, &args.webhook, &args.worker) {
        (Some(cmd), _, _) => {
            runner
                .run(ExecHandler::new(cmd.clone()), shutdown_signal())
                .await?
        }
        (None, Some(url), _) => {
            let handler = WebhookHandler::new(url, timeout).context("invalid --webhook")?;
            runner.run(handler, shutdown_signal()).await?
        }
        (None, None, Some(cmd)) => {
            let workers = WorkerHandler::new(cmd.clone(), usize::from(args.workers.unwrap_or(1)));
            let summary = runner.run(workers.clone(), shutdown_signal()).await;
            // Whatever stopped the runner, the workers get end of file and time to exit.
            workers.close().await;
            summary?
        }
        (None, None, None) => anyhow::bail!("give --exec CMD, --webhook URL or --worker CMD"),
    };
    replays.close().await;
    breakers.close().await;
    let s = stats.snapshot();
    if args.json {
        json_line(&SummaryJson {
            queue: queue.as_str(),
            stopped_by: summary.reason,
            delivered: summary.delivered,
            succeeded: s.succeeded,
            retried: s.retried,
            dead_lettered: s.dead,
            released: summary.released,
            timeouts: s.timeouts,
            panics: s.panics,
            lease_expired: s.lease_expired,
            isolated: s.isolated,
            spared: s.spared,
            breaker_opened: s.breaker_opened,
        });
    } else {
        eprintln!(
            "{queue}: stopped ({}) after {} deliveries: {} ok, {} retried, {} dead-lettered, {} released{}",
            summary.reason,
            summary.delivered,
            s.succeeded,
            s.retried,
            s.dead,
            summary.released,
            if s.breaker_opened > 0 {
                format!(
                    "; the breaker opened {} time(s) and spared {} failed attempt(s)",
                    s.breaker_opened, s.spared
                )
            } else {
                String::new()
            }
        );
    }
    store.store().close();
    Ok(ExitCode::SUCCESS)
}

/// `--breaker`: `off`, or `N,PERCENT,WINDOW` (`20,80%,30s`).
fn parse_breaker(spec: &str) -> Result<Option<BreakerConfig>> {
    if spec.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let bad = |why: &str| {
        anyhow::anyhow!(
            "invalid --breaker {spec:?}: {why} (expected N,PERCENT,WINDOW such as 20,80%,30s, or off)"
        )
    };
    let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
    let [n, percent, window] = parts[..] else {
        return Err(bad("three parts are needed"));
    };
    let min_failures: usize = n
        .parse()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| bad("N must be a whole number of at least 1"))?;
    let percent: f64 = percent
        .trim_end_matches('%')
        .parse()
        .ok()
        .filter(|p: &f64| (1.0..=100.0).contains(p))
        .ok_or_else(|| bad("PERCENT must be from 1 to 100"))?;
    let window = duration_flag("--breaker's WINDOW", window)?;
    if window.is_zero() {
        return Err(bad("WINDOW must be longer than 0"));
    }
    Ok(Some(BreakerConfig {
        min_failures,
        failure_ratio: percent / 100.0,
        window,
        ..BreakerConfig::default()
    }))
}

#[cfg(test)]
mod tests {
    use super::parse_breaker;

    #[test]
    fn breaker_specs_read_or_say_what_is_wrong() {
        let b = parse_breaker("5, 50%, 10s").unwrap().unwrap();
        assert_eq!(
            (b.min_failures, b.failure_ratio, b.window.as_secs()),
            (5, 0.5, 10)
        );
        assert!(parse_breaker("OFF").unwrap().is_none());
        for bad in [
            "20,80%",
            "0,80%,30s",
            "20,180%,30s",
            "20,80%,soon",
            "20,80%,0s",
            "",
        ] {
            let e = parse_breaker(bad).unwrap_err().to_string();
            assert!(e.contains("--breaker"), "{bad}: {e}");
        }
    }
}
