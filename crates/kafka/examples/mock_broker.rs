//! librdkafka's own mock cluster, held open as a Kafka-protocol broker for the tests.
//!
//! `cargo run -p redrive-kafka --example mock_broker [BROKERS]` starts a mock cluster of
//! BROKERS brokers (default 1) on loopback ports the operating system picks, prints its
//! `bootstrap.servers` as one line on stdout, and keeps it open until the process is
//! killed. `./scripts/test` runs the Kafka tests against it as well as against tansu:
//! the mock cluster is librdkafka's model of a broker, so it reads from the middle of a
//! batch of several records as a real broker does, which tansu 0.6 does not.
//!
//! What it lacks, and how redrive and the tests live with it:
//! - no CreateTopics: the URL takes `topics=auto`, so redrive has the lane topics
//!   created by asking for their metadata (the mock makes them with 4 partitions);
//! - no DeleteTopics: the tests' topics stay until the process ends (it keeps them in
//!   memory, so that is all it costs);
//! - a group's first join waits 3 s, as `group.initial.rebalance.delay.ms` does on a
//!   real broker.

use std::io::Write;

use rdkafka::mocking::MockCluster;

fn main() {
    let brokers = match std::env::args().nth(1).map(|a| a.parse::<i32>()) {
        None => 1,
        Some(Ok(n)) if (1..=9).contains(&n) => n,
        Some(_) => {
            eprintln!("usage: mock_broker [BROKERS]   (BROKERS: 1 to 9, default 1)");
            std::process::exit(2);
        }
    };
    let cluster = match MockCluster::new(brokers) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mock_broker: could not start librdkafka's mock cluster: {e}");
            std::process::exit(1);
        }
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
