//! The conformance suite on the SQS backend (lanes as SQS queues with their native
//! redrive policy, dead letters drained into SQLite), against the SQS-compatible server
//! `scripts/test` starts (moto, on 127.0.0.1:9324; `REDRIVE_TEST_SQS_ENDPOINT` to use
//! another). Each scenario gets its own queue-name prefix.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

mod sqs_support;

use aws_sdk_sqs::types::MessageAttributeValue;
use redrive_conformance::{Cli, Fixture, Harness};
use redrive_core::{LaneSet, LaneStats, QueueName};
use redrive_sqlite::{Sqlite, SqliteConfig};
use redrive_sqs::{SqsBackend, SqsConfig};

struct SqsHarness;

impl Harness for SqsHarness {
    type T = SqsBackend<Sqlite>;
    type S = SqsBackend<Sqlite>;

    async fn open(&self) -> Fixture<Self::T, Self::S> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dead.db");
        let scope = sqs_support::Scope::new();
        let transport = SqsConfig::new(&scope.url)
            .unwrap()
            .connect()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{e} (run ./scripts/test, which starts a local SQS server and exports test \
                     credentials, or set REDRIVE_TEST_SQS_ENDPOINT and AWS_ACCESS_KEY_ID / \
                     AWS_SECRET_ACCESS_KEY)"
                )
            });
        let store = SqliteConfig::new(&path).open().unwrap();
        let backend = SqsBackend::new(transport, store);
        Fixture {
            transport: backend.clone(),
            store: backend,
            cli: Cli {
                bin: env!("CARGO_BIN_EXE_redrive").into(),
                backend_args: vec![
                    "--broker".into(),
                    scope.url.clone(),
                    "--store".into(),
                    format!("sqlite://{}", path.display()),
                ],
            },
            guard: Box::new(dir),
        }
    }

    async fn write_malformed(&self, b: &Fixture<Self::T, Self::S>, queue: &QueueName) -> usize {
        let (client, url) = raw(b, queue).await;
        let text = |v: &str| {
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value(v)
                .build()
                .unwrap()
        };
        let messages: [(&str, &str, &str); 3] = [
            ("redrive", "{not json", "redrive attribute that is not JSON"),
            ("redrive-body", "base64", "%%% not base64 %%%"),
            (
                "redrive",
                r#"[["redrive-version","99"]]"#,
                "from a future redrive",
            ),
        ];
        for (name, value, body) in messages {
            client
                .send_message()
                .queue_url(&url)
                .message_body(body)
                .message_attributes(name, text(value))
                .send()
                .await
                .unwrap();
        }
        messages.len()
    }

    async fn publish_plain(
        &self,
        b: &Fixture<Self::T, Self::S>,
        queue: &QueueName,
        payload: &[u8],
    ) {
        let (client, url) = raw(b, queue).await;
        client
            .send_message()
            .queue_url(&url)
            .message_body(String::from_utf8(payload.to_vec()).unwrap())
            .send()
            .await
            .unwrap();
    }
}

/// A plain SQS client, and the scenario's SQS queue for `queue` (a message sent to it is
/// how another producer publishes to redrive). The queue's SQS queues are made first.
async fn raw(
    b: &Fixture<SqsBackend<Sqlite>, SqsBackend<Sqlite>>,
    queue: &QueueName,
) -> (aws_sdk_sqs::Client, String) {
    let lanes = LaneSet {
        queue: queue.clone(),
        tiers: Vec::new(),
    };
    b.transport.queue_depths(&lanes).await.unwrap();
    let config = SqsConfig::new(&b.cli.backend_args[1]).unwrap();
    let client = config.sdk_client().await.unwrap().0;
    let name = config.sqs_name(queue);
    let url = client
        .get_queue_url()
        .queue_name(name)
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_owned();
    (client, url)
}

redrive_conformance::conformance!(SqsHarness);
