//! `redrive demo`: a simulated, flaky AI agent on a scratch store, so a new user sees
//! lanes, a DLQ grouped by error, and the commands to inspect and replay it.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use redrive_core::{
    Cost, DeadFilter, DeadLetterStore, Envelope, HandlerError, LaneSet, LaneStats, QueueName,
    RetryPolicy, Transport,
};
use redrive_runner::{Runner, RunnerConfig, json_handler};
use redrive_server::Metrics;
use serde::Deserialize;

use crate::backend;
use crate::cli::{Cli, DemoArgs};
use crate::output::outln;
use crate::output::{one_line, table};

const QUEUE: &str = "agent.tasks";
const TIERS: &str = "1s,2s,4s";

/// A task as the simulated agent expects it. `simulate` makes it misbehave.
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct Task {
    task_id: u64,
    agent: String,
    action: String,
    #[serde(default)]
    simulate: Option<String>,
    #[serde(default)]
    fail_times: u32,
}

/// Builds the scenario: mostly healthy tasks, some transient trouble, some poison.
fn tasks(n: usize) -> Vec<Vec<u8>> {
    let mut rng = fastrand::Rng::with_seed(7);
    let agents = ["research-bot", "support-triage", "code-review"];
    (0..n)
        .map(|i| {
            let agent = agents[i % agents.len()];
            let roll = rng.u32(0..100);
            let body = match roll {
                0..=1 => format!("{{\"task_id\":{i},\"agent\":\"{agent}\",\"action\":\"summ"),
                2..=3 => format!("{{task_id: {i}, agent: '{agent}'}}"),
                4 => format!("{{\"task_id\":{i},\"action\":\"summarize\"}}"),
                5..=16 => format!(
                    "{{\"task_id\":{i},\"agent\":\"{agent}\",\"action\":\"summarize\",\"simulate\":\"rate_limit\",\"fail_times\":{}}}",
                    rng.u32(1..=2)
                ),
                17..=22 => format!(
                    "{{\"task_id\":{i},\"agent\":\"{agent}\",\"action\":\"web_search\",\"simulate\":\"tool_timeout\",\"fail_times\":1}}"
                ),
                23..=25 => format!("{{\"task_id\":{i},\"agent\":\"{agent}\",\"action\":\"fetch_url\",\"simulate\":\"schema\"}}"),
                26..=28 => format!("{{\"task_id\":{i},\"agent\":\"{agent}\",\"action\":\"retrieve\",\"simulate\":\"upstream_down\"}}"),
                29 => format!("{{\"task_id\":{i},\"agent\":\"{agent}\",\"action\":\"plan\",\"simulate\":\"panic\"}}"),
                _ => format!("{{\"task_id\":{i},\"agent\":\"{agent}\",\"action\":\"summarize\"}}"),
            };
            body.into_bytes()
        })
        .chain(std::iter::once(
            // A task carrying markup, to show that triage renders payloads, headers and
            // errors as text and never runs them.
            br#"{"task_id":9001,"agent":"<script>alert(1)</script>","action":"\"><img src=x onerror=alert(1)>","simulate":"injection"}"#.to_vec(),
        ))
        .collect()
}

/// The model each simulated agent calls, with its price in US dollars per million
/// input and output tokens.
fn model_of(agent: &str) -> (&'static str, f64, f64) {
    match agent {
        "research-bot" => ("claude-sonnet-4", 3.0, 15.0),
        "code-review" => ("gpt-4.1", 2.0, 8.0),
        _ => ("gpt-4o-mini", 0.15, 0.6),
    }
}

/// Attaches what the simulated attempt used, as a real agent would from its model
/// client's usage report: the model, the tool it was running, and the tokens and
/// dollars the attempt cost.
fn with_usage(task: &Task, err: HandlerError) -> HandlerError {
    let (model, input_price, output_price) = model_of(&task.agent);
    let input = 800 + task.task_id % 7 * 300;
    let output = 120 + task.task_id % 5 * 60;
    #[allow(clippy::cast_precision_loss)] // small counts
    let usd = (input as f64 * input_price + output as f64 * output_price) / 1e6;
    err.with_model(model)
        .with_tool(&task.action)
        .with_cost(Cost::new(input, output, usd))
}

