//! `redrive serve`: the triage UI, the JSON API and metrics over the store.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use redrive_server::{App, Auth, Backend, Metrics, Tokens, Triage};
use redrive_sqlite::Sqlite;

use super::{duration_flag, shutdown_signal};
use crate::backend;
use crate::cli::{Cli, ServeArgs};

/// Tokens from the environment and an optional file. Never logged.
pub fn tokens(file: Option<&std::path::Path>) -> Result<Tokens> {
    let operator = std::env::var("REDRIVE_TOKEN").ok();
    let viewer = std::env::var("REDRIVE_VIEWER_TOKEN").ok();
    Ok(Tokens::load(operator.as_deref(), viewer.as_deref(), file)?)
}

/// Builds the app over an embedded store and binds it.
pub async fn start(
    store: &Sqlite,
    tokens: Tokens,
    metrics: Arc<Metrics>,
    bind: SocketAddr,
    max_replays: u32,
) -> Result<(Arc<App>, tokio::net::TcpListener, SocketAddr)> {
    let triage: Arc<dyn Triage> = Arc::new(Backend::new(store.clone(), store.clone()));
    let mut app = App::new(triage, Auth::new(tokens), metrics);
    app.max_replays = max_replays;
    let (listener, addr) = redrive_server::bind(&app, bind).await?;
    Ok((Arc::new(app), listener, addr))
}

pub async fn run(cli: &Cli, args: &ServeArgs) -> Result<ExitCode> {
    let tokens = tokens(args.token_file.as_deref())?;
    let open = tokens.is_empty();
    let sample_every = duration_flag("--sample-every", &args.sample_every)?.max(Duration::from_millis(100));
    let store = backend::open(cli.store_url(), true)?;
    let (app, listener, addr) = start(&store, tokens, Arc::new(Metrics::new()), args.bind, args.max_replays).await?;
    let access = if open { "no token: open to local callers only" } else { "token required" };
    eprintln!("redrive serve: http://{addr}/  (API /api/v1, metrics /metrics; {access})");
    tracing::info!(%addr, "serving");
    redrive_server::serve(app, listener, sample_every, shutdown_signal()).await.context("serving")?;
    Ok(ExitCode::SUCCESS)
}
