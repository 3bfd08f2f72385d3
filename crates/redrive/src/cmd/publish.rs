//! `redrive publish`: one message per input line.

use std::io::Read;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use redrive_core::{Envelope, HEADER_PREFIX, QueueName, Transport};
use serde::Serialize;

use crate::backend;
use crate::cli::{Cli, PublishArgs};
use crate::output::json_line;
use crate::output::outln;

/// Messages per durable batch.
const BATCH: usize = 1000;

/// Parses `1048576`, `64KiB`, `1MiB`, `1MB`.
pub fn parse_size(text: &str) -> Result<usize> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .with_context(|| format!("invalid size {text:?}: expected e.g. 1MiB, 64KiB or 4096"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1024,
        "KB" | "kB" => 1000,
        "MiB" | "M" => 1024 * 1024,
        "MB" => 1_000_000,
        _ => bail!("invalid size {text:?}: unknown unit {unit:?}; use B, KiB or MiB"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("size {text:?} is too large"))
}

fn parse_header(raw: &str) -> Result<(String, String)> {
    let Some((name, value)) = raw.split_once('=') else {
        bail!("invalid --header {raw:?}: expected NAME=VALUE");
    };
    let name = name.trim();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_graphic() && c != ':') {
        bail!("invalid --header {raw:?}: the name must be printable ASCII without spaces or ':'");
    }
    if name.to_ascii_lowercase().starts_with(HEADER_PREFIX) {
        bail!(
            "invalid --header {raw:?}: names starting with {HEADER_PREFIX:?} are reserved for redrive"
        );
    }
    Ok((name.to_owned(), value.to_owned()))
}

#[derive(Serialize)]
struct Published<'a> {
    queue: &'a str,
    published: usize,
    skipped_empty_lines: usize,
}

pub async fn run(cli: &Cli, args: &PublishArgs) -> Result<ExitCode> {
    let queue = QueueName::new(&args.queue)?;
    let headers = args
        .headers
        .iter()
        .map(|h| parse_header(h))
        .collect::<Result<Vec<_>>>()?;
    let limit = parse_size(&args.max_payload).context("invalid --max-payload")?;
    let mut input = Vec::new();
    match &args.file {
        Some(path) => {
            input = std::fs::read(path)
                .with_context(|| format!("cannot read --file {}", path.display()))?;
        }
        None => {
            std::io::stdin()
                .lock()
                .read_to_end(&mut input)
                .context("cannot read standard input")?;
        }
    }
    // Validate everything before publishing anything, so a bad line never leaves half
    // a file published.
    let mut envelopes = Vec::new();
    let mut skipped = 0usize;
    let lines: Vec<&[u8]> = input.split(|b| *b == b'\n').collect();
    let count = lines.len();
    for (i, line) in lines.into_iter().enumerate() {
        // A line ends at `\n` or `\r\n` (a file written on Windows): the `\r` is not
        // part of the payload, and a blank CRLF line is as empty as a blank LF one.
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if i + 1 < count {
                skipped += 1;
            }
            continue;
        }
        if line.len() > limit {
            bail!(
                "line {}: the payload is {} bytes, over the limit of {limit} bytes (--max-payload {}); nothing was published",
                i + 1,
                line.len(),
                args.max_payload
            );
        }
        let mut env = Envelope::new(queue.clone(), line.to_vec());
        env.key.clone_from(&args.key);
        env.headers.clone_from(&headers);
        envelopes.push(env);
    }
    let total = envelopes.len();
    let store = backend::open_any(cli, true).await?;
    let mut done = 0usize;
    for chunk in envelopes.chunks(BATCH) {
        store
            .publish(&queue, chunk.to_vec())
            .await
            .with_context(|| format!("publishing to {queue}: {done} of {total} messages were published before this error"))?;
        done += chunk.len();
    }
    if args.json {
        json_line(&Published {
            queue: queue.as_str(),
            published: total,
            skipped_empty_lines: skipped,
        });
    } else {
        let note = if skipped > 0 {
            format!(" (skipped {skipped} empty lines)")
        } else {
            String::new()
        };
        outln!("published {total} messages to {queue}{note}");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for (text, n) in [
            ("4096", 4096),
            ("64KiB", 65536),
            ("1MiB", 1_048_576),
            ("1MB", 1_000_000),
            ("10B", 10),
        ] {
            assert_eq!(parse_size(text).unwrap(), n, "{text}");
        }
        for text in ["", "MiB", "1GiB", "-1"] {
            assert!(parse_size(text).is_err(), "{text}");
        }
    }

    #[test]
    fn headers() {
        assert_eq!(
            parse_header("tenant=acme=1").unwrap(),
            ("tenant".into(), "acme=1".into())
        );
        for raw in [
            "novalue",
            "=x",
            "bad name=x",
            "redrive-id=x",
            "Redrive-Attempt=3",
        ] {
            assert!(parse_header(raw).is_err(), "{raw}");
        }
    }
}