/// The simulated agent: does a little "work", then fails the way real agents fail.
async fn agent(task: Task, msg: Envelope) -> Result<(), HandlerError> {
    tokio::time::sleep(Duration::from_millis(20 + task.task_id % 80)).await;
    let attempt = msg.attempt;
    let usage = |err| with_usage(&task, err);
    let result = match task.simulate.as_deref() {
        Some("rate_limit") if attempt < task.fail_times => Err(HandlerError::retry(
            "RateLimited",
            format!(
                "429 from model provider: rate limit exceeded for {}, retry in {}s (request req_{:x})",
                task.agent,
                1 + task.task_id % 20,
                task.task_id * 7919 + 0x5eed_0000
            ),
        )),
        Some("tool_timeout") if attempt < task.fail_times => Err(HandlerError::retry(
            "ToolTimeout",
            format!(
                "tool web_search timed out after {} ms",
                30_000 + task.task_id % 7
            ),
        )),
        Some("schema") => Err(HandlerError::poison(
            "SchemaViolation",
            format!(
                "tool call arguments failed validation: field `url` must be a string, got number {}",
                task.task_id
            ),
        )),
        Some("upstream_down") => Err(HandlerError::retry(
            "UpstreamUnavailable",
            format!(
                "vector-db shard {} answered 503 Service Unavailable",
                task.task_id % 8
            ),
        )),
        Some("injection") => Err(HandlerError::poison(
            "PromptInjection",
            format!("refusing task: field `agent` holds markup: {}", task.agent),
        )),
        Some("panic") => panic!(
            "agent state corrupted: plan step {} out of range",
            task.task_id
        ),
        _ => Ok(()),
    };
    result.map_err(usage)
}

