//! `consume --worker` with the helpers (clients/python, clients/typescript): a scripted
//! session of a good message, a poison one, a transient one that asks to wait 1.5 s, one
//! that always fails, and one that kills its worker process, consumed by one worker
//! taking two at a time. The failing ones report the model, tool and cost of each
//! attempt, which triage sums per group. When consume stops, its worker reads end of
//! input and exits. Needs `python3` (3.9 or newer) and `node` (18 or newer).

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::collections::HashMap;

use serde_json::Value;

mod cli_support;
use cli_support::redrive;

const AGENT: &str = r#"
import os, sys, time
sys.path.insert(0, os.environ["HELPER"])
import redrive_worker as rw

log = open(os.environ["LOG"], "a", buffering=1)

def handle(msg):
    def note(what):
        log.write(f"{msg.text} {msg.attempt} {what} {time.time()}\n")
    note("start")
    print(f"working on {msg.text}")  # a log line: must not break the protocol
    if msg.text == "bad":
        raise rw.Poison("no prompt in the task", error_class="SchemaError", model="m-small",
                        cost=rw.Cost(input_tokens=10, usd=0.001))
    if msg.text == "later" and msg.attempt == 0:
        note("fail")
        raise rw.Retry("the model is busy", after=1.5, error_class="RateLimited")
    if msg.text == "crash":
        os._exit(9)
    if msg.text == "always":
        msg.record(model="m-large", cost=rw.Cost(input_tokens=100, output_tokens=20, usd=0.01))
        msg.record(tool="search")
        time.sleep(0.05)
        raise RuntimeError("always fails")
    time.sleep(0.05)

rw.run(handle, concurrency=2)
time.sleep(0.3)  # a worker finishing its work: consume waits for it
log.write("worker exited on end of input\n")
"#;

const AGENT_JS: &str = r#"
import { appendFileSync } from 'node:fs';
const { run, Poison, Retry } = await import(process.env.HELPER);

const note = (msg, what) =>
  appendFileSync(process.env.LOG, `${msg.text} ${msg.attempt} ${what} ${Date.now() / 1000}\n`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

await run(async (msg) => {
  note(msg, 'start');
  console.log(`working on ${msg.text}`); // a log line: must not break the protocol
  if (msg.text === 'bad') {
    throw new Poison('no prompt in the task', {
      errorClass: 'SchemaError', model: 'm-small', cost: { inputTokens: 10, usd: 0.001 },
    });
  }
  if (msg.text === 'later' && msg.attempt === 0) {
    note(msg, 'fail');
    throw new Retry('the model is busy', { after: 1.5, errorClass: 'RateLimited' });
  }
  if (msg.text === 'crash') process.exit(9);
  if (msg.text === 'always') {
    msg.record({ model: 'm-large', cost: { inputTokens: 100, outputTokens: 20, usd: 0.01 } });
    msg.record({ tool: 'search' });
  }
  await sleep(50);
  if (msg.text === 'always') throw new Error('always fails');
}, { concurrency: 2 });
await sleep(300); // a worker finishing its work: consume waits for it
appendFileSync(process.env.LOG, 'worker exited on end of input\n');
"#;

#[test]
fn a_python_worker_session_ends_where_each_message_belongs() {
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("agent.py");
    std::fs::write(&agent, AGENT).unwrap();
    let helper = concat!(env!("CARGO_MANIFEST_DIR"), "/../../clients/python/src");
    session(
        &dir,
        &format!("HELPER={helper} python3 {}", agent.display()),
        "RuntimeError",
    );
}

#[test]
fn a_typescript_worker_session_ends_where_each_message_belongs() {
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("agent.mjs");
    std::fs::write(&agent, AGENT_JS).unwrap();
    let helper = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../clients/typescript/index.js"
    );
    session(
        &dir,
        &format!("HELPER=file://{helper} node {}", agent.display()),
        "Error",
    );
}

