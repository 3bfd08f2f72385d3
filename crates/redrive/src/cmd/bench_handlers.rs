//! `redrive bench --scenario handlers`: what each way of reaching an agent costs, side
//! by side in one run on the embedded store, with a handler that does nothing: the
//! runner calling a Rust closure in process, `--worker` with the Python and the
//! TypeScript helpers, `--webhook` to a local Python HTTP server, and `--exec` starting
//! `python3` per message. Each side gets a fresh store and the same messages; `--exec`
//! gets fewer (it is two orders of magnitude slower), its rate is per message all the
//! same. Each side also reports the CPU time it took per message, in redrive and in the
//! handler's processes: on a machine with few cores that, not the pipe, is what bounds
//! the rate of a handler in another process.

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
    /// CPU time per message in redrive's process (runner, store, handler plumbing).
    redrive_cpu_us: f64,
    /// CPU time per message in the handler's processes (workers, server, `python3`s).
    handler_cpu_us: f64,
}

/// One side's measurement.
struct Measured {
    side: &'static str,
    messages: usize,
    secs: f64,
    cpu: Cpu,
}

/// CPU seconds used so far by this process and by its children that have exited and
/// been waited for, from `/proc/self/stat` (in the kernel's fixed 100 ticks a second).
#[derive(Clone, Copy, Default)]
struct Cpu {
    own: f64,
    children: f64,
}

impl Cpu {
    fn now() -> Self {
        let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
            return Self::default();
        };
        // The fields after the command name, which is in parentheses and may hold
        // spaces: state is field 3, so utime (14) is the 11th from here.
        let fields: Vec<f64> = stat
            .rsplit_once(')')
            .map(|(_, rest)| {
                rest.split_whitespace()
                    .map(|f| f.parse().unwrap_or(0.0))
                    .collect()
            })
            .unwrap_or_default();
        let tick = |i: usize| fields.get(i).copied().unwrap_or(0.0) / 100.0;
        Self {
            own: tick(11) + tick(12),
            children: tick(13) + tick(14),
        }
    }

    fn since(self, start: Self) -> Self {
        Self {
            own: self.own - start.own,
            children: self.children - start.children,
        }
    }
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
    let cpu = Cpu::now();
    let secs = side(d, "a", n, args, handler_fn(|_m: Envelope| async { Ok(()) })).await?;
    sides.push(Measured {
        side: "in-process",
        messages: n,
        secs,
        cpu: Cpu::now().since(cpu),
    });
    for (name, label, command) in [
        (
            "worker-python",
            "--worker, the Python helper",
            format!("python3 {}", d.join("worker.py").display()),
        ),
        (
            "worker-typescript",
            "--worker, the TypeScript helper",
            format!("node {}", d.join("worker.mjs").display()),
        ),
    ] {
        say(label);
        let cpu = Cpu::now();
        let workers = WorkerHandler::new(command, 1);
        let secs = side(d, name, n, args, workers.clone()).await?;
        // Waited for, so that the worker's CPU time is counted.
        workers.close().await;
        sides.push(Measured {
            side: name,
            messages: n,
            secs,
            cpu: Cpu::now().since(cpu),
        });
    }
    say("--webhook, a Python HTTP server");
    let cpu = Cpu::now();
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
    let secs = side(d, "webhook", n, args, webhook).await?;
    let _ = server.kill().await;
    sides.push(Measured {
        side: "webhook-python",
        messages: n,
        secs,
        cpu: Cpu::now().since(cpu),
    });
    let few = n.min(EXEC_MESSAGES);
    say("--exec python3 per message");
    let cpu = Cpu::now();
    let exec = ExecHandler::new(format!("python3 {}", d.join("handler.py").display()));
    let secs = side(d, "exec", few, args, exec).await?;
    sides.push(Measured {
        side: "exec-python",
        messages: few,
        secs,
        cpu: Cpu::now().since(cpu),
    });

    let base = sides[0].messages as f64 / sides[0].secs;
    let rows: Vec<Side> = sides
        .iter()
        .map(|m| {
            let per = |secs: f64| secs * 1e6 / m.messages as f64;
            Side {
                side: m.side,
                messages: m.messages,
                secs: m.secs,
                msgs_per_sec: m.messages as f64 / m.secs,
                of_in_process: m.messages as f64 / m.secs / base,
                redrive_cpu_us: per(m.cpu.own),
                handler_cpu_us: per(m.cpu.children),
            }
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
                    format!("{:.0}", r.redrive_cpu_us),
                    format!("{:.0}", r.handler_cpu_us),
                ]
            })
            .collect();
        table(
            &[
                "SIDE",
                "MESSAGES",
                "MSGS/S",
                "OF IN-PROCESS",
                "REDRIVE CPU µS/MSG",
                "HANDLER CPU µS/MSG",
            ],
            &cells,
        );
        let exec = rows[4].msgs_per_sec;
        outln!(
            "worker-python / exec-python: {:.0}x",
            rows[1].msgs_per_sec / exec
        );
        outln!(
            "CPU: this machine has {} cores; a side's rate is at most cores / (redrive + handler CPU per message)",
            std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
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
