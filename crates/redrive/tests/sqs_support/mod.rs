//! What the SQS tests share: the local SQS-compatible server and a per-test queue prefix.

#![allow(dead_code)] // Each test binary uses part of it.

/// The SQS endpoint under test (`scripts/test` starts moto's server there).
pub fn endpoint() -> String {
    std::env::var("REDRIVE_TEST_SQS_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:9324".to_owned())
}

/// A test's own queues: `sqs://us-east-1?prefix=<unique>&endpoint=…`. The local server
/// takes any credentials; `scripts/test` exports test ones (AWS_ACCESS_KEY_ID …).
pub struct Scope {
    pub prefix: String,
    pub url: String,
}

impl Scope {
    #[allow(clippy::new_without_default)] // A fresh, unique scope each call: not a default.
    pub fn new() -> Self {
        let prefix = format!("t{}-", redrive_conformance::unique_name());
        let url = format!("sqs://us-east-1?prefix={prefix}&endpoint={}", endpoint());
        Self { prefix, url }
    }
}
