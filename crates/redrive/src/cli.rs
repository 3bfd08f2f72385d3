//! The command line, as clap types. Parsing only: behaviour lives in `cmd/`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The store used when neither `--store` nor `REDRIVE_STORE` says otherwise.
pub const DEFAULT_STORE: &str = "sqlite://redrive.db";

#[derive(Debug, Parser)]
#[command(
    name = "redrive",
    version,
    about = "Three-lane reliability for message consumers: main → retry tiers → dead-letter queue",
    long_about = "Three-lane reliability for message consumers and AI agents.\n\n\
        Messages flow main → retry tiers with growing delays (5s, 30s, 5m by default) → a \
        dead-letter queue. Transient failures are retried, poison messages are quarantined at \
        once, and dead messages can be listed, grouped by error, and replayed.\n\n\
        Try `redrive demo` to see it all in under a minute.",
    propagate_version = true
)]
pub struct Cli {
    /// Where lanes and dead letters live: sqlite://PATH[?durability=full|relaxed]
    /// [default: sqlite://redrive.db], or a PostgreSQL schema shared by any number of
    /// hosts (lanes too without --broker; with it, dead letters, alert state and the audit
    /// log):
    /// postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?schema=NAME&pool=N&sslmode=MODE&sslrootcert=FILE]
    /// (sslmode as libpq: disable, prefer, require, verify-ca, verify-full)
    #[arg(long, global = true, env = "REDRIVE_STORE", value_name = "URL")]
    pub store: Option<String>,

    /// A broker for the lanes: redis://HOST:PORT[?namespace=NAME],
    /// nats://HOST:PORT[?namespace=NAME&replicas=N&storage=file|memory&max_deliver=N&ids=header|subject],
    /// kafka://HOST:PORT[,HOST:PORT…][?OPTIONS] (OPTIONS: group=, prefix=, partitions=,
    /// replication=, ordered=true for strict per-key order with retries in place, and
    /// librdkafka settings such as security.protocol=SASL_SSL) or sqs://REGION[?prefix=NAME&wait=SECONDS] (AWS
    /// credentials from the standard environment / profile chain; queue agent.tasks is
    /// the SQS queue agent-tasks), or postgres://… (lanes and dead letters in one
    /// PostgreSQL schema, as --store takes it). Without it, lanes live in --store. With
    /// it, --store holds the dead-letter store of record.
    #[arg(long, global = true, env = "REDRIVE_BROKER", value_name = "URL")]
    pub broker: Option<String>,

    /// With --broker sqs://…: an SQS-compatible endpoint instead of AWS's (e.g.
    /// http://127.0.0.1:9324 for a local server). AWS_ENDPOINT_URL works too.
    #[arg(long, global = true, value_name = "URL")]
    pub sqs_endpoint: Option<String>,

    /// Configuration file [default: ./redrive.toml when it exists]. See redrive.example.toml.
    #[arg(long, global = true, env = "REDRIVE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The loaded configuration (not a flag).
    #[arg(skip)]
    pub loaded: crate::config::Config,

    /// Log filter (error, warn, info, debug, or a tracing filter such as redrive=debug);
    /// logs go to stderr.
    #[arg(long, global = true, env = "REDRIVE_LOG", value_name = "FILTER")]
    pub log: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The broker: `--broker` / `REDRIVE_BROKER`, else the config file's, else none.
    pub fn broker_url(&self) -> Option<&str> {
        self.broker.as_deref().or(self.loaded.broker.as_deref())
    }