pub async fn run(cli: &Cli, args: &DemoArgs) -> Result<ExitCode> {
    let url = match &cli.store {
        Some(url) => url.clone(),
        None => {
            let dir = tempfile::Builder::new()
                .prefix("redrive-demo-")
                .tempdir()
                .context("creating a scratch directory")?
                .keep();
            format!("sqlite://{}", dir.join("demo.db").display())
        }
    };
    outln!("redrive demo: a simulated AI agent on queue {QUEUE}, tiers {TIERS}, store {url}\n");
    let store = backend::open(&url, true)?;
    let queue = QueueName::new(QUEUE)?;
    let policy = RetryPolicy::parse(TIERS)?.with_jitter(0.1)?;
    let lanes = LaneSet {
        queue: queue.clone(),
        tiers: policy.tiers().to_vec(),
    };
    store.create_lanes(&lanes).await?;

    let batch: Vec<Envelope> = tasks(args.tasks)
        .into_iter()
        .map(|p| {
            let env = Envelope::new(queue.clone(), p.clone());
            if p.starts_with(br#"{"task_id":9001"#) {
                env.with_header("x-note", "<script>alert(1)</script>")
            } else {
                env
            }
        })
        .collect();
    let batch_len = batch.len();
    store
        .publish(&queue, batch)
        .await
        .context("publishing the demo tasks")?;

    // The triage UI runs during the scenario, so lanes can be watched filling up.
    let metrics = Arc::new(Metrics::new());
    let server = if args.once {
        None
    } else {
        let tokens = super::serve::tokens(None)?;
        let started =
            match super::serve::start(&store, tokens.clone(), Arc::clone(&metrics), args.bind, 5)
                .await
            {
                Ok(s) => s,
                Err(e) if args.bind.port() == 8080 => {
                    tracing::debug!(error = %e, "port 8080 is taken; using a free port");
                    let any = std::net::SocketAddr::new(args.bind.ip(), 0);
                    super::serve::start(&store, tokens, Arc::clone(&metrics), any, 5).await?
                }
                Err(e) => return Err(e),
            };
        let (app, listener, addr) = started;
        outln!("triage UI: http://{addr}/\n");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(redrive_server::serve(
            app,
            listener,
            Duration::from_secs(1),
            async move {
                let _ = stop_rx.await;
            },
        ));
        Some((addr, stop_tx, task))
    };
    outln!("published {batch_len} agent tasks; consuming with 8 workers…");

    // The simulated agent panics on purpose; keep the terminal readable.
    std::panic::set_hook(Box::new(|info| tracing::debug!(%info, "handler panicked")));
    let config = RunnerConfig {
        concurrency: 8,
        timeout: Duration::from_secs(5),
        lease: Duration::from_secs(10),
        idle_poll: Duration::from_millis(50),
        ..RunnerConfig::default()
    };
    let runner = Runner::new(store.clone(), queue.clone(), policy.clone(), config)
        .until_idle()
        .observe(Arc::clone(&metrics) as Arc<dyn redrive_runner::Observer>);
    let stats = runner.stats();
    let started = Instant::now();
    let progress = {
        let store = store.clone();
        let lanes = lanes.clone();
        let stats = Arc::clone(&stats);
        tokio::spawn(async move {
            let tty = std::io::stdout().is_terminal();
            let mut tick =
                tokio::time::interval(Duration::from_millis(if tty { 250 } else { 1000 }));
            loop {
                tick.tick().await;
                let Ok(d) = store.queue_depths(&lanes).await else {
                    continue;
                };
                let s = stats.snapshot();
                let retry = d
                    .retry
                    .iter()
                    .map(|(t, n)| format!("{t} {n:>3}"))
                    .collect::<Vec<_>>()
                    .join(" · ");
                let line = format!(
                    "  main {:>4} │ retry {retry} │ dlq {:>3} │ in flight {:>2} │ ok {:>4}",
                    d.main, d.dlq, d.inflight, s.succeeded
                );
                if tty {
                    print!("\r{line}");
                } else {
                    outln!("{line}");
                }
                let _ = std::io::stdout().flush();
            }
        })
    };
    let summary = runner
        .run(json_handler(agent), super::shutdown_signal())
        .await?;
    progress.abort();
    let s = stats.snapshot();
    let _ = std::panic::take_hook();
    outln!(
        "\n\ndone in {:.1}s: {} deliveries, {} ok, {} retried, {} dead-lettered ({})",
        started.elapsed().as_secs_f64(),
        summary.delivered,
        s.succeeded,
        s.retried,
        s.dead,
        summary.reason
    );

    let groups = store.groups(&DeadFilter::default(), 50).await?;
    outln!("\nthe DLQ, grouped by error fingerprint:\n");
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            vec![
                g.fingerprint.clone(),
                g.count.to_string(),
                g.error_class.clone(),
                g.attempts.to_string(),
                g.spent.to_string(),
                one_line(&g.sample_error, 60),
            ]
        })
        .collect();
    table(
        &[
            "FINGERPRINT",
            "COUNT",
            "CLASS",
            "ATTEMPTS",
            "SPENT ON FAILURES",
            "SAMPLE ERROR",
        ],
        &rows,
    );
    let mut spent = Cost::default();
    groups.iter().for_each(|g| spent.add(g.spent));
    outln!("\nthe dead messages' failed attempts cost {spent}, as the agent reported them.");

    let sample = store.list(&DeadFilter::default(), None, 1).await?;
    let id = sample
        .first()
        .map_or_else(|| "ID".to_owned(), |d| d.envelope.id.to_string());
    let fp = groups.first().map_or("FP", |g| g.fingerprint.as_str());
    outln!(
        "\nthe store is kept; look around:\n\
         \n  redrive --store {url} queues\
         \n  redrive --store {url} dlq list --group\
         \n  redrive --store {url} dlq show {id}\
         \n  redrive --store {url} dlq replay --queue {QUEUE} --fingerprint {fp} --dry-run\
         \n  redrive --store {url} dlq replay --all\
         \n  redrive --store {url} consume {QUEUE} --exec 'cat >/dev/null' --until-idle"
    );
    if let Some((addr, stop, task)) = server {
        outln!(
            "\nthe agent has stopped; replayed messages wait in main until a consumer runs.\n\
             triage UI: http://{addr}/ (serving until Ctrl-C)"
        );
        super::shutdown_signal().await;
        let _ = stop.send(());
        let _ = task.await;
    }
    store.close();
    Ok(ExitCode::SUCCESS)
}
