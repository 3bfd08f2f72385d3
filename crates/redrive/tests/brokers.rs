//! Which broker tests this run includes, and whether their brokers answer.
//!
//! The tests that need a running Redis, NATS, Kafka or SQS-compatible server are behind
//! features (`redis-tests`, `nats-tests`, `kafka-tests`, `sqs-tests`, `postgres-tests`,
//! or all of them as `broker-tests`; `nats-tests` and `kafka-tests` also turn on the `integration-tests`
//! of the NATS and Kafka crates), so `cargo test` passes on a machine with no broker. This target
//! (no test harness: it prints to the terminal) says which are off and how to turn them
//! on, and for those that are on, fails at once, naming the address, when the broker
//! does not answer, instead of letting every test of the set time out one by one.

use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

struct Set {
    feature: &'static str,
    on: bool,
    /// The environment variable the tests read the broker's address from, its default.
    var: &'static str,
    default: &'static str,
}

const SETS: [Set; 5] = [
    Set {
        feature: "redis-tests",
        on: cfg!(feature = "redis-tests"),
        var: "REDRIVE_TEST_REDIS_URL",
        default: "redis://127.0.0.1:6379",
    },
    Set {
        feature: "nats-tests",
        on: cfg!(feature = "nats-tests"),
        var: "REDRIVE_TEST_NATS_URL",
        default: "nats://127.0.0.1:4222",
    },
    Set {
        feature: "kafka-tests",
        on: cfg!(feature = "kafka-tests"),
        var: "REDRIVE_TEST_KAFKA_URL",
        default: "kafka://127.0.0.1:9092",
    },
    Set {
        feature: "sqs-tests",
        on: cfg!(feature = "sqs-tests"),
        var: "REDRIVE_TEST_SQS_ENDPOINT",
        default: "http://127.0.0.1:9324",
    },
    Set {
        feature: "postgres-tests",
        on: cfg!(feature = "postgres-tests"),
        var: "REDRIVE_TEST_POSTGRES_URL",
        default: "postgres://postgres@127.0.0.1:5432/test",
    },
];

/// `scheme://[user@]host:port[,…][/…][?…]` → the first `host:port`.
fn first_address(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.split(['/', '?']).next()?;
    let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    rest.split(',').next().filter(|a| a.contains(':'))
}

fn answers(address: &str) -> Result<(), String> {
    let addrs = address
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {address}: {e}"))?;
    let mut last = format!("{address} resolves to no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
            Ok(_) => return Ok(()),
            Err(e) => last = format!("{address}: {e}"),
        }
    }
    Err(last)
}

fn main() -> ExitCode {
    let off: Vec<&str> = SETS.iter().filter(|s| !s.on).map(|s| s.feature).collect();
    if !off.is_empty() {
        println!(
            "broker tests not run: {} (each needs its broker running). `./scripts/test` \
             starts every broker and runs them all; or start one and run \
             `cargo test --workspace --features redrive/<set>` (all of them: \
             `redrive/broker-tests`), with the address in the variable below if not the \
             default.",
            off.join(", ")
        );
    }
    let mut failed = false;
    for set in SETS.iter() {
        let url = std::env::var(set.var).unwrap_or_else(|_| set.default.to_owned());
        if !set.on {
            println!(
                "  {:<12} off   ({}, default {})",
                set.feature, set.var, set.default
            );
            continue;
        }
        let Some(address) = first_address(&url) else {
            println!(
                "  {:<12} FAIL  {}={url:?} names no host:port",
                set.feature, set.var
            );
            failed = true;
            continue;
        };
        match answers(address) {
            Ok(()) => println!("  {:<12} on    {address} answers", set.feature),
            Err(e) => {
                println!(
                    "  {:<12} FAIL  no broker at {e} (start it, set {}, or run ./scripts/test)",
                    set.feature, set.var
                );
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
