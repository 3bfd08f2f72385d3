//! `redrive serve`: the triage UI, the JSON API and metrics over the store, with the
//! alert evaluator and the retention sweeper running beside them.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use redrive_core::alert::AlertStore;
use redrive_server::alerting::{AlertView, Alerting};
use redrive_server::notify::Notifiers;
use redrive_server::{App, Auth, LanesAndStore, Metrics, Tokens, Triage};
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

/// The triage facade over an embedded store.
pub fn triage(store: &Sqlite) -> Arc<dyn Triage> {
    Arc::new(LanesAndStore::new(store.clone(), store.clone()))
}

/// Builds the app over an embedded store and binds it.
pub async fn start(
    store: &Sqlite,
    tokens: Tokens,
    metrics: Arc<Metrics>,
    bind: SocketAddr,
    max_replays: u32,
) -> Result<(Arc<App>, tokio::net::TcpListener, SocketAddr)> {
    let auth = Auth::new(tokens);
    let (app, listener, addr) = prepare(triage(store), auth, metrics, bind, max_replays).await?;
    Ok((Arc::new(app), listener, addr))
}

async fn prepare(
    triage: Arc<dyn Triage>,
    auth: Auth,
    metrics: Arc<Metrics>,
    bind: SocketAddr,
    max_replays: u32,
) -> Result<(App, tokio::net::TcpListener, SocketAddr)> {
    let mut app = App::new(triage, auth, metrics);
    app.max_replays = max_replays;
    let (listener, addr) = redrive_server::bind(&app, bind).await?;
    Ok((app, listener, addr))
}

pub async fn run(cli: &Cli, args: &ServeArgs) -> Result<ExitCode> {
    let config = &cli.loaded;
    let token_file = args
        .token_file
        .clone()
        .or_else(|| config.token_file.clone());
    let tokens = tokens(token_file.as_deref())?;
    let open = tokens.is_empty();
    let sample_every =
        duration_flag("--sample-every", &args.sample_every)?.max(Duration::from_millis(100));
    let bind = args
        .bind
        .or(config.bind)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
    let any = backend::open_any(cli, true).await?;
    backend::create_configured_lanes(cli, &any).await?;
    let store = any.store();
    let metrics = Arc::new(Metrics::new());
    let any_triage: Arc<dyn Triage> = Arc::new(LanesAndStore::new(any.clone(), any.clone()));
    let (mut app, listener, addr) = prepare(
        any_triage,
        Auth::new(tokens).with_secure_cookies(args.cookie_secure),
        Arc::clone(&metrics),
        bind,
        args.max_replays,
    )
    .await?;

    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let notifiers = Notifiers::new(config.notifiers.clone())
        .context("building the HTTP client for notifiers")?;
    let alerting = Arc::new(Alerting::new(
        store.clone(),
        Arc::clone(&app.triage),
        config.rules.clone(),
        notifiers,
        public_url,
        Arc::clone(&metrics),
    ));
    app.alerts = Some(Arc::clone(&alerting) as Arc<dyn AlertView>);
    let alert_task = tokio::spawn(Arc::clone(&alerting).run(config.evaluate_every));

    let sweeper = {
        let store = store.clone();
        let retention = config.retention.clone();
        let every = config.sweep_every;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            // One process sweeps at a time among those sharing the store, so each day is
            // archived once; another takes over two sweeps after it dies.
            let holder = redrive_core::MessageId::new().to_string();
            let lease_ms =
                i64::try_from(every.as_millis().saturating_mul(2)).unwrap_or(i64::MAX / 4);
            loop {
                tick.tick().await;
                let now = redrive_core::now_ms();
                match store.lead("retention", &holder, now, lease_ms).await {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot tell whether this process leads retention; skipping the sweep");
                        continue;
                    }
                }
                match redrive_retention::sweep(&store, &retention, now, None).await {
                    Ok(r) if r.compressed + r.archived + r.forgotten > 0 => {
                        tracing::info!(
                            compressed = r.compressed,
                            archived = r.archived,
                            files = r.files.len(),
                            "retention sweep"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "retention sweep failed; nothing was deleted that is not archived")
                    }
                }
            }
        })
    };

    // Replay jobs started here run here; a running job no process holds (its `dlq
    // replay` crashed, a `serve` restarted) is taken up within seconds.
    let job_supervisor = tokio::spawn(Arc::clone(&app.jobs).supervise(Duration::from_secs(5)));

    // With a broker, dead messages wait in its DLQ lane until drained into the store.
    let drainer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let Err(e) = any.drain().await {
                tracing::warn!(error = %e, "draining the broker's DLQ failed; will retry");
            }
        }
    });
    let access = if open {
        "no token: open to local callers only"
    } else {
        "token required"
    };
    let rules: Vec<String> = config
        .rules
        .iter()
        .map(|r| format!("{} ({})", r.name, r.condition))
        .collect();
    eprintln!("redrive serve: http://{addr}/  (API /api/v1, metrics /metrics; {access})");
    let file = config
        .file
        .as_ref()
        .map_or_else(|| "none".to_owned(), |f| f.display().to_string());
    tracing::info!(%addr, config = %file, rules = %rules.join(", "), notifiers = config.notifiers.len(), "serving");
    let result =
        redrive_server::serve(Arc::new(app), listener, sample_every, shutdown_signal()).await;
    alert_task.abort();
    job_supervisor.abort();
    sweeper.abort();
    drainer.abort();
    store.close();
    result.context("serving")?;
    Ok(ExitCode::SUCCESS)
}
