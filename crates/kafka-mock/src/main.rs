//! librdkafka's own mock cluster, held open as a Kafka-protocol broker for the tests.
//!
//! `redrive-kafka-mock [BROKERS]` starts a mock cluster of BROKERS brokers (default 1) on
//! loopback ports the operating system picks, prints its `bootstrap.servers` as one line
//! on stdout, and keeps it open until the process is killed. `./scripts/test` runs the
//! Kafka tests against it as well as against tansu: the mock cluster is librdkafka's
//! model of a broker, so it reads from the middle of a batch of several records as a
//! real broker does, which tansu 0.6 does not.
//!
//! What it lacks, and how redrive and the tests live with it:
//! - no CreateTopics: the URL takes `topics=auto`, so redrive has the lane topics
//!   created by asking for their metadata (the mock makes them with 4 partitions);
//! - no DeleteTopics: the tests' topics stay until the process ends (it keeps them in
//!   memory, so that is all it costs).
//!
//! A group's first join is not delayed (a real broker waits
//! `group.initial.rebalance.delay.ms`, 3 s by default, and so does the mock unless told
//! otherwise; test setups of Kafka set it to 0 for the same reason: every test starts
//! new groups). Later rebalances wait a little less than the members' session timeout,
//! so the tests' URLs lower it.

use std::io::Write;

use rdkafka::ClientConfig;
use rdkafka::client::Client;
use rdkafka::producer::{BaseProducer, Producer};

fn main() {
    let brokers = match std::env::args().nth(1).map(|a| a.parse::<i32>()) {
        None => 1,
        Some(Ok(n)) if (1..=9).contains(&n) => n,
        Some(_) => {
            eprintln!("usage: redrive-kafka-mock [BROKERS]   (BROKERS: 1 to 9, default 1)");
            std::process::exit(2);
        }
    };
    // The cluster lives as long as the client that made it: this producer, never used
    // to produce.
    let holder: BaseProducer = match ClientConfig::new()
        .set("test.mock.num.brokers", brokers.to_string())
        .create()
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("redrive-kafka-mock: could not start librdkafka's mock cluster: {e}");
            std::process::exit(1);
        }
    };
    if !no_join_delay(holder.client()) {
        eprintln!("redrive-kafka-mock: the client has no mock cluster");
        std::process::exit(1);
    }
    let Some(cluster) = holder.client().mock_cluster() else {
        eprintln!("redrive-kafka-mock: the client has no mock cluster");
        std::process::exit(1);
    };
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{}", cluster.bootstrap_servers())
        .and_then(|()| out.flush())
        .is_err()
    {
        std::process::exit(1);
    }
    drop(out);
    // The cluster runs on librdkafka's own threads; this one only keeps it alive.
    loop {
        std::thread::park();
    }
}

/// Sets the mock cluster's initial group rebalance delay to 0, which the rdkafka crate
/// has no safe call for. False when `client` has no mock cluster.
#[allow(unsafe_code)]
fn no_join_delay<C: rdkafka::client::ClientContext>(client: &Client<C>) -> bool {
    // SAFETY: `native_ptr` is the live handle `client` owns (borrowed for this whole
    // function); librdkafka returns the cluster that handle created, or null, and the
    // cluster lives as long as the handle. Setting the delay is a plain write librdkafka
    // makes under the cluster's own lock.
    unsafe {
        let cluster = rdkafka::bindings::rd_kafka_handle_mock_cluster(client.native_ptr());
        if cluster.is_null() {
            return false;
        }
        rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, 0);
    }
    true
}