    /// The store: `--store` / `REDRIVE_STORE`, else the config file's, else the default.
    pub fn store_url(&self) -> &str {
        self.store
            .as_deref()
            .or(self.loaded.store.as_deref())
            .unwrap_or(DEFAULT_STORE)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publish messages to a queue's main lane, one per line of input.
    Publish(PublishArgs),
    /// Consume a queue, handing each message to a command or a webhook.
    Consume(ConsumeArgs),
    /// Show the depth of every lane of every queue.
    Queues(QueuesArgs),
    /// Inspect, replay, purge and export dead messages.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Serve the triage web UI, the JSON API (/api/v1) and Prometheus /metrics.
    Serve(ServeArgs),
    /// Run the whole thing on a scratch store with a simulated, flaky AI agent.
    Demo(DemoArgs),
    /// Measure end-to-end throughput, retry lateness and memory on this machine.
    Bench(BenchArgs),
    /// Check a configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run retention once: compress warm dead messages, archive old ones.
    #[command(subcommand)]
    Retention(RetentionCommand),
    /// Work with archive files.
    #[command(subcommand)]
    Archive(ArchiveCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file and list every problem with its line.
    Check {
        /// The file [default: --config, else ./redrive.toml].
        file: Option<PathBuf>,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RetentionCommand {
    /// One sweep now: hot → warm (compress), warm → archive (write, sync, delete).
    Run {
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ArchiveCommand {
    /// Import archive files (.jsonl.zst) back into the store as dead messages.
    Import {
        /// Archive files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The queue, e.g. agent.tasks.
    pub queue: String,
    /// Read messages from this file instead of standard input.
    #[arg(long, short, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Key for every message (partitioning and ordering on brokers that use one).
    #[arg(long, short, value_name = "KEY")]
    pub key: Option<String>,
    /// A header for every message, as NAME=VALUE; repeat for more.
    #[arg(long = "header", short = 'H', value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Largest payload accepted (bytes, or with KiB / MiB).
    #[arg(long, default_value = "1MiB", value_name = "SIZE")]
    pub max_payload: String,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("handler").required(true).args(["exec", "webhook", "worker"]))]
pub struct ConsumeArgs {
    /// The queue, e.g. agent.tasks.
    pub queue: String,
    /// Run this shell command per message: payload on stdin; exit 0 ok, 65 poison,
    /// 75 or any other non-zero retry. Sets REDRIVE_ID, REDRIVE_QUEUE, REDRIVE_ATTEMPT,
    /// REDRIVE_KEY and REDRIVE_HEADER_<NAME>; a JSON result written to the file
    /// REDRIVE_RESULT_FILE names ({"outcome": "retry", "retry_after": 30, …}) decides
    /// instead of the exit status.
    #[arg(long, value_name = "CMD")]
    pub exec: Option<String>,
    /// POST each payload to this URL: 2xx ok, 5xx/408/429 retry (Retry-After honoured),
    /// other 4xx poison; a JSON body with an "outcome" decides instead.
    #[arg(long, value_name = "URL")]
    pub webhook: Option<String>,
    /// Start this shell command as long-lived worker processes and hand them messages
    /// as JSON lines on stdin, reading one result line each from stdout (stderr is the
    /// worker's log). The protocol: docs/worker-protocol.md; helpers for Python and
    /// TypeScript: clients/.
    #[arg(long, value_name = "CMD")]
    pub worker: Option<String>,
    /// With --worker: how many worker processes [default: 1]. --concurrency bounds the
    /// messages in flight over all of them.
    #[arg(long, value_name = "N", requires = "worker", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,
    /// Messages handled at once [default: the queue's config, else 8].
    #[arg(long, short, value_name = "N")]
    pub concurrency: Option<usize>,
    /// Retry tiers: delays with ms, s, m, h or d; max attempts = tiers + 1
    /// [default: the queue's config, else 5s,30s,5m].
    #[arg(long, value_name = "LIST")]
    pub tiers: Option<String>,
    /// Random extra delay per retry, as a fraction of the tier (0 turns it off).
    #[arg(long, default_value_t = 0.1, value_name = "FRACTION")]
    pub jitter: f64,
    /// Longest a handler may run; past it the attempt counts as failed
    /// [default: the queue's config, else 60s].
    #[arg(long, value_name = "DUR")]
    pub timeout: Option<String>,
    /// Lease per delivery, renewed while the handler runs. After a crash, messages
    /// return when it expires.
    #[arg(long, default_value = "30s", value_name = "DUR")]
    pub lease: String,
    /// On SIGINT/SIGTERM, how long in-flight messages may finish before they are
    /// released for redelivery.
    #[arg(long, default_value = "10s", value_name = "DUR")]
    pub grace: String,
    /// Stop after this many deliveries.
    #[arg(long, value_name = "N")]
    pub max_messages: Option<u64>,
    /// Exit once main, every retry lane and the isolation lane are empty and nothing is
    /// in flight.
    #[arg(long)]
    pub until_idle: bool,
    /// Largest payload handed to the handler (bytes, or with KiB / MiB); a larger one is
    /// dead-lettered as MalformedEnvelope without running the handler.
    #[arg(long, default_value = "16MiB", value_name = "SIZE")]
    pub max_payload: String,
    /// How often an idle consumer looks for new messages.
    #[arg(long, default_value = "100ms", value_name = "DUR")]
    pub poll: String,
    /// The outage breaker: once at least N distinct messages failed with retryable
    /// errors (retry, timeout) and PERCENT of attempts failed within WINDOW, stop taking
    /// messages, count no failure against its message, and probe with one message after
    /// 5 s, 10 s, 20 s … (at most 2 m) until one succeeds. `off` turns it off.
    #[arg(
        long,
        default_value = "20,80%,30s",
        value_name = "N,PERCENT,WINDOW|off"
    )]
    pub breaker: String,
    /// Expose this worker's Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics_bind: Option<std::net::SocketAddr>,
    /// Print the final summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on [default: server.bind of the config, else 127.0.0.1:8080].
    /// Anything but loopback needs an access token.
    #[arg(long, value_name = "ADDR")]
    pub bind: Option<std::net::SocketAddr>,
    /// File of access tokens, one per line: `operator TOKEN [NAME]` or
    /// `viewer TOKEN [NAME]`. Tokens also come from REDRIVE_TOKEN (operator) and
    /// REDRIVE_VIEWER_TOKEN (read-only).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// How often to sample DLQ depth for the overview chart.
    #[arg(long, default_value = "10s", value_name = "DUR")]
    pub sample_every: String,
    /// Messages already replayed this many times stay dead.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub max_replays: u32,
    /// Mark the UI's session cookie `Secure`, so browsers send it only over HTTPS: set it
    /// when users reach the UI through a TLS-terminating proxy.
    #[arg(long)]
    pub cookie_secure: bool,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct QueuesArgs {
    #[command(subcommand)]
    pub command: Option<QueuesCommand>,
    /// One JSON object per queue and line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum QueuesCommand {
    /// Create every lane of each queue (main, retry tiers, isolation lane, DLQ) on the
    /// store or broker, so that producers can publish before any consumer ran. Existing
    /// lanes are left as they are.
    Create(CreateQueuesArgs),
}

#[derive(Debug, Args)]
pub struct CreateQueuesArgs {
    /// The queues, e.g. agent.tasks.
    #[arg(required = true, value_name = "QUEUE")]
    pub queues: Vec<String>,
    /// Retry tiers [default: each queue's config, else 5s,30s,5m].
    #[arg(long, value_name = "LIST")]
    pub tiers: Option<String>,
    /// Print one JSON object per queue created.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead messages, or their groups by error fingerprint.
    List(ListArgs),
    /// Show one dead message: payload, headers and attempt history.
    Show(ShowArgs),
    /// Move dead messages back to their queue's main lane (or another queue).
    Replay(ReplayArgs),
    /// Delete dead messages for good.
    Purge(PurgeArgs),
    /// Write dead messages as JSON lines to standard output.
    Export(ExportArgs),
    /// List replay jobs (started with `replay --canary` or `--ordered`), newest first.
    Jobs(JobsArgs),
    /// Show, pause, resume or cancel one replay job.
    #[command(subcommand)]
    Job(JobCommand),
}

#[derive(Debug, Args, Clone, Default)]
pub struct FilterArgs {
    /// Only this error fingerprint.
    #[arg(long, value_name = "FP")]
    pub fingerprint: Option<String>,
    /// Only this error class.
    #[arg(long, value_name = "CLASS")]
    pub class: Option<String>,
    /// Only messages whose error or payload contains this text.
    #[arg(long, value_name = "TEXT")]
    pub grep: Option<String>,
    /// Only messages dead for at most this long (e.g. 1h).
    #[arg(long, value_name = "DUR")]
    pub since: Option<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this queue.
    pub queue: Option<String>,
    /// Group by error fingerprint.
    #[arg(long)]
    pub group: bool,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Most messages (or groups) to list.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub limit: usize,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The message id (redrive-id).
    pub id: String,
    /// As one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args, Clone)]
pub struct SelectArgs {
    /// Message ids.
    #[arg(conflicts_with_all = ["queue", "all"])]
    pub ids: Vec<String>,
    /// Every dead message of this queue (narrow with --fingerprint, --class, --grep).
    #[arg(long, value_name = "QUEUE")]
    pub queue: Option<String>,
    /// Every dead message of every queue.
    #[arg(long, conflicts_with = "queue")]
    pub all: bool,
    #[command(flatten)]
    pub filter: FilterArgs,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub select: SelectArgs,
    /// Replay into this queue instead of each message's own.
    #[arg(long, value_name = "QUEUE")]
    pub to: Option<String>,
    /// Report what would move, move nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Messages already replayed this many times stay dead (stops replay loops).
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub max_replays: u32,
    /// Why (written to the audit log).
    #[arg(long, default_value = "", value_name = "TEXT")]
    pub reason: String,
    /// Replay as a job that sends N messages first (or a percentage: 10%), waits for
    /// their outcome from the consumer, and goes on only if at most --max-failed of them
    /// failed again; otherwise it pauses with the rest still dead. Needs a consumer
    /// running on the target queue.
    #[arg(long, value_name = "N|PERCENT")]
    pub canary: Option<String>,
    /// With --canary: the most re-failures tolerated, among the canaries and then among
    /// all outcomes so far, before the job pauses.
    #[arg(long, default_value = "0%", value_name = "PERCENT")]
    pub max_failed: String,
    /// Replay as a job that sends each key's messages one at a time in their original
    /// order, each only after the one before it succeeded; keys go in parallel. A message
    /// that fails again holds its key's later messages (they stay dead). Needs a consumer
    /// running on the target queue.
    #[arg(long)]
    pub ordered: bool,
    /// A job pauses when its moved messages get no outcome for this long.
    #[arg(long, default_value = "10m", value_name = "DUR")]
    pub outcome_wait: String,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    /// Most jobs listed, newest first.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub limit: usize,
    /// Print one JSON object per job.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Show a job: its state, counts, and the messages that failed again or are held.
    Show(JobIdArgs),
    /// Stop a running job after its current step; `resume` goes on.
    Pause(JobIdArgs),
    /// Run a paused (or interrupted) job on from where it stopped, in the foreground.
    Resume(ResumeArgs),
    /// Stop a job for good; what it has not moved stays dead.
    Cancel(JobIdArgs),
}

#[derive(Debug, Args)]
pub struct JobIdArgs {
    /// The job's id (`rj-…`, from `dlq jobs`).
    #[arg(value_name = "JOB")]
    pub id: String,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    #[command(flatten)]
    pub job: JobIdArgs,
    /// The job pauses when its moved messages get no outcome for this long.
    #[arg(long, default_value = "10m", value_name = "DUR")]
    pub outcome_wait: String,
}

#[derive(Debug, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub select: SelectArgs,
    /// Do not ask for confirmation.
    #[arg(long, short)]
    pub yes: bool,
    /// Why (written to the audit log).
    #[arg(long, default_value = "", value_name = "TEXT")]
    pub reason: String,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Only this queue.
    #[arg(long, value_name = "QUEUE")]
    pub queue: Option<String>,
    #[command(flatten)]
    pub filter: FilterArgs,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Exit when the scenario ends instead of serving the UI until interrupted.
    #[arg(long)]
    pub once: bool,
    /// Where the demo's UI listens (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub bind: std::net::SocketAddr,
    /// How many agent tasks to publish.
    #[arg(long, default_value_t = 300, value_name = "N")]
    pub tasks: usize,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure: `consume` (end-to-end throughput beside a plain SQLite queue
    /// lifecycle, retry lateness under load and at low load, memory), `lateness` (how
    /// late retries start at low load: 200 messages in rounds of 20, 700 ms apart, each
    /// failing once into a 1 s tier; on the embedded store or the backend of --broker), `triage` (response times of the UI and API over a large DLQ) or `crash-loop`
    /// (messages that kill their consumer among good ones: what reaches the DLQ, and
    /// how much longer the queue takes than without them), `handlers` (a no-op handler
    /// in process, as --worker Python and TypeScript helpers, as a --webhook and as
    /// --exec, side by side: needs python3 and node) or `crash-points` (the
    /// process killed at every step boundary, in turn: what was lost, and what each
    /// crash cost in extra deliveries; on the backend of --store / --broker).
    #[arg(long, default_value = "consume", value_name = "SCENARIO")]
    pub scenario: String,
    /// For `crash-loop`: how many messages kill their consumer.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub killers: usize,
    /// For `crash-points`: how many times to kill the process, spread over the points
    /// (needs a build with `--features redrive/failpoints`).
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub kills: usize,
    /// For `triage`: how many dead messages to load.
    #[arg(long, default_value_t = 100_000, value_name = "N")]
    pub dead: usize,
    /// Messages to publish and consume.
    #[arg(long, short = 'n', default_value_t = 50_000, value_name = "N")]
    pub messages: usize,
    /// Handlers running at once.
    #[arg(long, short, default_value_t = 50, value_name = "N")]
    pub concurrency: usize,
    /// Retry tiers for the 10% that fail once.
    #[arg(long, default_value = "50ms,100ms,200ms", value_name = "LIST")]
    pub tiers: String,
    /// full (fsync every commit, the default) or relaxed.
    #[arg(long, default_value = "full", value_name = "MODE")]
    pub durability: String,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}
