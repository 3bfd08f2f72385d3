//! The database: schema, the group-commit writer thread, and a reader connection.
//!
//! Every write goes through one writer thread. It takes the first waiting operation,
//! then every other operation queued by then (up to a bound), runs them in one
//! transaction, each inside its own savepoint so one failing operation does not undo
//! the others, commits once, and only then answers each caller. With
//! `synchronous=FULL` that commit is fsynced, so an operation is durable before its
//! caller hears of it, while a burst of operations pays for one fsync.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

use crate::config::{Durability, SqliteConfig};
use crate::error::SqliteError;

/// Most operations folded into one commit, bounding a commit's latency.
const MAX_GROUP: usize = 2048;

const SCHEMA: &str = r"
CREATE TABLE IF NOT EXISTS messages (
    seq          INTEGER PRIMARY KEY,
    queue        TEXT    NOT NULL,
    lane         TEXT    NOT NULL,
    due_ms       INTEGER NOT NULL,  -- due time; while leased, the lease expiry
    leased       INTEGER NOT NULL DEFAULT 0,
    lease_id     INTEGER NOT NULL DEFAULT 0,
    published_ms INTEGER NOT NULL,
    key          TEXT,
    payload      BLOB    NOT NULL,
    headers      TEXT    NOT NULL   -- the envelope's wire headers, JSON
);
-- Per lane, so due retries can be served ahead of a main backlog without a sort.
CREATE INDEX IF NOT EXISTS messages_lane_due ON messages (queue, lane, due_ms);

