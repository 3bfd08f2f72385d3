//! The connection pool, and the schema redrive creates and migrates itself.

use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use crate::acks::Acks;
use crate::config::PostgresConfig;
use crate::error::PgError;
use crate::wake::Wakeups;

/// The schema's migrations, in order: version N is `MIGRATIONS[N - 1]`. A migration is
/// never edited once released; a change is a new one at the end.
const MIGRATIONS: &[&str] = &[
    // 1: dead letters and the audit log.
    r"
    CREATE TABLE dead_letters (
        id              TEXT    PRIMARY KEY,
        queue           TEXT    NOT NULL,
        replayed        BOOLEAN NOT NULL DEFAULT false,
        dead_at_ms      BIGINT  NOT NULL,
        attempts        BIGINT  NOT NULL,
        error_class     TEXT    NOT NULL,
        error           TEXT    NOT NULL,
        fingerprint     TEXT    NOT NULL,
        first_failed_ms BIGINT,
        last_failed_ms  BIGINT,
        key             BYTEA,              -- UTF-8; bytes, because text cannot hold NUL
        payload         BYTEA   NOT NULL,   -- zstd-compressed when `compressed` (warm)
        headers         TEXT    NOT NULL,   -- the envelope's wire headers, JSON
        compressed      BOOLEAN NOT NULL DEFAULT false
    );
    CREATE INDEX dead_by_time  ON dead_letters (dead_at_ms, id) WHERE NOT replayed;
    CREATE INDEX dead_by_queue ON dead_letters (queue, dead_at_ms, id) WHERE NOT replayed;
    CREATE INDEX dead_by_fp    ON dead_letters (fingerprint, last_failed_ms) WHERE NOT replayed;

    CREATE TABLE audit (
        seq    BIGSERIAL PRIMARY KEY,
        at_ms  BIGINT NOT NULL,
        actor  TEXT   NOT NULL,
        action TEXT   NOT NULL,
        detail TEXT   NOT NULL,
        count  BIGINT NOT NULL,
        reason TEXT   NOT NULL
    );
    ",
    // 2: alert state and the notification outbox.
    r"
    -- One row per (rule, queue) while pending or firing; resolved rows stay as history.
    CREATE TABLE alerts (
        seq         BIGSERIAL PRIMARY KEY,
        rule        TEXT   NOT NULL,
        queue       TEXT   NOT NULL,
        phase       TEXT   NOT NULL,
        since_ms    BIGINT NOT NULL,
        fired_ms    BIGINT,
        resolved_ms BIGINT,
        value       BIGINT NOT NULL
    );
    CREATE UNIQUE INDEX alerts_open ON alerts (rule, queue) WHERE phase <> 'resolved';

    -- Written in the transaction of the transition they announce, then delivered (and
    -- retried) from here.
    CREATE TABLE alert_outbox (
        id         BIGSERIAL PRIMARY KEY,
        notifier   TEXT    NOT NULL,
        kind       TEXT    NOT NULL,
        rule       TEXT    NOT NULL,
        expr       TEXT    NOT NULL,
        queue      TEXT    NOT NULL,
        value      BIGINT  NOT NULL,
        at_ms      BIGINT  NOT NULL,
        attempts   INTEGER NOT NULL DEFAULT 0,
        next_ms    BIGINT,             -- NULL once sent or given up
        sent_ms    BIGINT,
        failed     BOOLEAN NOT NULL DEFAULT false,
        last_error TEXT
    );
    CREATE INDEX alert_outbox_due ON alert_outbox (next_ms) WHERE next_ms IS NOT NULL;
    ",
    // 3: who evaluates alerts, and who sweeps, among the processes sharing the schema.
    r"
    CREATE TABLE leases (
        role     TEXT   PRIMARY KEY,
        holder   TEXT   NOT NULL,
        until_ms BIGINT NOT NULL
    );
    ",
    // 4: lanes. A row is a message in main, a retry tier or the isolation lane; a
    // leased row's `due_ms` is its lease expiry, so one index finds both due messages
    // and expired leases. A producer that knows nothing of redrive may insert
    // `(queue, payload)` and let the defaults fill in the rest.
    r"
    CREATE TABLE queues (
        name       TEXT   PRIMARY KEY,
        tiers      TEXT,                -- the tier names a consumer registered, comma-separated
        created_ms BIGINT NOT NULL
    );

    CREATE TABLE messages (
        seq          BIGSERIAL PRIMARY KEY,
        queue        TEXT     NOT NULL,
        lane         TEXT     NOT NULL DEFAULT 'main'
                     CHECK (lane IN ('main', 'isolated') OR lane LIKE 'retry.%'),
        -- 0: a retry tier, 1: main, 2: the isolation lane (fetch order, and the index).
        kind         SMALLINT NOT NULL GENERATED ALWAYS AS
                     (CASE WHEN lane = 'main' THEN 1 WHEN lane = 'isolated' THEN 2 ELSE 0 END) STORED,
        due_ms       BIGINT   NOT NULL DEFAULT (extract(epoch FROM clock_timestamp()) * 1000)::bigint,
        leased       BOOLEAN  NOT NULL DEFAULT false,
        lease_id     BIGINT   NOT NULL DEFAULT 0,
        published_ms BIGINT   NOT NULL DEFAULT (extract(epoch FROM clock_timestamp()) * 1000)::bigint,
        key          BYTEA,             -- UTF-8
        payload      BYTEA    NOT NULL,
        headers      TEXT     NOT NULL DEFAULT '[]'  -- the envelope's wire headers, JSON
    );
    CREATE INDEX messages_due ON messages (queue, kind, due_ms, seq);

    -- Whoever inserts (redrive or plain SQL), consumers waiting on the queue wake up.
    CREATE FUNCTION messages_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('redrive', TG_TABLE_SCHEMA || '.' || q.queue)
            FROM (SELECT DISTINCT queue FROM inserted) q;
        RETURN NULL;
    END $$;
    CREATE TRIGGER messages_notify AFTER INSERT ON messages
        REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION messages_notify();
    ",
    // 5: what a dead letter's failed attempts cost, as its handlers reported (the
    // envelope's spend): summed per error group in triage.
    r"
    ALTER TABLE dead_letters
        ADD COLUMN input_tokens  BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN output_tokens BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN cost_micros   BIGINT NOT NULL DEFAULT 0;  -- millionths of a US dollar
    ",
    // 6: replay jobs: what each was asked to do (`spec`, JSON), where it stands, and
    // its messages (snapshot when it started) with what became of each; and consumers'
    // open breakers.
    r"
    CREATE TABLE replay_jobs (
        id         TEXT   PRIMARY KEY,
        created_ms BIGINT NOT NULL,
        updated_ms BIGINT NOT NULL,
        state      TEXT   NOT NULL,
        note       TEXT   NOT NULL DEFAULT '',
        spec       TEXT   NOT NULL,
        owner      TEXT   NOT NULL DEFAULT '',  -- the process running it, while its lease lasts
        lease_ms   BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE replay_items (
        job     TEXT    NOT NULL,
        seq     BIGINT  NOT NULL,
        id      TEXT    NOT NULL,
        key     TEXT,
        canary  BOOLEAN NOT NULL,
        state   TEXT    NOT NULL,
        replays INTEGER NOT NULL DEFAULT 0,
        detail  TEXT    NOT NULL DEFAULT '',
        was     TEXT    NOT NULL DEFAULT '',
        at_ms   BIGINT  NOT NULL,
        PRIMARY KEY (job, seq)
    );
    CREATE INDEX replay_items_by_message ON replay_items (id, state);
    -- Consumers' open outage breakers, renewed while open, deleted when closed.
    CREATE TABLE breakers (
        queue    TEXT   NOT NULL,
        consumer TEXT   NOT NULL,
        since_ms BIGINT NOT NULL,
        seen_ms  BIGINT NOT NULL,
        PRIMARY KEY (queue, consumer)
    );
    ",
];

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// A PostgreSQL store: a pool of connections to one schema. Cheap to clone; every clone
/// shares the pool. Any number of processes, on any hosts, may open the same schema.
#[derive(Clone)]
pub struct Postgres {
    pub(crate) pool: Pool,
    pub(crate) display: String,
    pub(crate) wakeups: Arc<Wakeups>,
    pub(crate) acks: Arc<Acks>,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("url", &self.display)
            .finish()
    }
}

