//! The archive file format: zstd-compressed JSON lines, one dead message per line, in a
//! versioned record that keeps the payload byte-exact (base64) and the whole envelope
//! (its wire headers, history included).

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use base64::Engine as _;
use redrive_core::{DeadLetter, DeadLetterStore, Envelope, MessageId, QueueName};
use serde::{Deserialize, Serialize};

use crate::RetentionError;

/// Archive record version written by this release.
const VERSION: u32 = 1;

/// Where to fail on purpose, to test that a failed archive loses nothing.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPoint {
    /// After writing this many lines.
    AfterLines(usize),
    /// After the file is written and synced, before the rename.
    BeforeRename,
}

/// One archived dead message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveRecord {
    /// Its id.
    pub id: MessageId,
    /// The dead message.
    pub dead: DeadLetter,
}

#[derive(Serialize, Deserialize)]
struct Line {
    v: u32,
    id: String,
    queue: String,
    dead_at_ms: i64,
    key: Option<String>,
    payload_b64: String,
    headers: Vec<(String, String)>,
}

/// `YYYY-MM-DD` (UTC) of a day's start.
pub(crate) fn date_of(day_start_ms: i64) -> String {
    let ms = day_start_ms.clamp(0, redrive_core::MAX_TIME_MS);
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339(t).to_string()[..10].to_owned()
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> RetentionError + '_ {
    move |source| RetentionError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Refuses an archive directory anyone may write to: another user could plant files
/// or links there under the names the sweep writes.
fn refuse_shared_dir(dir: &Path) -> Result<(), RetentionError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(dir).map_err(io(dir))?;
        if meta.permissions().mode() & 0o002 != 0 {
            return Err(RetentionError::Config(format!(
                "the archive directory {} is writable by every user; use a directory only \
                 redrive's user (and its group) can write to, e.g. chmod o-w {}",
                dir.display(),
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Writes `rows` to `path` so that the file is complete or absent: a temporary file in
/// the same directory, fsynced, renamed into place, directory fsynced.
pub(crate) fn write_file(
    path: &Path,
    rows: &[DeadLetter],
    fail: Option<FailPoint>,
) -> Result<(), RetentionError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    refuse_shared_dir(dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    // Whatever sits at the temporary name (a file left by a crash, or a link planted
    // there to make the sweep write elsewhere) goes: removing a link removes the link.
    // The file is then created exclusively, so a link put back meanwhile fails the
    // write instead of being followed.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&tmp)(e)),
        _ => {}
    }
    let result = (|| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        let mut encoder = zstd::Encoder::new(BufWriter::new(file), 6).map_err(io(&tmp))?;
        for (i, dead) in rows.iter().enumerate() {
            if fail == Some(FailPoint::AfterLines(i)) {
                return Err(io(&tmp)(std::io::Error::other(
                    "injected failure while writing",
                )));
            }
            let env = &dead.envelope;
            let line = Line {
                v: VERSION,
                id: env.id.to_string(),
                queue: env.queue.to_string(),
                dead_at_ms: dead.dead_at_ms,
                key: env.key.clone(),
                payload_b64: base64::engine::general_purpose::STANDARD.encode(&env.payload),
                headers: env.to_wire(),
            };
            serde_json::to_writer(&mut encoder, &line).map_err(|e| io(&tmp)(e.into()))?;
            encoder.write_all(b"\n").map_err(io(&tmp))?;
        }
        let writer = encoder.finish().map_err(io(&tmp))?;
        let file = writer.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
        file.sync_all().map_err(io(&tmp))?;
        if fail == Some(FailPoint::BeforeRename) {
            return Err(io(&tmp)(std::io::Error::other(
                "injected failure before rename",
            )));
        }
        std::fs::rename(&tmp, path).map_err(io(path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads every record of an archive file.
///
/// # Errors
///
/// Fails when the file cannot be read or a line is not an archive record; the error
/// names the file and the line.
pub fn read_file(path: &Path) -> Result<Vec<ArchiveRecord>, RetentionError> {
    let file = File::open(path).map_err(io(path))?;
    let decoder = zstd::Decoder::new(file).map_err(io(path))?;
    let shown = path.display().to_string();
    let mut out = Vec::new();
    for (i, line) in BufReader::new(decoder).lines().enumerate() {
        let line = line.map_err(io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| RetentionError::Format {
            path: shown.clone(),
            line: i + 1,
            reason,
        };
        let l: Line =
            serde_json::from_str(&line).map_err(|e| bad(format!("not an archive record: {e}")))?;
        if !redrive_core::is_valid_time(l.dead_at_ms) {
            return Err(bad(format!(
                "dead_at_ms {} is not a time between 1970 and 9999",
                l.dead_at_ms
            )));
        }
        if l.v > VERSION {
            return Err(bad(format!(
                "record version {} is newer than this redrive understands; upgrade",
                l.v
            )));
        }
        let queue = QueueName::new(&l.queue).map_err(|e| bad(e.to_string()))?;
        let payload = base64::engine::general_purpose::STANDARD
            .decode(&l.payload_b64)
            .map_err(|e| bad(format!("payload: {e}")))?;
        let envelope = Envelope::from_wire(&queue, l.key, payload, l.headers)
            .map_err(|e| bad(e.to_string()))?;
        let id = MessageId::parse(&l.id).map_err(|e| bad(format!("id: {e}")))?;
        if id != envelope.id {
            return Err(bad(
                "the id does not match the envelope's redrive-id".to_owned()
            ));
        }
        out.push(ArchiveRecord {
            id,
            dead: DeadLetter {
                envelope,
                dead_at_ms: l.dead_at_ms,
            },
        });
    }
    Ok(out)
}

/// Imports an archive file back into the store; returns (records read, inserted).
/// Messages already dead in the store are left alone, so importing twice is harmless.
///
/// # Errors
///
/// Fails when the file is unreadable or malformed (nothing is imported then), or the
/// store fails.
pub async fn import_file<S: DeadLetterStore>(
    store: &S,
    path: &Path,
) -> Result<(u64, u64), RetentionError> {
    let owned = path.to_owned();
    let records = tokio::task::spawn_blocking(move || read_file(&owned))
        .await
        .map_err(|e| RetentionError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(e),
        })??;
    let mut inserted = 0u64;
    let total = records.len() as u64;
    let dead: Vec<DeadLetter> = records.into_iter().map(|r| r.dead).collect();
    for chunk in dead.chunks(1000) {
        inserted += store.insert_batch(chunk).await?;
    }
    Ok((total, inserted))
}

/// Archive lines under fire: whatever `write_file` writes reads back equal, and any line
/// reads or is refused with its line number, never a panic.
#[cfg(test)]
mod properties {
    use std::io::Write as _;

    use proptest::prelude::*;
    use redrive_core::{DeadLetter, Envelope, Failure, FailureKind, MAX_TIME_MS, QueueName};

    use super::{read_file, write_file};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn dead_letters_read_back_as_they_were_archived(
            rows in proptest::collection::vec((
                proptest::collection::vec(any::<u8>(), 0..48),
                proptest::option::of("\\PC{1,12}"),
                "\\PC{0,60}",
                0..=MAX_TIME_MS,
            ), 1..6),
        ) {
            let dir = tempfile::tempdir().expect("dir");
            let path = dir.path().join("q").join("2026-12-04.jsonl.zst");
            let queue = QueueName::new("agent.tasks").expect("queue");
            let dead: Vec<DeadLetter> = rows
                .into_iter()
                .map(|(payload, key, message, at)| {
                    let mut env = Envelope::new(queue.clone(), payload);
                    env.key = key;
                    env.record_failure(Failure::new(FailureKind::Poison, "E", message, at), "main");
                    DeadLetter { envelope: env, dead_at_ms: at }
                })
                .collect();
            write_file(&path, &dead, None).expect("write");
            let back: Vec<DeadLetter> = read_file(&path).expect("read").into_iter().map(|r| r.dead).collect();
            prop_assert_eq!(back, dead);
        }

        #[test]
        fn any_line_reads_or_names_its_line(line in "\\PC{0,200}") {
            let dir = tempfile::tempdir().expect("dir");
            let path = dir.path().join("x.jsonl.zst");
            let mut encoder = zstd::Encoder::new(std::fs::File::create(&path).expect("create"), 1).expect("zstd");
            writeln!(encoder, "{line}").expect("write");
            encoder.finish().expect("finish");
            if let Err(e) = read_file(&path) {
                prop_assert!(e.to_string().contains("line 1") || e.to_string().contains("x.jsonl.zst"), "{}", e);
            }
        }
    }
}