CREATE TABLE IF NOT EXISTS queues (
    name       TEXT PRIMARY KEY,
    tiers      TEXT,
    created_ms INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS dead_letters (
    id              TEXT    PRIMARY KEY,
    queue           TEXT    NOT NULL,
    replayed        INTEGER NOT NULL DEFAULT 0,
    dead_at_ms      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL,
    error_class     TEXT    NOT NULL,
    error           TEXT    NOT NULL,
    fingerprint     TEXT    NOT NULL,
    first_failed_ms INTEGER,
    last_failed_ms  INTEGER,
    key             TEXT,
    payload         BLOB    NOT NULL,   -- zstd-compressed when `compressed` (warm)
    headers         TEXT    NOT NULL,
    compressed      INTEGER NOT NULL DEFAULT 0,
    -- What its failed attempts cost, as its handlers reported (the envelope's spend).
    input_tokens    INTEGER NOT NULL DEFAULT 0,
    output_tokens   INTEGER NOT NULL DEFAULT 0,
    cost_micros     INTEGER NOT NULL DEFAULT 0   -- millionths of a US dollar
);
CREATE INDEX IF NOT EXISTS dead_by_time  ON dead_letters (replayed, dead_at_ms, id);
CREATE INDEX IF NOT EXISTS dead_by_queue ON dead_letters (replayed, queue, dead_at_ms, id);
CREATE INDEX IF NOT EXISTS dead_by_fp    ON dead_letters (replayed, fingerprint, last_failed_ms);

-- Error groups kept current by triggers (`GROUP_TRIGGERS`), so grouping a large DLQ
-- reads a few hundred rows instead of every dead message. Counts and sums are exact;
-- first/last seen only grow, as in an error tracker.
CREATE TABLE IF NOT EXISTS dead_groups (
    fingerprint   TEXT    NOT NULL,
    queue         TEXT    NOT NULL,
    error_class   TEXT    NOT NULL,
    dead          INTEGER NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL,
    sample_error  TEXT    NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    input_tokens  INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cost_micros   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (fingerprint, queue)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS dead_groups_by_count ON dead_groups (dead);

-- Alerts: one row per (rule, queue) while pending or firing; resolved rows stay as history.
CREATE TABLE IF NOT EXISTS alerts (
    seq         INTEGER PRIMARY KEY,
    rule        TEXT    NOT NULL,
    queue       TEXT    NOT NULL,
    phase       TEXT    NOT NULL,
    since_ms    INTEGER NOT NULL,
    fired_ms    INTEGER,
    resolved_ms INTEGER,
    value       INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS alerts_open ON alerts (rule, queue) WHERE phase != 'resolved';

-- Notifications are written in the same transaction as the alert transition they
-- announce, then delivered (and retried) from here.
CREATE TABLE IF NOT EXISTS alert_outbox (
    id         INTEGER PRIMARY KEY,
    notifier   TEXT    NOT NULL,
    kind       TEXT    NOT NULL,
    rule       TEXT    NOT NULL,
    expr       TEXT    NOT NULL,
    queue      TEXT    NOT NULL,
    value      INTEGER NOT NULL,
    at_ms      INTEGER NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    next_ms    INTEGER,            -- NULL once sent or given up
    sent_ms    INTEGER,
    failed     INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS alert_outbox_due ON alert_outbox (next_ms) WHERE next_ms IS NOT NULL;

-- Replay jobs: what each was asked to do (`spec`, JSON) and where it stands.
CREATE TABLE IF NOT EXISTS replay_jobs (
    id         TEXT    PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    state      TEXT    NOT NULL,
    note       TEXT    NOT NULL DEFAULT '',
    spec       TEXT    NOT NULL,
    owner      TEXT    NOT NULL DEFAULT '',  -- the process running it, while its lease lasts
    lease_ms   INTEGER NOT NULL DEFAULT 0
);

-- The messages of each job, snapshot when it started, and what became of each.
CREATE TABLE IF NOT EXISTS replay_items (
    job     TEXT    NOT NULL,
    seq     INTEGER NOT NULL,
    id      TEXT    NOT NULL,
    key     TEXT,
    canary  INTEGER NOT NULL,
    state   TEXT    NOT NULL,
    replays INTEGER NOT NULL DEFAULT 0,
    detail  TEXT    NOT NULL DEFAULT '',
    was     TEXT    NOT NULL DEFAULT '',
    at_ms   INTEGER NOT NULL,
    PRIMARY KEY (job, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS replay_items_by_message ON replay_items (id, state);

-- Consumers' open outage breakers, renewed while open, deleted when closed.
CREATE TABLE IF NOT EXISTS breakers (
    queue    TEXT    NOT NULL,
    consumer TEXT    NOT NULL,
    since_ms INTEGER NOT NULL,
    seen_ms  INTEGER NOT NULL,
    PRIMARY KEY (queue, consumer)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS audit (
    seq    INTEGER PRIMARY KEY,
    at_ms  INTEGER NOT NULL,
    actor  TEXT    NOT NULL,
    action TEXT    NOT NULL,
    detail TEXT    NOT NULL,
    count  INTEGER NOT NULL,
    reason TEXT    NOT NULL
);
";

/// The triggers that keep `dead_groups` current. Their names are part of the schema: a
/// migration drops and recreates them by name.
const GROUP_TRIGGERS: &str = r"
CREATE TRIGGER IF NOT EXISTS dead_groups_on_insert AFTER INSERT ON dead_letters WHEN NEW.replayed = 0
BEGIN
    INSERT INTO dead_groups (fingerprint, queue, error_class, dead, first_seen_ms, last_seen_ms, sample_error,
                             attempts, input_tokens, output_tokens, cost_micros)
    VALUES (NEW.fingerprint, NEW.queue, NEW.error_class, 1,
        coalesce(NEW.first_failed_ms, NEW.dead_at_ms), coalesce(NEW.last_failed_ms, NEW.dead_at_ms), NEW.error,
        NEW.attempts, NEW.input_tokens, NEW.output_tokens, NEW.cost_micros)
    ON CONFLICT (fingerprint, queue) DO UPDATE SET
        dead = dead + 1, error_class = excluded.error_class, sample_error = excluded.sample_error,
        first_seen_ms = min(first_seen_ms, excluded.first_seen_ms), last_seen_ms = max(last_seen_ms, excluded.last_seen_ms),
        attempts = attempts + excluded.attempts, input_tokens = input_tokens + excluded.input_tokens,
        output_tokens = output_tokens + excluded.output_tokens, cost_micros = cost_micros + excluded.cost_micros;
END;

CREATE TRIGGER IF NOT EXISTS dead_groups_on_delete AFTER DELETE ON dead_letters WHEN OLD.replayed = 0
BEGIN
    UPDATE dead_groups SET dead = dead - 1, attempts = attempts - OLD.attempts,
        input_tokens = input_tokens - OLD.input_tokens, output_tokens = output_tokens - OLD.output_tokens,
        cost_micros = cost_micros - OLD.cost_micros
    WHERE fingerprint = OLD.fingerprint AND queue = OLD.queue;
END;

CREATE TRIGGER IF NOT EXISTS dead_groups_on_update AFTER UPDATE ON dead_letters
BEGIN
    UPDATE dead_groups SET dead = dead - 1, attempts = attempts - OLD.attempts,
        input_tokens = input_tokens - OLD.input_tokens, output_tokens = output_tokens - OLD.output_tokens,
        cost_micros = cost_micros - OLD.cost_micros
    WHERE OLD.replayed = 0 AND fingerprint = OLD.fingerprint AND queue = OLD.queue;
    INSERT INTO dead_groups (fingerprint, queue, error_class, dead, first_seen_ms, last_seen_ms, sample_error,
                             attempts, input_tokens, output_tokens, cost_micros)
    SELECT NEW.fingerprint, NEW.queue, NEW.error_class, 1,
        coalesce(NEW.first_failed_ms, NEW.dead_at_ms), coalesce(NEW.last_failed_ms, NEW.dead_at_ms), NEW.error,
        NEW.attempts, NEW.input_tokens, NEW.output_tokens, NEW.cost_micros
    WHERE NEW.replayed = 0
    ON CONFLICT (fingerprint, queue) DO UPDATE SET
        dead = dead + 1, error_class = excluded.error_class, sample_error = excluded.sample_error,
        first_seen_ms = min(first_seen_ms, excluded.first_seen_ms), last_seen_ms = max(last_seen_ms, excluded.last_seen_ms),
        attempts = attempts + excluded.attempts, input_tokens = input_tokens + excluded.input_tokens,
        output_tokens = output_tokens + excluded.output_tokens, cost_micros = cost_micros + excluded.cost_micros;
END;
";

/// The text index of dead letters: a trigram full-text table over each one's error and
/// payload, so free-text search (a case-sensitive substring of 3 characters or more)
/// reads the rows that hold it instead of every dead letter. Contentless (it stores no
/// copy of the text) and keyed by the dead letter's rowid; kept exact by the triggers
/// below. A payload compressed later (warm retention) stays indexed as it was, so warm
/// dead letters remain searchable by their payload as well as their error.
const TEXT_INDEX: &str = r"
CREATE VIRTUAL TABLE IF NOT EXISTS dead_text USING fts5(
    error, payload, content = '', contentless_delete = 1, tokenize = 'trigram case_sensitive 1'
);

CREATE TRIGGER IF NOT EXISTS dead_text_on_insert AFTER INSERT ON dead_letters
BEGIN
    INSERT INTO dead_text (rowid, error, payload)
    VALUES (NEW.rowid, NEW.error, CASE WHEN NEW.compressed THEN NULL ELSE CAST(NEW.payload AS TEXT) END);
END;

CREATE TRIGGER IF NOT EXISTS dead_text_on_delete AFTER DELETE ON dead_letters
BEGIN
    DELETE FROM dead_text WHERE rowid = OLD.rowid;
END;

-- A message that dies again replaces its row's text; compressing a payload does not.
CREATE TRIGGER IF NOT EXISTS dead_text_on_update AFTER UPDATE OF error, payload ON dead_letters
    WHEN NEW.compressed = 0
BEGIN
    DELETE FROM dead_text WHERE rowid = OLD.rowid;
    INSERT INTO dead_text (rowid, error, payload) VALUES (NEW.rowid, NEW.error, CAST(NEW.payload AS TEXT));
END;
";

/// The schema version this build writes (`PRAGMA user_version`). Version 0 is a file
/// from before versions were kept; [`migrate`] brings any older file up to this.
const SCHEMA_VERSION: i64 = 2;

/// Creates what is missing and brings an older file up to [`SCHEMA_VERSION`], in one
/// transaction, so two processes opening the same old file migrate it once.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(rusqlite::Error::InvalidParameterName(format!(
                "the file has schema version {version}, written by a newer redrive; this one knows up to {SCHEMA_VERSION}"
            )));
        }
        conn.execute_batch(SCHEMA)?;
        let has_cost: bool = conn.query_row(
            "SELECT count(*) FROM pragma_table_info('dead_letters') WHERE name = 'cost_micros'",
            [],
            |r| r.get(0),
        )?;
        if !has_cost {
            // Version 0 to 1: what failed attempts cost, per dead letter and per group.
            conn.execute_batch(
                "ALTER TABLE dead_letters ADD COLUMN input_tokens INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE dead_letters ADD COLUMN output_tokens INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE dead_letters ADD COLUMN cost_micros INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE dead_groups ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE dead_groups ADD COLUMN input_tokens INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE dead_groups ADD COLUMN output_tokens INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE dead_groups ADD COLUMN cost_micros INTEGER NOT NULL DEFAULT 0;
                 DROP TRIGGER IF EXISTS dead_groups_on_insert;
                 DROP TRIGGER IF EXISTS dead_groups_on_delete;
                 DROP TRIGGER IF EXISTS dead_groups_on_update;
                 UPDATE dead_groups SET attempts = coalesce((SELECT sum(d.attempts) FROM dead_letters d
                     WHERE d.replayed = 0 AND d.fingerprint = dead_groups.fingerprint AND d.queue = dead_groups.queue), 0);",
            )?;
        }
        conn.execute_batch(GROUP_TRIGGERS)?;
        let has_text_index: bool = conn.query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name = 'dead_text'",
            [],
            |r| r.get(0),
        )?;
        conn.execute_batch(TEXT_INDEX)?;
        if !has_text_index {
            // Version 1 to 2: index the dead letters already kept (compressed payloads
            // by their error only).
            conn.execute_batch(
                "INSERT INTO dead_text (rowid, error, payload)
                 SELECT rowid, error, CASE WHEN compressed THEN NULL ELSE CAST(payload AS TEXT) END
                 FROM dead_letters",
            )?;
        }
        conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
    })();
    match result {
        Ok(()) => conn.execute_batch("COMMIT"),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// A job for the writer: runs its statements, and returns what to do once the
/// commit's fate is known.
type Completion = Box<dyn FnOnce(Result<(), SqliteError>) + Send>;
/// Called with `None` when the group could not start: the job then only reports.
type Run = Box<dyn FnOnce(Option<&Connection>) -> (bool, Completion) + Send>;

struct Job {
    run: Run,
    /// The job is one statement, atomic by itself: it needs no savepoint.
    single: bool,
}

struct Inner {
    path: PathBuf,
    /// Retry lanes seen per queue, with when they were last looked up (see
    /// `Sqlite::retry_lanes`).
    pub(crate) lanes: Mutex<std::collections::HashMap<String, (std::time::Instant, Vec<String>)>>,
    writer: Mutex<Option<mpsc::Sender<Job>>>,
    /// Group commits made so far (for `bench`: commits per message).
    commits: Arc<std::sync::atomic::AtomicU64>,
    reader: Mutex<Connection>,
}

/// The embedded store: a cheap handle, clone it freely.
#[derive(Clone)]
pub struct Sqlite {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Sqlite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sqlite")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

fn connect(path: &Path, durability: Durability) -> Result<Connection, SqliteError> {
    let open_err = |source| SqliteError::Open {
        path: path.to_owned(),
        source,
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(open_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(open_err)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(open_err(rusqlite::Error::InvalidParameterName(format!(
            "the file system refused WAL mode (journal_mode={mode})"
        ))));
    }
    let sync = match durability {
        Durability::Full => "FULL",
        Durability::Relaxed => "NORMAL",
    };
    conn.execute_batch(&format!(
        "PRAGMA synchronous={sync}; PRAGMA foreign_keys=OFF; PRAGMA temp_store=MEMORY;"
    ))
    .map_err(open_err)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

impl Sqlite {
    pub(crate) fn open(config: &SqliteConfig) -> Result<Self, SqliteError> {
        let path = config.path.clone();
        let conn = connect(&path, config.durability)?;
        migrate(&conn).map_err(|source| SqliteError::Open {
            path: path.clone(),
            source,
        })?;
        let reader = connect(&path, config.durability)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let commits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&commits);
        thread::Builder::new()
            .name("redrive-sqlite-writer".to_owned())
            .spawn(move || write_loop(&conn, &rx, &counter))
            .map_err(|e| SqliteError::Commit(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                lanes: Mutex::default(),
                commits,
                writer: Mutex::new(Some(tx)),
                reader: Mutex::new(reader),
            }),
        })
    }

    /// The database file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` in the writer's next group commit and returns its result once the
    /// commit is durable.
    pub(crate) async fn write<R, F>(&self, f: F) -> Result<R, SqliteError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, SqliteError> + Send + 'static,
    {
        self.submit(f, false).await
    }

    /// Like [`Sqlite::write`] for a job that runs exactly one statement, which is atomic
    /// on its own and so skips the savepoint (the common ack / retry path).
    pub(crate) async fn write_one<R, F>(&self, f: F) -> Result<R, SqliteError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, SqliteError> + Send + 'static,
    {
        self.submit(f, true).await
    }

    async fn submit<R, F>(&self, f: F, single: bool) -> Result<R, SqliteError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, SqliteError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let run: Run = Box::new(move |conn| {
            let result = match conn {
                Some(conn) => f(conn),
                None => Err(SqliteError::Commit(
                    "the transaction could not begin".to_owned(),
                )),
            };
            let ok = result.is_ok();
            let done: Completion = Box::new(move |commit| {
                let _ = tx.send(commit.and(result));
            });
            (ok, done)
        });
        let job = Job { run, single };
        {
            let writer = self
                .inner
                .writer
                .lock()
                .map_err(|_| SqliteError::WriterGone)?;
            writer
                .as_ref()
                .ok_or(SqliteError::WriterGone)?
                .send(job)
                .map_err(|_| SqliteError::WriterGone)?;
        }
        rx.await.map_err(|_| SqliteError::WriterGone)?
    }

    /// Runs a read on the reader connection, off the async threads.
    pub(crate) async fn read<R, F>(&self, f: F) -> Result<R, SqliteError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, SqliteError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let conn = inner.reader.lock().map_err(|_| SqliteError::WriterGone)?;
            f(&conn)
        })
        .await
        .map_err(|_| SqliteError::WriterGone)?
    }

    /// The retry lanes to fetch from: the consumer's tiers, plus any other retry lane
    /// that holds messages of the queue (left by a consumer with other tiers), looked
    /// up at most every 30 s so no message is stranded when tiers change.
    pub(crate) async fn retry_lanes(
        &self,
        queue: &str,
        configured: Vec<String>,
    ) -> Result<Vec<String>, SqliteError> {
        const REFRESH: std::time::Duration = std::time::Duration::from_secs(30);
        let cached = self.inner.lanes.lock().ok().and_then(|c| {
            c.get(queue)
                .filter(|(at, _)| at.elapsed() < REFRESH)
                .map(|(_, lanes)| lanes.clone())
        });
        let found = match cached {
            Some(found) => found,
            None => {
                let q = queue.to_owned();
                let found: Vec<String> = self
                    .read(move |conn| {
                        conn.prepare_cached(
                            "SELECT DISTINCT lane FROM messages WHERE queue = ?1 AND lane >= 'retry.' AND lane < 'retry/'",
                        )
                        .and_then(|mut s| s.query_map([q], |r| r.get(0))?.collect())
                        .map_err(SqliteError::query("list retry lanes"))
                    })
                    .await?;
                if let Ok(mut cache) = self.inner.lanes.lock() {
                    cache.insert(queue.to_owned(), (std::time::Instant::now(), found.clone()));
                }
                found
            }
        };
        let mut lanes = configured;
        for lane in found {
            if !lanes.contains(&lane) {
                lanes.push(lane);
            }
        }
        Ok(lanes)
    }

    /// How many group commits this handle's writer has made.
    #[must_use]
    pub fn commit_count(&self) -> u64 {
        self.inner
            .commits
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops the writer after the operations already queued; later writes fail.
    pub fn close(&self) {
        if let Ok(mut writer) = self.inner.writer.lock() {
            writer.take();
        }
    }
}