/// Runs the scripted session with `command` as the worker and checks where each
/// message ended; `error_class` is what the always-failing one is dead with.
fn session(dir: &tempfile::TempDir, command: &str, error_class: &str) {
    let store = format!("sqlite://{}", dir.path().join("w.db").display());
    let log = dir.path().join("log");

    redrive(
        &store,
        &["publish", "agent.tasks"],
        "good\nbad\nlater\nalways\ncrash\ngood2\n",
    );
    let worker = format!("LOG={} {command}", log.display());
    redrive(
        &store,
        &[
            "consume",
            "agent.tasks",
            "--worker",
            &worker,
            "--concurrency",
            "2",
            "--tiers",
            "100ms,200ms",
            "--jitter",
            "0",
            "--until-idle",
        ],
        "",
    );
    // By the time consume returned, its live worker had read end of input and exited
    // on its own (the one that crashed did not get there).
    let exits = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| *l == "worker exited on end of input")
        .count();
    assert_eq!(exits, 1, "{}", std::fs::read_to_string(&log).unwrap());

    // Where everything ended.
    let queues = redrive(&store, &["queues", "--json"], "");
    let depths: Value = serde_json::from_str(queues.lines().next().unwrap()).unwrap();
    assert_eq!(depths["dlq"], 3, "{queues}");
    let dead: HashMap<String, Value> = redrive(&store, &["dlq", "list", "--json"], "")
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|d| (d["payload"].as_str().unwrap().to_owned(), d))
        .collect();
    let summary = |p: &str| {
        let d = &dead[p];
        (
            d["error_class"].as_str().unwrap().to_owned(),
            d["attempts"].as_u64().unwrap(),
        )
    };
    assert_eq!(summary("bad"), ("SchemaError".into(), 1));
    assert_eq!(summary("always"), (error_class.to_owned(), 3));
    assert_eq!(summary("crash"), ("worker_crashed".into(), 3));
    assert!(
        dead["crash"]["error"]
            .as_str()
            .unwrap()
            .contains("exit status: 9"),
        "{}",
        dead["crash"]
    );
    // The crashes are charged to the message that caused them, never to the ones that
    // shared its worker.
    for (payload, d) in &dead {
        for failure in d["history"].as_array().unwrap() {
            if failure["counted"] == true && failure["error_class"] == "worker_crashed" {
                assert_eq!(payload, "crash", "{d}");
            }
        }
    }

    // What the failures cost: per attempt in the timeline, summed per group.
    let always = &dead["always"]["history"];
    let counted: Vec<_> = always
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["counted"] == true)
        .collect();
    assert_eq!(counted.len(), 3, "{always}");
    for attempt in counted {
        assert_eq!(
            (
                &attempt["model"],
                &attempt["tool"],
                &attempt["cost"]["input_tokens"]
            ),
            (
                &Value::from("m-large"),
                &Value::from("search"),
                &Value::from(100)
            ),
            "{always}"
        );
    }
    let groups: HashMap<String, Value> = redrive(&store, &["dlq", "list", "--group", "--json"], "")
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|g| (g["error_class"].as_str().unwrap().to_owned(), g))
        .collect();
    let spent = |class: &str| {
        let g = &groups[class];
        (
            g["attempts"].as_u64().unwrap(),
            g["cost"]["input_tokens"].as_u64().unwrap(),
            g["cost"]["output_tokens"].as_u64().unwrap(),
            g["cost"]["usd"].as_f64().unwrap(),
        )
    };
    assert_eq!(spent(error_class), (3, 300, 60, 0.03), "{groups:?}");
    assert_eq!(spent("SchemaError"), (1, 10, 0, 0.001));
    assert_eq!(spent("worker_crashed").1, 0, "a crash reports nothing");

    // The transient one waited at least the 1.5 s it asked for (its tier is 100 ms).
    let log = std::fs::read_to_string(&log).unwrap();
    let at = |what: &str| -> f64 {
        log.lines()
            .find(|l| l.starts_with(what))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or_else(|| panic!("no {what:?} in\n{log}"))
            .parse()
            .unwrap()
    };
    let waited = at("later 1 start") - at("later 0 fail");
    assert!(waited >= 1.5, "retried after {waited:.3} s:\n{log}");
    // And the good ones ran.
    for good in ["good 0 start", "good2 0 start"] {
        assert!(log.lines().any(|l| l.starts_with(good)), "{log}");
    }
}
