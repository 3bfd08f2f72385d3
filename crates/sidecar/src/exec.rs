//! `--exec CMD`: one subprocess per delivery, the payload on its stdin.
//!
//! | exit | outcome |
//! |---|---|
//! | 0 | ok |
//! | 65 (`EX_DATAERR`) | poison: straight to the DLQ |
//! | 75 (`EX_TEMPFAIL`) or any other non-zero, or killed by a signal | retry |
//!
//! The last 4 KiB of stderr become the error message; stdout passes through.
//!
//! A command can say more than its exit status: a JSON document written to the file
//! `$REDRIVE_RESULT_FILE` names (`{"outcome": "retry", "class": "RateLimited",
//! "message": "…", "retry_after": 30}`, as a worker answers; docs/worker-protocol.md)
//! decides the outcome instead of the exit status.

use std::process::Stdio;

use redrive_core::{Envelope, HandlerError, HandlerResult, MAX_ERROR_BYTES};
use redrive_runner::Handler;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::group::{self, GroupGuard};
use crate::{Structured, Tail};

/// Exit status meaning "the input is invalid": poison.
pub const EX_DATAERR: i32 = 65;
/// Exit status meaning "temporary failure, try again": retry.
pub const EX_TEMPFAIL: i32 = 75;

/// Runs a shell command per message.
#[derive(Debug, Clone)]
pub struct ExecHandler {
    command: String,
    shell: String,
}

impl ExecHandler {
    /// Runs `command` with `sh -c`.
    #[must_use]
    pub fn new(command: impl Into<String>) -> Self {
        Self {
            command: command.into(),
            shell: "sh".to_owned(),
        }
    }

    fn command_for(&self, msg: &Envelope, result_file: &std::path::Path) -> Command {
        let mut cmd = Command::new(&self.shell);
        cmd.arg("-c")
            .arg(&self.command)
            .stdin(Stdio::piped())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .env("REDRIVE_ID", msg.id.to_string())
            .env("REDRIVE_QUEUE", msg.queue.as_str())
            .env("REDRIVE_ATTEMPT", msg.attempt.to_string())
            .env("REDRIVE_REPLAYS", msg.replays.to_string())
            .env("REDRIVE_KEY", msg.key.as_deref().unwrap_or(""))
            .env("REDRIVE_RESULT_FILE", result_file);
        for (name, value) in &msg.headers {
            cmd.env(header_env_name(name), value);
        }
        group::own_group(&mut cmd);
        cmd
    }
}

/// Where a command may write its structured result; removed when dropped.
struct ResultFile(std::path::PathBuf);

impl ResultFile {
    fn new(msg: &Envelope) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(std::env::temp_dir().join(format!(
            "redrive-result-{}-{n}-{}.json",
            std::process::id(),
            msg.id
        )))
    }

    /// The result the command wrote, if it wrote one (a document that does not read is
    /// reported and ignored: the exit status decides).
    fn read(&self) -> Option<HandlerResult> {
        let bytes = std::fs::read(&self.0).ok()?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        match Structured::parse(&bytes[..bytes.len().min(64 * 1024)])? {
            Ok(s) => Some(s.into_result()),
            Err(why) => {
                tracing::warn!(file = %self.0.display(), reason = %why, "ignoring a result file that does not read; the exit status decides");
                None
            }
        }
    }
}

