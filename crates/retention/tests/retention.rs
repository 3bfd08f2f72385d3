//! Hot → warm → archive on the embedded store, with a controllable clock.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use redrive_core::{
    DeadFilter, DeadLetter, DeadLetterStore, Envelope, Failure, FailureKind, MessageId, QueueName,
};
use redrive_retention::{DAY_MS, FailPoint, Retention, import_file, read_file, sweep};
use redrive_sqlite::{Sqlite, SqliteConfig};

const NOW: i64 = 1_800_000_000_000; // 2027-01-15, a fixed "now".

fn store(dir: &Path, name: &str) -> Sqlite {
    SqliteConfig::new(dir.join(name)).open().unwrap()
}

fn retention(dir: &Path) -> Retention {
    Retention {
        hot: Duration::from_secs(7 * 86_400),
        warm: Duration::from_secs(30 * 86_400),
        archive_dir: dir.join("archive"),
    }
}

/// A dead message that died `age_ms` before NOW, with a payload that is not UTF-8.
fn dead(i: usize, queue: &str, age_ms: i64) -> DeadLetter {
    let mut payload = format!("{{\"task\":{i},\"note\":\"").into_bytes();
    payload.extend_from_slice(&[0xff, 0x00, (i % 251) as u8, b'"', b'}']);
    let mut env = Envelope::new(QueueName::new(queue).unwrap(), payload)
        .with_key(format!("k{i}"))
        .with_header("tenant", "acme");
    let at = NOW - age_ms;
    env.record_failure(
        Failure::new(
            FailureKind::Retry,
            "Upstream",
            format!("shard {} down", i % 7),
            at - 1000,
        ),
        "main",
    );
    env.record_failure(
        Failure::new(
            FailureKind::Retry,
            "Upstream",
            format!("shard {} down", i % 7),
            at,
        ),
        "retry.5s",
    );
    DeadLetter {
        envelope: env,
        dead_at_ms: at,
    }
}

async fn all(store: &Sqlite) -> HashMap<MessageId, DeadLetter> {
    let mut out = HashMap::new();
    let mut cursor = None;
    loop {
        let page = store
            .list(&DeadFilter::default(), cursor.as_ref(), 1000)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        cursor = Some(redrive_core::Cursor {
            dead_at_ms: last.dead_at_ms,
            id: last.envelope.id,
        });
        for d in page {
            out.insert(d.envelope.id, d);
        }
    }
    out
}

fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(queues) = std::fs::read_dir(dir) {
        for q in queues.flatten() {
            for f in std::fs::read_dir(q.path()).unwrap().flatten() {
                out.push(format!(
                    "{}/{}",
                    q.file_name().to_string_lossy(),
                    f.file_name().to_string_lossy()
                ));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn messages_move_hot_to_warm_to_archive_and_import_back_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), "a.db");
    let hot = dead(1, "agent.tasks", DAY_MS);
    let warm = dead(2, "agent.tasks", 10 * DAY_MS);
    let old_a = dead(3, "agent.tasks", 40 * DAY_MS);
    let old_b = dead(4, "agent.tasks", 40 * DAY_MS + 1000);
    let old_other = dead(5, "billing", 45 * DAY_MS);
    s.insert_batch(&[
        hot.clone(),
        warm.clone(),
        old_a.clone(),
        old_b.clone(),
        old_other.clone(),
    ])
    .await
    .unwrap();
    let r = retention(dir.path());

    let report = sweep(&s, &r, NOW, None).await.unwrap();
    assert_eq!(
        report.compressed, 1,
        "the warm message was compressed (archived days are not)"
    );
    assert_eq!(
        report.archived, 3,
        "everything older than 30 days was archived"
    );
    assert_eq!(
        files(&r.archive_dir),
        [
            "agent.tasks/2026-12-06.jsonl.zst",
            "billing/2026-12-01.jsonl.zst"
        ]
    );

    let left = all(&s).await;
    assert_eq!(left.len(), 2);
    assert_eq!(left[&hot.envelope.id], hot, "hot messages are untouched");
    assert_eq!(
        left[&warm.envelope.id], warm,
        "a warm message reads back byte-exact from its compressed payload"
    );

    let archived = read_file(&r.archive_dir.join("agent.tasks/2026-12-06.jsonl.zst")).unwrap();
    assert_eq!(archived.len(), 2);
    let fresh = store(dir.path(), "b.db");
    for file in files(&r.archive_dir) {
        let (read, inserted) = import_file(&fresh, &r.archive_dir.join(file))
            .await
            .unwrap();
        assert_eq!(read, inserted);
    }
    let back = all(&fresh).await;
    for original in [&old_a, &old_b, &old_other] {
        assert_eq!(
            &back[&original.envelope.id], original,
            "imported byte-exact, history and all"
        );
    }
    let (_, again) = import_file(&fresh, &r.archive_dir.join("billing/2026-12-01.jsonl.zst"))
        .await
        .unwrap();
    assert_eq!(again, 0, "importing twice changes nothing");

    let report = sweep(&s, &r, NOW, None).await.unwrap();
    assert_eq!(
        (report.compressed, report.archived, report.files.len()),
        (0, 0, 0),
        "a second sweep has nothing to do"
    );
}

