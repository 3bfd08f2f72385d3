//! `redrive bench --scenario handlers`: what each way of reaching an agent costs, side
//! by side in one run on the embedded store, with a handler that does nothing: the
//! runner calling a Rust closure in process, `--worker` with the Python and the
//! TypeScript helpers, `--webhook` to a local Python HTTP server, and `--exec` starting
//! `python3` per message. Each side gets a fresh store and the same messages; `--exec`
//! gets fewer (it is two orders of magnitude slower), its rate is per message all the
//! same.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use redrive_core::{Envelope, QueueName, RetryPolicy, Transport};
use redrive_runner::{Handler, Runner, RunnerConfig, handler_fn};
use redrive_sidecar::{ExecHandler, WebhookHandler, WorkerHandler};
use redrive_sqlite::SqliteConfig;
use serde::Serialize;

use crate::cli::BenchArgs;
use crate::output::{json_line, outln, table};

/// The helpers, as the repository ships them: written next to the bench's scripts so
/// the bench runs from anywhere.
const PYTHON_HELPER: &str =
    include_str!("../../../../clients/python/src/redrive_worker/__init__.py");
const TYPESCRIPT_HELPER: &str = include_str!("../../../../clients/typescript/index.js");

/// The most messages `--exec` is given: a process per message.
const EXEC_MESSAGES: usize = 300;

#[derive(Serialize)]
struct Side {
    side: &'static str,
    messages: usize,
    secs: f64,
    msgs_per_sec: f64,
    /// This side's rate over the in-process one.
    of_in_process: f64,
}

