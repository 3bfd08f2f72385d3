//! Replay jobs from the command line: `dlq replay --canary/--ordered` starts one and
//! follows it; `dlq jobs` lists them; `dlq job show|pause|resume|cancel` acts on one.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use redrive_core::{DeadSelection, ItemState, JobState, JobView, QueueName, ReplayJobs};
use redrive_runner::{Canary, JobOptions, JobSpec, run_job, start_job};
use redrive_server::json::{JobDetailJson, JobItemJson, JobJson};

use super::{actor, duration_flag};
use crate::backend::{self, AnyBackend};
use crate::cli::{Cli, JobCommand, JobIdArgs, JobsArgs, ReplayArgs};
use crate::output::{json_line, outln, rfc3339};

/// Exit status of a job that stopped paused (by its canaries, its failure rate, a
/// missing consumer or a person): scripts can tell it from done (0) and from errors (1).
const PAUSED: u8 = 3;

/// Who runs a job from here, as `dlq jobs` shows it.
fn owner() -> String {
    redrive_runner::this_process(&actor())
}

/// `--canary`: a count (`5`) or a percentage (`10%`).
fn parse_canary(spec: Option<&str>) -> Result<Canary> {
    let Some(spec) = spec else {
        return Ok(Canary::None);
    };
    let bad = || {
        anyhow::anyhow!(
            "invalid --canary {spec:?}: expected a number of messages (5) or a percentage (10%)"
        )
    };
    let spec = spec.trim();
    if let Some(p) = spec.strip_suffix('%') {
        let p: f64 = p.trim().parse().map_err(|_| bad())?;
        anyhow::ensure!(p > 0.0 && p <= 100.0, bad());
        return Ok(Canary::Percent(p));
    }
    let n: u64 = spec.parse().map_err(|_| bad())?;
    anyhow::ensure!(n >= 1, bad());
    Ok(Canary::Count(n))
}

fn parse_percent(flag: &str, spec: &str) -> Result<f64> {
    spec.trim()
        .trim_end_matches('%')
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|p| (0.0..=100.0).contains(p))
        .with_context(|| format!("invalid {flag} {spec:?}: expected a percentage from 0% to 100%"))
}

pub async fn replay(cli: &Cli, args: &ReplayArgs, selection: DeadSelection) -> Result<ExitCode> {
    let spec = JobSpec {
        actor: actor(),
        reason: args.reason.clone(),
        to: args.to.as_deref().map(QueueName::new).transpose()?,
        max_replays: args.max_replays,
        canary: parse_canary(args.canary.as_deref())?,
        max_failed_percent: parse_percent("--max-failed", &args.max_failed)?,
        ordered: args.ordered,
        rate_per_sec: None,
    };
    let options = JobOptions {
        outcome_wait: duration_flag("--outcome-wait", &args.outcome_wait)?,
        owner: owner(),
        ..JobOptions::default()
    };
    let store = backend::open_any(cli, false).await?;
    let started = start_job(&store, &selection, &spec)
        .await
        .context("starting the replay job")?;
    if started.counts.total == 0 {
        store
            .set_job_state(
                &started.job.id,
                &[JobState::Running],
                JobState::Done,
                "no dead message matched",
            )
            .await?;
    }
    if !args.json {
        let v = &started;
        outln!(
            "replay job {} started: {} message(s){}{}",
            v.job.id,
            v.counts.total,
            if v.job.canary > 0 {
                format!(
                    ", {} canar{} first",
                    v.job.canary,
                    if v.job.canary == 1 { "y" } else { "ies" }
                )
            } else {
                String::new()
            },
            if v.job.ordered {
                ", ordered by key"
            } else {
                ""
            }
        );
    }
    follow(&store, &started.job.id, &options, args.json).await
}

