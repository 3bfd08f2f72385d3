//! Wake-ups for idle consumers: `LISTEN`/`NOTIFY` instead of polling.
//!
//! Every insert into `messages` notifies channel `redrive` with `SCHEMA.QUEUE` (a
//! trigger does, so plain SQL producers wake consumers too), and so do redrive's own
//! moves that make a message due (a retry, a release). One connection per process
//! listens and bumps a counter per queue; a fetch that found nothing waits on its queue's
//! counter, or until the next message it knows of is due, whichever comes first.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

/// The notification channel, shared by every schema of a database (the payload names
/// the schema).
pub(crate) const CHANNEL: &str = "redrive";

/// The listening side, one per [`Postgres`](crate::Postgres) and its clones.
pub(crate) struct Wakeups {
    pg: tokio_postgres::Config,
    tls: Option<MakeRustlsConnect>,
    /// `SCHEMA.`: what a notification for this schema starts with.
    prefix: String,
    queues: Mutex<HashMap<String, watch::Sender<u64>>>,
    started: AtomicBool,
    /// Dropped with the last handle, which ends the listening task.
    stop: Mutex<Option<oneshot::Sender<()>>>,
}

impl Wakeups {
    pub(crate) fn new(
        pg: tokio_postgres::Config,
        tls: Option<MakeRustlsConnect>,
        schema: String,
    ) -> Self {
        Self {
            pg,
            tls,
            prefix: format!("{schema}."),
            queues: Mutex::new(HashMap::new()),
            started: AtomicBool::new(false),
            stop: Mutex::new(None),
        }
    }

    /// The notification payload for `queue`.
    pub(crate) fn payload(&self, queue: &str) -> String {
        format!("{}{queue}", self.prefix)
    }

    /// A receiver that changes when `queue` is notified from now on. The first call
    /// starts the listening connection (on the caller's runtime).
    pub(crate) fn subscribe(self: &Arc<Self>, queue: &str) -> watch::Receiver<u64> {
        if !self.started.swap(true, Ordering::AcqRel) {
            let (stop_tx, stop_rx) = oneshot::channel();
            *self
                .stop
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(stop_tx);
            tokio::spawn(listen(
                Arc::downgrade(self),
                self.pg.clone(),
                self.tls.clone(),
                self.prefix.clone(),
                stop_rx,
            ));
        }
        let mut queues = self
            .queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        queues
            .entry(queue.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn wake(&self, queue: Option<&str>) {
        let queues = self
            .queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (name, tx) in queues.iter() {
            if queue.is_none_or(|q| q == name) {
                tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }
}

/// Listens until the last handle is dropped, reconnecting with backoff. After each
/// (re)connection every waiter is woken: what was notified meanwhile was missed.
async fn listen(
    wakeups: Weak<Wakeups>,
    pg: tokio_postgres::Config,
    tls: Option<MakeRustlsConnect>,
    prefix: String,
    mut stop: oneshot::Receiver<()>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            ended = session(&wakeups, &pg, tls.as_ref(), &prefix, &mut backoff) => {
                if let Err(e) = ended {
                    tracing::warn!(error = %crate::db::with_causes(&e), retry_in_ms = backoff.as_millis() as u64,
                        "PostgreSQL wake-up connection lost; idle consumers poll each second meanwhile");
                }
            }
        }
        tokio::select! {
            _ = &mut stop => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn session(
    wakeups: &Weak<Wakeups>,
    pg: &tokio_postgres::Config,
    tls: Option<&MakeRustlsConnect>,
    prefix: &str,
    backoff: &mut Duration,
) -> Result<(), tokio_postgres::Error> {
    match tls {
        Some(tls) => {
            let (client, conn) = pg.connect(tls.clone()).await?;
            listen_on(wakeups, &client, conn, prefix, backoff).await
        }
        None => {
            let (client, conn) = pg.connect(NoTls).await?;
            listen_on(wakeups, &client, conn, prefix, backoff).await
        }
    }
}

async fn listen_on<S, T>(
    wakeups: &Weak<Wakeups>,
    client: &tokio_postgres::Client,
    mut conn: tokio_postgres::Connection<S, T>,
    prefix: &str,
    backoff: &mut Duration,
) -> Result<(), tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let statement = format!("LISTEN {CHANNEL}");
    let listen = client.batch_execute(&statement);
    tokio::pin!(listen);
    let mut listening = false;
    loop {
        tokio::select! {
            done = &mut listen, if !listening => {
                done?;
                listening = true;
                *backoff = Duration::from_millis(100);
                if let Some(w) = wakeups.upgrade() {
                    w.wake(None);
                }
            }
            message = std::future::poll_fn(|cx| conn.poll_message(cx)) => match message {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    let Some(w) = wakeups.upgrade() else { return Ok(()) };
                    if let Some(queue) = n.payload().strip_prefix(prefix) {
                        w.wake(Some(queue));
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
        }
    }
}