pub async fn run(args: &BenchArgs) -> Result<ExitCode> {
    anyhow::ensure!(args.messages > 0, "invalid --messages 0");
    let dir = tempfile::Builder::new()
        .prefix("redrive-bench-handlers-")
        .tempdir()
        .context("creating a scratch directory")?;
    let d = dir.path();
    std::fs::create_dir_all(d.join("redrive_worker"))?;
    std::fs::write(d.join("redrive_worker/__init__.py"), PYTHON_HELPER)?;
    std::fs::write(d.join("redrive_worker.mjs"), TYPESCRIPT_HELPER)?;
    std::fs::write(
        d.join("worker.py"),
        format!(
            "import sys\nsys.path.insert(0, {:?})\nimport redrive_worker as rw\n\
             rw.run(lambda msg: None, concurrency={})\n",
            d.display().to_string(),
            args.concurrency
        ),
    )?;
    std::fs::write(
        d.join("worker.mjs"),
        format!(
            "import {{ run }} from './redrive_worker.mjs';\n\
             await run(() => {{}}, {{ concurrency: {} }});\n",
            args.concurrency
        ),
    )?;
    std::fs::write(
        d.join("handler.py"),
        "import sys\nsys.stdin.buffer.read()\n",
    )?;
    std::fs::write(
        d.join("server.py"),
        "import http.server, sys\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   protocol_version = 'HTTP/1.1'\n\
         \x20   def do_POST(self):\n\
         \x20       self.rfile.read(int(self.headers.get('Content-Length', 0)))\n\
         \x20       self.send_response(204)\n\
         \x20       self.send_header('Content-Length', '0')\n\
         \x20       self.end_headers()\n\
         \x20   def log_message(self, *a):\n\
         \x20       pass\n\
         s = http.server.ThreadingHTTPServer(('127.0.0.1', 0), H)\n\
         print(s.server_address[1], flush=True)\n\
         s.serve_forever()\n",
    )?;

    let n = args.messages;
    let mut sides = Vec::new();
    let say = |what: &str| {
        if !args.json {
            eprintln!("{what} …");
        }
    };
    say("in process (a Rust closure)");
    sides.push((
        "in-process",
        n,
        side(d, "a", n, args, handler_fn(|_m: Envelope| async { Ok(()) })).await?,
    ));
    say("--worker, the Python helper");
    let python = WorkerHandler::new(format!("python3 {}", d.join("worker.py").display()), 1);
    sides.push(("worker-python", n, side(d, "b", n, args, python).await?));
    say("--worker, the TypeScript helper");
    let node = WorkerHandler::new(format!("node {}", d.join("worker.mjs").display()), 1);
    sides.push(("worker-typescript", n, side(d, "c", n, args, node).await?));
    say("--webhook, a Python HTTP server");
    let mut server = tokio::process::Command::new("python3")
        .arg(d.join("server.py"))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting python3 for the webhook side")?;
    let port = {
        use tokio::io::AsyncBufReadExt;
        let stdout = server.stdout.take().context("the server's stdout")?;
        let mut line = String::new();
        tokio::io::BufReader::new(stdout)
            .read_line(&mut line)
            .await?;
        line.trim()
            .parse::<u16>()
            .context("the webhook server did not start")?
    };
    let webhook = WebhookHandler::new(
        &format!("http://127.0.0.1:{port}/"),
        Duration::from_secs(30),
    )?;
    sides.push(("webhook-python", n, side(d, "d", n, args, webhook).await?));
    drop(server);
    let few = n.min(EXEC_MESSAGES);
    say("--exec python3 per message");
    let exec = ExecHandler::new(format!("python3 {}", d.join("handler.py").display()));
    sides.push(("exec-python", few, side(d, "e", few, args, exec).await?));

    let base = sides[0].1 as f64 / sides[0].2;
    let rows: Vec<Side> = sides
        .iter()
        .map(|&(side, messages, secs)| Side {
            side,
            messages,
            secs,
            msgs_per_sec: messages as f64 / secs,
            of_in_process: messages as f64 / secs / base,
        })
        .collect();
    if args.json {
        for r in &rows {
            json_line(r);
        }
    } else {
        outln!(
            "redrive bench: handlers, embedded store, no-op handler, concurrency {}",
            args.concurrency
        );
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.side.to_owned(),
                    r.messages.to_string(),
                    format!("{:.0}", r.msgs_per_sec),
                    format!("{:.3}", r.of_in_process),
                ]
            })
            .collect();
        table(&["SIDE", "MESSAGES", "MSGS/S", "OF IN-PROCESS"], &cells);
        let exec = rows[4].msgs_per_sec;
        outln!(
            "worker-python / exec-python: {:.0}x",
            rows[1].msgs_per_sec / exec
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Publishes `n` messages to a fresh store and consumes them with `handler`; returns the
/// seconds from the runner's start to the last settle.
async fn side<H: Handler>(
    dir: &Path,
    name: &str,
    n: usize,
    args: &BenchArgs,
    handler: H,
) -> Result<f64> {
    let store = SqliteConfig::new(dir.join(format!("{name}.db"))).open()?;
    let queue = QueueName::new("bench")?;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let batch = chunk
            .iter()
            .map(|i| Envelope::new(queue.clone(), format!("{{\"n\":{i}}}")))
            .collect();
        store.publish(&queue, batch).await?;
    }
    let config = RunnerConfig {
        concurrency: args.concurrency,
        timeout: Duration::from_secs(60),
        lease: Duration::from_secs(60),
        idle_poll: Duration::from_millis(20),
        max_messages: Some(n as u64),
        ..RunnerConfig::default()
    };
    let runner = Runner::new(store.clone(), queue, RetryPolicy::parse("1s")?, config);
    let stats = runner.stats();
    let started = Instant::now();
    runner.run(handler, std::future::pending()).await?;
    let secs = started.elapsed().as_secs_f64();
    let s = stats.snapshot();
    store.close();
    if s.succeeded != n as u64 {
        bail!(
            "side {name}: {} of {n} messages succeeded ({} retried, {} dead): is python3 / node \
             installed and working?",
            s.succeeded,
            s.retried,
            s.dead
        );
    }
    Ok(secs)
}