fn write_loop(conn: &Connection, rx: &mpsc::Receiver<Job>, commits: &std::sync::atomic::AtomicU64) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        run_group(conn, jobs);
        commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn run_group(conn: &Connection, jobs: Vec<Job>) {
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        tracing::error!(error = %e, "sqlite group commit could not begin");
        for job in jobs {
            let (_, done) = (job.run)(None);
            done(Err(SqliteError::Commit(format!(
                "cannot begin a transaction: {e}"
            ))));
        }
        return;
    }
    let mut completions = Vec::with_capacity(jobs.len());
    for job in jobs {
        if job.single {
            let (_, done) = (job.run)(Some(conn));
            completions.push((done, None));
            continue;
        }
        let savepoint = conn.execute_batch("SAVEPOINT job");
        let (ok, done) = (job.run)(Some(conn));
        let closed = if savepoint.is_ok() {
            if ok {
                conn.execute_batch("RELEASE job")
            } else {
                conn.execute_batch("ROLLBACK TO job; RELEASE job")
            }
        } else {
            savepoint
        };
        completions.push((done, closed.err().map(|e| e.to_string())));
    }
    let commit = conn.execute_batch("COMMIT").map_err(|e| e.to_string());
    if commit.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    for (done, savepoint_error) in completions {
        let result = match (&commit, savepoint_error) {
            (Err(e), _) => Err(SqliteError::Commit(e.clone())),
            (Ok(()), Some(e)) => Err(SqliteError::Commit(e)),
            (Ok(()), None) => Ok(()),
        };
        done(result);
    }
}

