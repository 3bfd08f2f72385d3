//! A local HTTP receiver for tests: records every request body and answers with the
//! statuses it is told to, standing in for Slack, PagerDuty or any webhook.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One received request.
#[derive(Debug, Clone)]
pub struct Received {
    /// Request line, e.g. `POST /v2/enqueue HTTP/1.1`.
    pub request_line: String,
    /// Header lines, lower-cased names.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

/// A running receiver.
#[derive(Clone)]
pub struct HttpSink {
    /// Its base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    received: Arc<Mutex<Vec<Received>>>,
    statuses: Arc<Mutex<Vec<u16>>>,
}

impl HttpSink {
    /// Starts a receiver on a free loopback port. It answers `202` unless
    /// [`HttpSink::answer_next`] queued other statuses.
    ///
    /// # Panics
    ///
    /// When no loopback port can be bound.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let sink = Self {
            url,
            received: Arc::default(),
            statuses: Arc::default(),
        };
        let s = sink.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 8192];
                    // Read the head, then the body by Content-Length.
                    let head_end = loop {
                        let Ok(n) = socket.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                    let mut lines = head.split("\r\n");
                    let request_line = lines.next().unwrap_or_default().to_owned();
                    let headers: Vec<(String, String)> = lines
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                        .collect();
                    let len: usize = headers
                        .iter()
                        .find(|(k, _)| k == "content-length")
                        .and_then(|(_, v)| v.parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let Ok(n) = socket.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let body = buf[head_end..(head_end + len).min(buf.len())].to_vec();
                    let status = {
                        let mut st = s.statuses.lock().expect("lock");
                        if st.is_empty() { 202 } else { st.remove(0) }
                    };
                    if status < 300 {
                        s.received.lock().expect("lock").push(Received {
                            request_line,
                            headers,
                            body,
                        });
                    }
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
                    );
                    let _ = socket.write_all(reply.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        sink
    }

    /// Makes the next requests fail (or succeed) with these statuses, in order.
    ///
    /// # Panics
    ///
    /// Never in practice (a poisoned lock).
    pub fn answer_next(&self, statuses: &[u16]) {
        self.statuses
            .lock()
            .expect("lock")
            .extend_from_slice(statuses);
    }

    /// Requests answered with a 2xx so far, as JSON bodies.
    ///
    /// # Panics
    ///
    /// When a body is not JSON.
    #[must_use]
    pub fn json_bodies(&self) -> Vec<serde_json::Value> {
        self.received
            .lock()
            .expect("lock")
            .iter()
            .map(|r| serde_json::from_slice(&r.body).expect("a JSON body"))
            .collect()
    }

    /// Every request answered with a 2xx so far.
    ///
    /// # Panics
    ///
    /// Never in practice (a poisoned lock).
    #[must_use]
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }
}