#[tokio::test]
async fn a_failure_while_archiving_loses_nothing() {
    for fail in [
        FailPoint::AfterLines(0),
        FailPoint::AfterLines(3),
        FailPoint::BeforeRename,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), "a.db");
        let rows: Vec<DeadLetter> = (0..10)
            .map(|i| dead(i, "agent.tasks", 40 * DAY_MS + i as i64))
            .collect();
        s.insert_batch(&rows).await.unwrap();
        let r = retention(dir.path());
        let err = sweep(&s, &r, NOW, Some(fail)).await.unwrap_err();
        assert!(err.to_string().contains("injected failure"), "{err}");
        assert_eq!(
            all(&s).await.len(),
            10,
            "{fail:?}: every message is still in the store"
        );
        assert_eq!(
            files(&r.archive_dir),
            Vec::<String>::new(),
            "{fail:?}: no partial or temporary file is left"
        );
        // The next sweep, without the failure, archives everything once.
        let report = sweep(&s, &r, NOW, None).await.unwrap();
        assert_eq!(report.archived, 10);
        assert_eq!(read_file(&report.files[0]).unwrap().len(), 10);
    }
}

#[tokio::test]
async fn a_crash_between_rename_and_delete_does_not_archive_twice() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), "a.db");
    let rows: Vec<DeadLetter> = (0..5)
        .map(|i| dead(i, "agent.tasks", 40 * DAY_MS + i as i64))
        .collect();
    s.insert_batch(&rows).await.unwrap();
    let r = retention(dir.path());
    let report = sweep(&s, &r, NOW, None).await.unwrap();
    assert_eq!(report.archived, 5);
    // As if the process died after the rename and before the delete: the complete file
    // exists and the rows are still in the store.
    import_file(&s, &report.files[0]).await.unwrap();
    assert_eq!(all(&s).await.len(), 5);
    let report = sweep(&s, &r, NOW, None).await.unwrap();
    assert_eq!(
        report.archived, 5,
        "the rows held by the complete file are deleted"
    );
    assert!(report.files.is_empty(), "and not written again");
    assert_eq!(files(&r.archive_dir).len(), 1);
    assert!(all(&s).await.is_empty());
}

#[tokio::test]
async fn warm_must_be_longer_than_hot() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), "a.db");
    let r = Retention {
        hot: Duration::from_secs(86_400),
        warm: Duration::from_secs(3600),
        archive_dir: dir.path().to_owned(),
    };
    let err = sweep(&s, &r, NOW, None).await.unwrap_err().to_string();
    assert!(
        err.contains("warm (1h) must be longer than hot (1d)"),
        "{err}"
    );
}

/// At scale: 100,000 dead messages past hot and warm end up archived, and the
/// archive imports back byte-exact.
#[tokio::test]
async fn one_hundred_thousand_archived_and_restored_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), "a.db");
    const N: usize = 100_000;
    let queues = ["agent.tasks", "billing", "support"];
    let rows: Vec<DeadLetter> = (0..N)
        .map(|i| {
            dead(
                i,
                queues[i % 3],
                31 * DAY_MS + (i as i64 * 37_000) % (5 * DAY_MS),
            )
        })
        .collect();
    for chunk in rows.chunks(5000) {
        s.insert_batch(chunk).await.unwrap();
    }
    let r = retention(dir.path());
    let report = sweep(&s, &r, NOW, None).await.unwrap();
    assert_eq!(report.archived, N as u64);
    assert_eq!(s.depth(None).await.unwrap(), 0);
    let fresh = store(dir.path(), "restored.db");
    let mut imported = 0;
    for file in files(&r.archive_dir) {
        imported += import_file(&fresh, &r.archive_dir.join(file))
            .await
            .unwrap()
            .1;
    }
    assert_eq!(imported, N as u64);
    let back = all(&fresh).await;
    assert_eq!(back.len(), N);
    for original in &rows {
        let got = &back[&original.envelope.id];
        assert_eq!(got.envelope.payload, original.envelope.payload);
        assert_eq!(got, original);
    }
}

/// Regression: a symlink planted at the predictable temporary name
/// `<archive_dir>/<queue>/.<day>.jsonl.zst.tmp` made the sweep overwrite the file it
/// pointed to. Now the link is removed and the file created exclusively; and an
/// archive directory every user may write to is refused.
#[cfg(unix)]
#[tokio::test]
async fn retention_never_follows_a_planted_link_and_refuses_a_shared_directory() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), "a.db");
    let rows: Vec<DeadLetter> = (0..3)
        .map(|i| dead(i, "agent.tasks", 40 * DAY_MS + i as i64))
        .collect();
    s.insert_batch(&rows).await.unwrap();
    let r = retention(dir.path());
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    let queue_dir = r.archive_dir.join("agent.tasks");
    std::fs::create_dir_all(&queue_dir).unwrap();
    let day_start = (NOW - 40 * DAY_MS) / DAY_MS * DAY_MS;
    let day = humantime::format_rfc3339(
        std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(day_start).unwrap()),
    )
    .to_string()[..10]
        .to_owned();
    std::os::unix::fs::symlink(&victim, queue_dir.join(format!(".{day}.jsonl.zst.tmp"))).unwrap();
    let report = sweep(&s, &r, NOW, None).await.unwrap();
    assert_eq!(report.archived, 3);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert_eq!(read_file(&report.files[0]).unwrap().len(), 3);

    let shared = tempfile::tempdir().unwrap();
    let s = store(shared.path(), "b.db");
    s.insert_batch(&rows).await.unwrap();
    let r = retention(shared.path());
    let queue_dir = r.archive_dir.join("agent.tasks");
    std::fs::create_dir_all(&queue_dir).unwrap();
    std::fs::set_permissions(&queue_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = sweep(&s, &r, NOW, None).await.unwrap_err().to_string();
    assert!(err.contains("writable by every user"), "{err}");
    assert_eq!(all(&s).await.len(), 3, "nothing deleted");
}