impl Drop for ResultFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `x-tenant.id` → `REDRIVE_HEADER_X_TENANT_ID`.
fn header_env_name(header: &str) -> String {
    let mut name = String::with_capacity(15 + header.len());
    name.push_str("REDRIVE_HEADER_");
    name.extend(header.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    name
}

impl Handler for ExecHandler {
    async fn handle(&self, msg: Envelope) -> HandlerResult {
        let result_file = ResultFile::new(&msg);
        let mut child = self
            .command_for(&msg, &result_file.0)
            .spawn()
            .map_err(|e| {
                HandlerError::retry("spawn", format!("cannot start `{}`: {e}", self.command))
            })?;
        let group = GroupGuard::new(child.id());
        let mut stdin = child.stdin.take();
        let mut stderr = child.stderr.take();
        let payload = msg.payload;
        // Feed stdin and drain stderr concurrently, so neither pipe can fill and stall
        // the child. A child that exits without reading its input is not an error.
        let feed = async move {
            if let Some(stdin) = stdin.as_mut() {
                let _ = stdin.write_all(&payload).await;
                let _ = stdin.shutdown().await;
            }
            drop(stdin);
        };
        let drain = async move {
            let mut tail = Tail::new(MAX_ERROR_BYTES);
            if let Some(stderr) = stderr.as_mut() {
                let mut chunk = [0u8; 8192];
                while let Ok(n) = stderr.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    tail.push(&chunk[..n]);
                }
            }
            tail
        };
        let ((), tail, status) = tokio::join!(feed, drain, child.wait());
        group.exited();
        let status = status.map_err(|e| {
            HandlerError::retry(
                "spawn",
                format!("waiting for `{}` failed: {e}", self.command),
            )
        })?;
        if let Some(structured) = result_file.read() {
            return structured;
        }
        let stderr = tail.text();
        let describe = |what: String| {
            if stderr.is_empty() {
                format!("{what} (no stderr)")
            } else {
                stderr.clone()
            }
        };
        match status.code() {
            Some(0) => Ok(()),
            Some(EX_DATAERR) => Err(HandlerError::poison(
                "exit_65",
                describe("exited with 65 (EX_DATAERR)".into()),
            )),
            Some(code) => Err(HandlerError::retry(
                format!("exit_{code}"),
                describe(format!("exited with {code}")),
            )),
            None => {
                use std::os::unix::process::ExitStatusExt;
                let signal = status.signal().unwrap_or(0);
                Err(HandlerError::retry(
                    format!("signal_{signal}"),
                    describe(format!("killed by signal {signal}")),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use redrive_core::{Outcome, QueueName};

    use super::*;

    fn msg(payload: &str) -> Envelope {
        Envelope::new(QueueName::new("agent.tasks").unwrap(), payload.to_owned())
            .with_key("k1")
            .with_header("x-tenant.id", "acme")
    }

    async fn run(cmd: &str, payload: &str) -> Outcome {
        Outcome::from_result(ExecHandler::new(cmd).handle(msg(payload)).await, 0)
    }

    fn class(o: &Outcome) -> Option<(String, bool, String)> {
        match o {
            Outcome::Ok => None,
            Outcome::Failed { failure, .. } | Outcome::Suspect { failure } => Some((
                failure.class.clone(),
                failure.kind == redrive_core::FailureKind::Poison,
                failure.message.clone(),
            )),
        }
    }

    #[tokio::test]
    async fn a_dropped_handler_stops_everything_its_command_started() {
        // `sh -c` runs this as its child; the sleep is a grandchild of redrive.
        let sleep = group::Grandchild::new("exec-group");
        let handler = ExecHandler::new(format!("{}; wait", sleep.start()));
        let run = handler.handle(msg("x"));
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(500), run)
                .await
                .is_err(),
            "the command should still be running"
        );
        assert!(
            sleep.gone().await,
            "process {} outlived its handler",
            sleep.pid()
        );
    }

    #[tokio::test]
    async fn a_result_file_decides_over_the_exit_status() {
        let retry = run(
            r#"cat >/dev/null; echo '{"outcome":"retry","class":"RateLimited","message":"429","retry_after":7}' > "$REDRIVE_RESULT_FILE"; exit 0"#,
            "x",
        )
        .await;
        let Outcome::Failed {
            failure,
            retry_after,
        } = retry
        else {
            panic!("expected a retry, got {retry:?}")
        };
        assert_eq!(
            (failure.class.as_str(), retry_after),
            ("RateLimited", Some(std::time::Duration::from_secs(7)))
        );
        assert_eq!(
            class(&run(r#"echo '{"outcome":"poison","class":"SchemaError","message":"no prompt"}' > "$REDRIVE_RESULT_FILE""#, "x").await),
            Some(("SchemaError".into(), true, "no prompt".into()))
        );
        // A document that does not read is ignored: the exit status decides.
        assert_eq!(
            class(&run(r#"echo 'not json' > "$REDRIVE_RESULT_FILE"; exit 65"#, "x").await)
                .map(|c| c.0),
            Some("exit_65".into())
        );
        // And the file is gone afterwards.
        let path = run_and_print_result_path().await;
        assert!(!std::path::Path::new(&path).exists(), "{path}");
    }

    /// The path a command was given, printed to stderr by it.
    async fn run_and_print_result_path() -> String {
        match run(
            r#"echo '{}' > "$REDRIVE_RESULT_FILE"; echo "$REDRIVE_RESULT_FILE" >&2; exit 3"#,
            "x",
        )
        .await
        {
            Outcome::Failed { failure, .. } => failure.message,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn exit_codes_map_to_outcomes() {
        assert_eq!(class(&run("cat >/dev/null; exit 0", "x").await), None);
        assert_eq!(
            class(&run("echo bad json >&2; exit 65", "x").await),
            Some(("exit_65".into(), true, "bad json".into()))
        );
        assert_eq!(
            class(&run("echo busy >&2; exit 75", "x").await),
            Some(("exit_75".into(), false, "busy".into()))
        );
        assert_eq!(
            class(&run("exit 3", "x").await),
            Some(("exit_3".into(), false, "exited with 3 (no stderr)".into()))
        );
        let killed = class(&run("kill -9 $$", "x").await).unwrap();
        assert_eq!((killed.0.as_str(), killed.1), ("signal_9", false));
    }

    #[tokio::test]
    async fn payload_and_environment_reach_the_command() {
        let check = r#"read -r line; [ "$line" = '{"task":1}' ] || exit 10
            [ "$REDRIVE_QUEUE" = agent.tasks ] || exit 11
            [ "$REDRIVE_ATTEMPT" = 0 ] || exit 12
            [ "$REDRIVE_KEY" = k1 ] || exit 13
            [ "$REDRIVE_HEADER_X_TENANT_ID" = acme ] || exit 14
            [ -n "$REDRIVE_ID" ] || exit 15"#;
        assert_eq!(class(&run(check, "{\"task\":1}").await), None);
    }

    #[tokio::test]
    async fn keeps_only_the_last_4k_of_stderr() {
        let o = run(
            "i=0; while [ $i -lt 2000 ]; do echo \"line $i\" >&2; i=$((i+1)); done; exit 1",
            "",
        )
        .await;
        let (_, _, message) = class(&o).unwrap();
        assert!(message.len() <= MAX_ERROR_BYTES, "{}", message.len());
        assert!(message.ends_with("line 1999"));
    }

    #[tokio::test]
    async fn a_child_that_ignores_stdin_is_fine() {
        let big = "x".repeat(1 << 20);
        assert_eq!(class(&run("exit 0", &big).await), None);
    }
}