/// Runs a job in the foreground, showing progress, and reports how it stopped.
async fn follow(
    store: &AnyBackend,
    id: &str,
    options: &JobOptions,
    json: bool,
) -> Result<ExitCode> {
    let mut shown = Progress::new(!json && std::io::stderr().is_terminal());
    let run = run_job(store, store, id, options, |v| shown.show(v));
    let stopped = tokio::select! {
        r = run => r.context("running the replay job")?,
        () = super::shutdown_signal() => {
            shown.finish();
            // Paused, so no `serve` takes it up behind the person who stopped it.
            let note = format!("interrupted in the terminal by {}", actor());
            store.set_job_state(id, &[JobState::Running], JobState::Paused, &note).await?;
            store.claim_job(id, &options.owner, 0).await?;
            eprintln!("interrupted: job {id} is paused (nothing is lost); go on with: redrive dlq job resume {id}");
            return Ok(ExitCode::from(130));
        }
    };
    shown.finish();
    if json {
        json_line(&JobJson::from(&stopped));
    } else {
        let c = &stopped.counts;
        outln!(
            "job {}: {} ({} ok, {} failed again, {} held, {} skipped, {} moved awaiting outcome, {} not moved)",
            stopped.job.id,
            stopped.state.as_str(),
            c.ok,
            c.failed,
            c.held,
            c.skipped,
            c.moved,
            c.pending
        );
        if !stopped.note.is_empty() {
            outln!("  {}", stopped.note);
        }
        if stopped.state == JobState::Paused {
            outln!(
                "  see: redrive dlq job show {0}; then: redrive dlq job resume {0} (or cancel)",
                stopped.job.id
            );
        }
    }
    store.store().close();
    Ok(match stopped.state {
        JobState::Paused => ExitCode::from(PAUSED),
        _ => ExitCode::SUCCESS,
    })
}

/// Progress on standard error: a bar redrawn in place on a terminal, a line per change
/// otherwise.
struct Progress {
    tty: bool,
    last: String,
    drawn: bool,
}

impl Progress {
    fn new(tty: bool) -> Self {
        Self {
            tty,
            last: String::new(),
            drawn: false,
        }
    }

    fn show(&mut self, v: &JobView) {
        let c = &v.counts;
        let done = c.ok + c.failed + c.held + c.skipped;
        let phase = if v.job.canary_passed {
            ""
        } else {
            " (canaries)"
        };
        let text = format!(
            "{}/{} settled: {} ok, {} failed again, {} held; {} moved awaiting outcome{phase}",
            done, c.total, c.ok, c.failed, c.held, c.moved
        );
        if text == self.last {
            return;
        }
        if self.tty {
            let width = 24usize;
            let filled = if c.total == 0 {
                width
            } else {
                (done as usize * width) / c.total as usize
            };
            eprint!(
                "\r\x1b[2K[{}{}] {text}",
                "#".repeat(filled),
                "-".repeat(width - filled)
            );
            let _ = std::io::stderr().flush();
            self.drawn = true;
        } else {
            eprintln!("{text}");
        }
        self.last = text;
    }

    fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

pub async fn list(cli: &Cli, args: &JobsArgs) -> Result<ExitCode> {
    let store = backend::open_any(cli, false).await?;
    let jobs = store
        .jobs(None, args.limit)
        .await
        .context("listing replay jobs")?;
    if args.json {
        for v in &jobs {
            json_line(&JobJson::from(v));
        }
        return Ok(ExitCode::SUCCESS);
    }
    if jobs.is_empty() {
        outln!("no replay jobs");
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{:<35} {:<9} {:>7} {:>6} {:>6} {:>6} {:>6}  {:<24}  NOTE",
        "JOB",
        "STATE",
        "TOTAL",
        "OK",
        "FAILED",
        "HELD",
        "MOVED",
        "STARTED"
    );
    for v in &jobs {
        let c = &v.counts;
        outln!(
            "{:<35} {:<9} {:>7} {:>6} {:>6} {:>6} {:>6}  {:<24}  {}",
            v.job.id,
            v.state.as_str(),
            c.total,
            c.ok,
            c.failed,
            c.held,
            c.moved,
            rfc3339(v.job.created_at_ms),
            if v.state == JobState::Running && v.runner.is_none() {
                "nobody runs it (its process stopped): resume or cancel it".to_owned()
            } else {
                crate::output::one_line(&v.note, 80)
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn one(store: &AnyBackend, id: &str) -> Result<JobView> {
    match store.jobs(Some(id), 1).await?.pop() {
        Some(v) => Ok(v),
        None => bail!("no replay job {id:?} (list them with: redrive dlq jobs)"),
    }
}

pub async fn job(cli: &Cli, command: &JobCommand) -> Result<ExitCode> {
    let store = backend::open_any(cli, false).await?;
    match command {
        JobCommand::Show(args) => show(&store, args).await,
        JobCommand::Pause(args) => {
            let v = one(&store, &args.id).await?;
            let note = format!("paused by {}", actor());
            let changed = store
                .set_job_state(&args.id, &[JobState::Running], JobState::Paused, &note)
                .await?;
            anyhow::ensure!(
                changed,
                "job {} is {}, not running: nothing to pause",
                args.id,
                v.state.as_str()
            );
            report_state(&one(&store, &args.id).await?, args.json);
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Cancel(args) => {
            let v = one(&store, &args.id).await?;
            let note = format!("cancelled by {}; what was not moved stays dead", actor());
            let changed = store
                .set_job_state(
                    &args.id,
                    &[JobState::Running, JobState::Paused],
                    JobState::Cancelled,
                    &note,
                )
                .await?;
            anyhow::ensure!(changed, "job {} is already {}", args.id, v.state.as_str());
            report_state(&one(&store, &args.id).await?, args.json);
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Resume(args) => {
            let id = &args.job.id;
            let v = one(&store, id).await?;
            if v.state.is_final() {
                bail!("job {id} is {}: it cannot go on", v.state.as_str());
            }
            if !redrive_runner::resume_job(&store, id, &actor()).await? {
                bail!("job {id} is {}: it cannot go on", v.state.as_str());
            }
            let options = JobOptions {
                outcome_wait: duration_flag("--outcome-wait", &args.outcome_wait)?,
                owner: owner(),
                ..JobOptions::default()
            };
            follow(&store, id, &options, args.job.json).await
        }
    }
}

fn report_state(v: &JobView, json: bool) {
    if json {
        json_line(&JobJson::from(v));
    } else {
        outln!("job {}: {} ({})", v.job.id, v.state.as_str(), v.note);
    }
}

async fn show(store: &AnyBackend, args: &JobIdArgs) -> Result<ExitCode> {
    let v = one(store, &args.id).await?;
    let mut items = Vec::new();
    let mut after = None;
    loop {
        let page = store.job_items(&args.id, after, 10_000).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.seq);
        items.extend(page.into_iter().filter(redrive_core::JobItem::is_notable));
    }
    if args.json {
        json_line(&JobDetailJson {
            job: JobJson::from(&v),
            messages: items.iter().map(JobItemJson::from).collect(),
        });
        return Ok(ExitCode::SUCCESS);
    }
    let c = &v.counts;
    outln!("job {}  {}", v.job.id, v.state.as_str());
    outln!(
        "  started   {} by {}{}",
        rfc3339(v.job.created_at_ms),
        v.job.actor,
        if v.job.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", v.job.reason)
        }
    );
    outln!(
        "  selection {}{}",
        v.job.selection,
        v.job
            .to
            .as_deref()
            .map(|t| format!(" -> {t}"))
            .unwrap_or_default()
    );
    outln!(
        "  mode      {}{}",
        if v.job.ordered {
            "ordered by key"
        } else {
            "unordered"
        },
        if v.job.canary > 0 {
            format!(
                ", {} canaries ({}), at most {}% failing again",
                v.job.canary,
                if v.job.canary_passed {
                    "passed"
                } else {
                    "not passed"
                },
                v.job.max_failed_percent
            )
        } else {
            String::new()
        }
    );
    outln!(
        "  messages  {} total: {} ok, {} failed again, {} held, {} skipped, {} moved awaiting outcome, {} not moved",
        c.total,
        c.ok,
        c.failed,
        c.held,
        c.skipped,
        c.moved,
        c.pending
    );
    if !v.note.is_empty() {
        outln!("  note      {}", v.note);
    }
    if let Some(runner) = &v.runner {
        outln!("  run by    {runner}");
    }
    for i in &items {
        outln!(
            "  {} {:<8}{} {}{}",
            i.id,
            i.state.as_str(),
            if i.canary { " (canary)" } else { "" },
            i.key
                .as_deref()
                .map(|k| format!("key {k}: "))
                .unwrap_or_default(),
            crate::output::one_line(&i.detail, 160)
        );
        if i.state == ItemState::Failed && !i.was.is_empty() {
            outln!("      was: {}", crate::output::one_line(&i.was, 160));
        }
    }
    Ok(ExitCode::SUCCESS)
}
