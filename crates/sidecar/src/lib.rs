//! Handlers for agents written in any language: run a command per message (`--exec`),
//! POST it to an HTTP endpoint (`--webhook`), or hand it to long-lived worker processes
//! (`--worker`). Both map their results onto redrive's
//! outcomes as docs/design.md tabulates ("Outcomes").

mod exec;
mod webhook;
mod worker;

pub use exec::{EX_DATAERR, EX_TEMPFAIL, ExecHandler};
pub use webhook::{WebhookError, WebhookHandler};
pub use worker::{PROTOCOL_VERSION, WorkerHandler};

/// Keeps the last `max` bytes written to it.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    buf: Vec<u8>,
    max: usize,
}

impl Tail {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
        }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > self.max * 2 {
            let cut = self.buf.len() - self.max;
            self.buf.drain(..cut);
        }
    }

    pub(crate) fn text(&self) -> String {
        let start = self.buf.len().saturating_sub(self.max);
        String::from_utf8_lossy(&self.buf[start..])
            .trim()
            .to_owned()
    }
}
