//! `redrive-bench URL`: redrive on a broker beside the plain client a team would write
//! by hand for it, over the same messages, on the same broker, in the same run.
//!
//! - `nats://…`: no-failure throughput beside an async-nats pull consumer (bare, and
//!   with an id on each message as redrive carries one).
//! - `kafka://…`: no-failure throughput beside an rdkafka consumer (bare, with an id
//!   header, and reading that header).
//! - `sqs://…`: no-failure throughput and API calls per message beside an aws-sdk-sqs
//!   loop.
//! - `redis://…` and `postgres://…`: redrive alone under the scenario that
//!   `bench/redis-vs-bullmq.sh` runs BullMQ through and `bench/postgres-vs-pgboss.sh`
//!   pg-boss (10% fail once, 1% always fail).
//!
//! The figures and what limits each are in BENCHMARKS.md. The user-facing benches
//! (embedded throughput, triage, crash loops, crash points) are `redrive bench`.

mod failing;
mod kafka;
mod measure;
mod nats;
mod sqs;

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Parser;

/// redrive beside each broker's plain client, in one run.
#[derive(Debug, Parser)]
#[command(name = "redrive-bench", version)]
pub struct Args {
    /// The broker: nats://, kafka://, sqs://, redis:// or postgres:// (with redrive's options, as
    /// `redrive --broker` takes them).
    #[arg(value_name = "URL")]
    pub broker: String,
    /// Messages to publish and consume.
    #[arg(long, short = 'n', default_value_t = 50_000, value_name = "N")]
    pub messages: usize,
    /// Handlers running at once on redrive's side.
    #[arg(long, short, default_value_t = 50, value_name = "N")]
    pub concurrency: usize,
    /// For redis:// and postgres://: the retry tiers of the jobs that fail.
    #[arg(long, default_value = "50ms,100ms,200ms", value_name = "LIST")]
    pub tiers: String,
    /// For sqs://: an SQS-compatible endpoint instead of AWS's (AWS_ENDPOINT_URL works
    /// too).
    #[arg(long, value_name = "URL")]
    pub sqs_endpoint: Option<String>,
    /// For nats://, kafka:// and sqs://: run redrive and the plain client this many
    /// times, alternating, and print the median ratio as well. On a shared machine one
    /// round's ratio is noise-prone, the median of several less so.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub rounds: u16,
    /// One JSON object per round (then one with the median).
    #[arg(long)]
    pub json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<()> {
    let url = args.broker.as_str();
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    if matches!(scheme, "redis" | "rediss" | "postgres" | "postgresql") {
        if args.rounds > 1 {
            bail!(
                "--rounds applies to the nats://, kafka:// and sqs:// benches; the Redis and \
                 PostgreSQL benches are compared with BullMQ and pg-boss by the scripts in bench/"
            );
        }
        return if scheme.starts_with("redis") {
            failing::redis(url, args).await
        } else {
            failing::postgres(url, args).await
        };
    }
    let mut ratios = Vec::with_capacity(usize::from(args.rounds));
    for _ in 0..args.rounds {
        ratios.push(match scheme {
            "nats" => nats::run(url, args).await?,
            "kafka" => kafka::run(url, args).await?,
            "sqs" => sqs::run(url, args.sqs_endpoint.as_deref(), args).await?,
            _ => bail!(
                "unsupported broker {url:?}: use nats://, kafka://, sqs://, redis:// or \
                 postgres://"
            ),
        });
    }
    if ratios.len() > 1 {
        let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        let median = measure::median(&mut ratios);
        if args.json {
            measure::json_line(
                &serde_json::json!({ "rounds": ratios.len(), "median_ratio": median }),
            );
        } else {
            println!(
                "median ratio over {} rounds: {median:.2}x (each: {})",
                ratios.len(),
                each.join(", ")
            );
        }
    }
    Ok(())
}
