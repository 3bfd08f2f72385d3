//! `redrive`: parses the command line and hands over to the command modules.

mod backend;
mod cli;
mod cmd;
mod config;
mod output;
mod store;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{ArchiveCommand, Cli, Command, ConfigCommand, DlqCommand, RetentionCommand};

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    init_logging(&cli);
    // `config check` reports a broken file itself; every other command needs it valid.
    if !matches!(cli.command, Command::Config(_)) {
        match config::load(cli.config.as_deref()) {
            Ok(c) => cli.loaded = c,
            Err(e) => {
                eprintln!("error: {}", error_text(&e));
                return ExitCode::FAILURE;
            }
        }
    }
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
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Publish(args) => cmd::publish::run(&cli, args).await,
            Command::Consume(args) => cmd::consume::run(&cli, args).await,
            Command::Queues(args) => cmd::queues::run(&cli, args).await,
            Command::Dlq(DlqCommand::List(args)) => cmd::dlq::list(&cli, args).await,
            Command::Dlq(DlqCommand::Show(args)) => cmd::dlq::show(&cli, args).await,
            Command::Dlq(DlqCommand::Replay(args)) => cmd::dlq::replay(&cli, args).await,
            Command::Dlq(DlqCommand::Purge(args)) => cmd::dlq::purge(&cli, args).await,
            Command::Dlq(DlqCommand::Export(args)) => cmd::dlq::export(&cli, args).await,
            Command::Dlq(DlqCommand::Jobs(args)) => cmd::jobs::list(&cli, args).await,
            Command::Dlq(DlqCommand::Job(command)) => cmd::jobs::job(&cli, command).await,
            Command::Serve(args) => cmd::serve::run(&cli, args).await,
            Command::Demo(args) => cmd::demo::run(&cli, args).await,
            Command::Bench(args) if args.scenario == "crash-points" => {
                cmd::bench_crashpoints::run(&cli, args).await
            }
            Command::Bench(args) => cmd::bench::run(&cli, args).await,
            Command::Config(ConfigCommand::Check { file, json }) => {
                cmd::admin::config_check(&cli, file.as_ref(), *json)
            }
            Command::Retention(RetentionCommand::Run { json }) => {
                cmd::admin::retention_run(&cli, *json).await
            }
            Command::Archive(ArchiveCommand::Import { files, json }) => {
                cmd::admin::archive_import(&cli, files, *json).await
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, as `{:#}` prints them, less the causes that the
/// layer above already ends with: many errors embed their source in their own message
/// and return it as their source too, which `{:#}` would print twice.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if text.ends_with(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

fn init_logging(cli: &Cli) {
    // The AWS SDK narrates its credential chain at info and warn; redrive reports what
    // matters from it as its own error.
    let default = match cli.command {
        Command::Consume(_) | Command::Serve(_) => "info,aws_config=error,aws_smithy_runtime=warn",
        _ => "warn,aws_config=error",
    };
    let filter = cli.log.clone().unwrap_or_else(|| default.to_owned());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| {
        eprintln!("warning: invalid --log filter {filter:?}; using {default:?}");
        tracing_subscriber::EnvFilter::new(default)
    });
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

#[cfg(test)]
mod tests {
    use super::error_text;

    /// An error that embeds its source in its message and returns it as its source.
    #[derive(Debug)]
    struct Open {
        source: std::io::Error,
    }

    impl std::fmt::Display for Open {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "cannot open the store x.db: {}", self.source)
        }
    }

    impl std::error::Error for Open {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn a_cause_already_in_the_message_above_is_printed_once() {
        let e = anyhow::Error::new(Open {
            source: std::io::Error::other("file is not a database"),
        })
        .context("opening --store x.db");
        assert_eq!(
            error_text(&e),
            "opening --store x.db: cannot open the store x.db: file is not a database"
        );
        let plain = anyhow::anyhow!("disk full").context("writing the archive");
        assert_eq!(error_text(&plain), "writing the archive: disk full");
    }
}