impl PostgresConfig {
    /// Connects, creates the schema when it is missing and brings it to
    /// [`SCHEMA_VERSION`]. Processes that start together migrate one at a time.
    ///
    /// # Errors
    ///
    /// The server cannot be reached, a migration fails (then none of it is applied), or
    /// the schema is newer than this build ([`PgError::TooNew`]).
    pub async fn open(&self) -> Result<Postgres, PgError> {
        let tls = self.tls.connector()?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &tls {
            Some(tls) => Manager::from_config(self.pg.clone(), tls.clone(), manager_config),
            None => Manager::from_config(self.pg.clone(), NoTls, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(self.pool_size)
            .build()
            .map_err(|e| PgError::Unavailable {
                address: self.display.clone(),
                reason: e.to_string(),
            })?;
        let store = Postgres {
            acks: Arc::new(Acks::new(pool.clone(), self.display.clone())),
            pool,
            display: self.display.clone(),
            wakeups: Arc::new(Wakeups::new(self.pg.clone(), tls, self.schema.clone())),
        };
        migrate(&store, &self.schema).await?;
        Ok(store)
    }
}

impl Postgres {
    /// A connection from the pool.
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Client, PgError> {
        self.pool.get().await.map_err(|e| PgError::Unavailable {
            address: self.display.clone(),
            // The pool's error wraps the driver's, whose causes say what happened
            // ("error connecting to server: Connection refused").
            reason: match e {
                deadpool_postgres::PoolError::Backend(e) => with_causes(&e),
                other => other.to_string(),
            },
        })
    }
}

/// An error and its causes, on one line.
pub(crate) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

async fn migrate(store: &Postgres, schema: &str) -> Result<(), PgError> {
    let mut client = store.client().await?;
    let tx = client
        .transaction()
        .await
        .map_err(PgError::query("begin the migration"))?;
    // One migrating process at a time per schema: the lock is held until the commit.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('redrive schema ' || $1))",
        &[&schema],
    )
    .await
    .map_err(PgError::query("lock the schema for migration"))?;
    // The name was checked to be a plain lower-case identifier; quoted all the same.
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
         CREATE TABLE IF NOT EXISTS \"{schema}\".schema_version (version INTEGER NOT NULL);"
    ))
    .await
    .map_err(PgError::query("create the schema"))?;
    let found: Option<i32> = tx
        .query_opt("SELECT max(version) FROM schema_version", &[])
        .await
        .map_err(PgError::query("read the schema version"))?
        .and_then(|row| row.get(0));
    let found = found.unwrap_or(0);
    if found > SCHEMA_VERSION {
        // Ended here, not when the connection goes back to the pool.
        let _ = tx.rollback().await;
        return Err(PgError::TooNew {
            schema: schema.to_owned(),
            found,
            known: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(found).unwrap_or(0))
    {
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.batch_execute(sql)
            .await
            .map_err(PgError::query("apply a schema migration"))?;
        tx.execute("DELETE FROM schema_version", &[])
            .await
            .map_err(PgError::query("record the schema version"))?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(PgError::query("record the schema version"))?;
        tracing::info!(schema, version, "PostgreSQL schema migrated");
    }
    tx.commit()
        .await
        .map_err(PgError::query("commit the migration"))?;
    Ok(())
}