impl SqliteConfig {
    /// Opens (creating if needed) the store.
    ///
    /// # Errors
    ///
    /// Returns [`SqliteError::Open`] naming the file when it cannot be created, opened,
    /// switched to WAL mode or given its schema.
    pub fn open(&self) -> Result<Sqlite, SqliteError> {
        Sqlite::open(self)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The dead-letter tables and insert trigger as files without a schema version
    /// have them.
    const VERSION_0: &str = r"
        CREATE TABLE dead_letters (
            id TEXT PRIMARY KEY, queue TEXT NOT NULL, replayed INTEGER NOT NULL DEFAULT 0,
            dead_at_ms INTEGER NOT NULL, attempts INTEGER NOT NULL, error_class TEXT NOT NULL,
            error TEXT NOT NULL, fingerprint TEXT NOT NULL, first_failed_ms INTEGER,
            last_failed_ms INTEGER, key TEXT, payload BLOB NOT NULL, headers TEXT NOT NULL,
            compressed INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE dead_groups (
            fingerprint TEXT NOT NULL, queue TEXT NOT NULL, error_class TEXT NOT NULL,
            dead INTEGER NOT NULL, first_seen_ms INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL,
            sample_error TEXT NOT NULL, PRIMARY KEY (fingerprint, queue)) WITHOUT ROWID;
        CREATE TRIGGER dead_groups_on_insert AFTER INSERT ON dead_letters WHEN NEW.replayed = 0
        BEGIN
            INSERT INTO dead_groups VALUES (NEW.fingerprint, NEW.queue, NEW.error_class, 1,
                NEW.dead_at_ms, NEW.dead_at_ms, NEW.error)
            ON CONFLICT (fingerprint, queue) DO UPDATE SET dead = dead + 1;
        END;
        INSERT INTO dead_letters (id, queue, dead_at_ms, attempts, error_class, error, fingerprint, payload, headers)
            VALUES ('a', 'q', 1, 3, 'C', 'e', 'fp', x'00', '[]');
    ";

    fn group(conn: &Connection) -> (i64, i64, i64) {
        conn.query_row(
            "SELECT dead, attempts, cost_micros FROM dead_groups WHERE fingerprint = 'fp'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
    }

    #[test]
    fn a_file_from_before_schema_versions_is_migrated_once() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("old.db")).unwrap();
        conn.execute_batch(VERSION_0).unwrap();
        migrate(&conn).unwrap();
        assert_eq!(
            group(&conn),
            (1, 3, 0),
            "the group's attempts are summed from its messages"
        );
        conn.execute(
            "INSERT INTO dead_letters (id, queue, dead_at_ms, attempts, error_class, error, fingerprint,
                                       payload, headers, cost_micros)
             VALUES ('b', 'q', 2, 2, 'C', 'e', 'fp', x'00', '[]', 500)",
            [],
        )
        .unwrap();
        assert_eq!(group(&conn), (2, 5, 500), "the new triggers keep the sums");
        conn.execute("DELETE FROM dead_letters WHERE id = 'a'", [])
            .unwrap();
        assert_eq!(group(&conn), (1, 2, 500));
        migrate(&conn).unwrap();
        assert_eq!(group(&conn), (1, 2, 500), "a second open changes nothing");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);

