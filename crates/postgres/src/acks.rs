//! Acks in batches: group commit for the hottest settle.
//!
//! A consumer running fifty handlers acks fifty messages in the time one commit takes;
//! one statement (and one commit) per ack would make the commit rate the ceiling. Acks
//! therefore queue here, and a few flushers each take everything queued, delete it in one
//! fenced statement and answer every caller: an ack still returns only once its delete
//! is committed, and one whose lease was lost still hears so.

use std::collections::HashSet;
use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::error::PgError;

/// Flushers running at once: while one waits on its commit, the next gathers a batch.
const FLUSHERS: usize = 3;

/// The most acks one statement carries.
const MAX_BATCH: usize = 1024;

const ACK_MANY: &str = "
    DELETE FROM messages m USING unnest($1::bigint[], $2::bigint[]) AS a(seq, lease_id)
    WHERE m.seq = a.seq AND m.lease_id = a.lease_id
    RETURNING m.seq";

type Reply = oneshot::Sender<Result<bool, PgError>>;

/// The queue of acks waiting for a flusher.
pub(crate) struct Acks {
    tx: mpsc::UnboundedSender<(i64, i64, Reply)>,
    /// Taken by the first ack, which starts the flushers on its runtime.
    rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<(i64, i64, Reply)>>>,
    pool: Pool,
    /// Where the server is, for errors.
    address: String,
}

impl Acks {
    pub(crate) fn new(pool: Pool, address: String) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            tx,
            rx: std::sync::Mutex::new(Some(rx)),
            pool,
            address,
        }
    }

    /// Deletes the row `seq` if its lease is still `lease_id`; whether it was.
    pub(crate) async fn ack(&self, seq: i64, lease_id: i64) -> Result<bool, PgError> {
        let taken = self
            .rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(rx) = taken {
            let rx = Arc::new(Mutex::new(rx));
            for _ in 0..FLUSHERS {
                tokio::spawn(flusher(
                    Arc::clone(&rx),
                    self.pool.clone(),
                    self.address.clone(),
                ));
            }
        }
        let (reply, answer) = oneshot::channel();
        let closed = || PgError::Unavailable {
            address: self.address.clone(),
            reason: "the flushers stopped (their runtime shut down)".to_owned(),
        };
        self.tx.send((seq, lease_id, reply)).map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

async fn flusher(
    rx: Arc<Mutex<mpsc::UnboundedReceiver<(i64, i64, Reply)>>>,
    pool: Pool,
    address: String,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        {
            let mut rx = rx.lock().await;
            if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
                return; // Every handle is gone.
            }
        }
        let result = flush(&pool, &batch).await;
        for (seq, _, reply) in batch.drain(..) {
            let _ = reply.send(match &result {
                Ok(deleted) => Ok(deleted.contains(&seq)),
                Err(e) => Err(PgError::Unavailable {
                    address: address.clone(),
                    reason: e.to_string(),
                }),
            });
        }
    }
}

async fn flush(pool: &Pool, batch: &[(i64, i64, Reply)]) -> Result<HashSet<i64>, PgError> {
    let seqs: Vec<i64> = batch.iter().map(|(s, _, _)| *s).collect();
    let leases: Vec<i64> = batch.iter().map(|(_, l, _)| *l).collect();
    let client = pool.get().await.map_err(|e| PgError::Unavailable {
        address: String::new(),
        reason: e.to_string(),
    })?;
    let statement = client
        .prepare_cached(ACK_MANY)
        .await
        .map_err(PgError::query("prepare ack"))?;
    let rows = client
        .query(&statement, &[&seqs, &leases])
        .await
        .map_err(PgError::query("ack"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
