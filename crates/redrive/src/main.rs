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
                eprintln!("error: {e:#}");
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
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
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