        conn.execute_batch("PRAGMA user_version = 99").unwrap();
        let err = migrate(&conn).unwrap_err().to_string();
        assert!(err.contains("newer redrive"), "{err}");
    }

    fn found(conn: &Connection, text: &str) -> Vec<String> {
        let mut stmt = conn
            .prepare(
                "SELECT id FROM dead_letters WHERE rowid IN
                   (SELECT rowid FROM dead_text WHERE dead_text MATCH ?1) ORDER BY id",
            )
            .unwrap();
        stmt.query_map([format!("\"{text}\"")], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn the_text_index_covers_older_files_and_survives_compression() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("old.db")).unwrap();
        conn.execute_batch(VERSION_0).unwrap();
        conn.execute_batch(
            "INSERT INTO dead_letters (id, queue, dead_at_ms, attempts, error_class, error, fingerprint, payload, headers)
                 VALUES ('b', 'q', 1, 1, 'C', 'shard 7 answered 503', 'fp', CAST('{\"doc\":\"alpha-9\"}' AS BLOB), '[]');
             INSERT INTO dead_letters (id, queue, dead_at_ms, attempts, error_class, error, fingerprint, payload, headers, compressed)
                 VALUES ('c', 'q', 1, 1, 'C', 'quota exceeded', 'fp', x'28b52ffd', '[]', 1);",
        )
        .unwrap();
        migrate(&conn).unwrap();
        assert_eq!(found(&conn, "alpha-9"), ["b"], "indexed when migrated");
        assert_eq!(
            found(&conn, "quota"),
            ["c"],
            "a compressed one by its error"
        );
        assert!(
            found(&conn, "Alpha").is_empty(),
            "case-sensitive, as before"
        );

        conn.execute(
            "UPDATE dead_letters SET payload = x'28b52ffd00', compressed = 1 WHERE id = 'b'",
            [],
        )
        .unwrap();
        assert_eq!(found(&conn, "alpha-9"), ["b"], "still found once warm");
        conn.execute(
            "UPDATE dead_letters SET error = 'model refused', payload = CAST('beta' AS BLOB),
                                     compressed = 0 WHERE id = 'b'",
            [],
        )
        .unwrap();
        assert!(
            found(&conn, "alpha-9").is_empty(),
            "dead again: its new text only"
        );
        assert_eq!(found(&conn, "refused"), ["b"]);
        conn.execute("DELETE FROM dead_letters WHERE id = 'b'", [])
            .unwrap();
        assert!(
            found(&conn, "refused").is_empty(),
            "purged: gone from the index"
        );
        let indexed: i64 = conn
            .query_row("SELECT count(*) FROM dead_text", [], |r| r.get(0))
            .unwrap();
        assert_eq!(indexed, 2, "one row per dead letter (a and c)");
    }

    /// The text index is keyed by `dead_letters`' rowid, which has no INTEGER PRIMARY
    /// KEY to pin it: a `VACUUM` run by hand to reclaim space must keep the rowids.
    #[test]
    fn a_manual_vacuum_keeps_the_text_index_in_step() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("vacuum.db")).unwrap();
        migrate(&conn).unwrap();
        for i in 0..300 {
            conn.execute(
                "INSERT INTO dead_letters (id, queue, dead_at_ms, attempts, error_class, error, fingerprint, payload, headers)
                 VALUES (?1, 'q', 1, 1, 'C', ?2, 'fp', CAST(?3 AS BLOB), '[]')",
                rusqlite::params![
                    format!("id-{i:03}"),
                    format!("error-{i:03}"),
                    format!("payload-{i:03}")
                ],
            )
            .unwrap();
        }
        conn.execute(
            "DELETE FROM dead_letters WHERE CAST(substr(id, 4) AS INTEGER) % 3 = 0",
            [],
        )
        .unwrap();
        conn.execute_batch("VACUUM").unwrap();
        for i in 0..300 {
            let expected: Vec<String> = if i % 3 == 0 {
                Vec::new()
            } else {
                vec![format!("id-{i:03}")]
            };
            assert_eq!(
                found(&conn, &format!("error-{i:03}")),
                expected,
                "error {i}"
            );
            assert_eq!(
                found(&conn, &format!("payload-{i:03}")),
                expected,
                "payload {i}"
            );
        }
    }
}
