//! `redrive config check`, `redrive retention run`, `redrive archive import`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use redrive_core::now_ms;
use serde_json::json;

use crate::backend;
use crate::cli::Cli;
use crate::config;
use crate::output::{json_line, outln};

pub fn config_check(cli: &Cli, file: Option<&PathBuf>, as_json: bool) -> Result<ExitCode> {
    let path = file
        .cloned()
        .or_else(|| cli.config.clone())
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_FILE));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    match config::parse(&text, Some(&path)) {
        Ok(c) => {
            if as_json {
                json_line(
                    &json!({"file": path.display().to_string(), "ok": true, "queues": c.queues.len(), "rules": c.rules.len(), "notifiers": c.notifiers.len()}),
                );
            } else {
                outln!(
                    "{}: OK ({} queues, {} alert rules, {} notifiers; retention hot {}, warm {})",
                    path.display(),
                    c.queues.len(),
                    c.rules.len(),
                    c.notifiers.len(),
                    redrive_core::format_duration(c.retention.hot),
                    redrive_core::format_duration(c.retention.warm)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(problems) => {
            if as_json {
                let list: Vec<_> = problems
                    .iter()
                    .map(|p| json!({"line": p.line, "message": p.message}))
                    .collect();
                json_line(
                    &json!({"file": path.display().to_string(), "ok": false, "problems": list}),
                );
            } else {
                for p in &problems {
                    eprintln!("{}:{p}", path.display());
                }
                eprintln!("{}: {} problem(s)", path.display(), problems.len());
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

pub async fn retention_run(cli: &Cli, as_json: bool) -> Result<ExitCode> {
    let store = backend::open_any(cli, false).await?;
    store
        .drain()
        .await
        .context("draining the broker's DLQ before the sweep")?;
    let store = store.store();
    let retention = &cli.loaded.retention;
    let report = redrive_retention::sweep(&store, retention, now_ms(), None)
        .await
        .context("retention sweep")?;
    if as_json {
        json_line(&json!({
            "compressed": report.compressed,
            "archived": report.archived,
            "files": report.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            "forgotten_replayed": report.forgotten,
        }));
    } else {
        outln!(
            "retention (hot {}, warm {}): compressed {}, archived {} into {} file(s) under {}, forgot {} replayed",
            redrive_core::format_duration(retention.hot),
            redrive_core::format_duration(retention.warm),
            report.compressed,
            report.archived,
            report.files.len(),
            retention.archive_dir.display(),
            report.forgotten
        );
        for f in &report.files {
            outln!("  {}", f.display());
        }
    }
    store.close();
    Ok(ExitCode::SUCCESS)
}

pub async fn archive_import(cli: &Cli, files: &[PathBuf], as_json: bool) -> Result<ExitCode> {
    let store = crate::store::open(cli.store_url(), true).await?;
    let (mut read, mut inserted) = (0u64, 0u64);
    for file in files {
        let (r, i) = redrive_retention::import_file(&store, file)
            .await
            .with_context(|| format!("importing {}", file.display()))?;
        if !as_json {
            outln!(
                "{}: {r} dead messages, {i} imported ({} already there)",
                file.display(),
                r - i
            );
        }
        read += r;
        inserted += i;
    }
    if as_json {
        json_line(&json!({"files": files.len(), "read": read, "imported": inserted}));
    }
    store.close();
    Ok(ExitCode::SUCCESS)
}
