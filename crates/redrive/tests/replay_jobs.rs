//! Replay jobs end to end, through the `redrive` binary with a consumer running beside
//! it: a canary replay whose fix did not work stops after its canaries with the rest
//! still dead, and completes once the fix is real; an ordered replay moves each key's
//! messages in order and holds a key behind a message that fails again.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::path::Path;

use serde_json::Value;

mod cli_support;
use cli_support::{Background, redrive, redrive_status};

/// A handler that fails every message (exit 65, poison) until `fixed` exists; then it
/// logs each payload it handles and succeeds, except for the payloads listed in
/// `still_broken`.
fn handler(dir: &Path, still_broken: &str) -> String {
    let script = dir.join("agent.sh");
    let d = dir.display();
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\np=$(cat)\n\
             if [ ! -f {d}/fixed ]; then echo \"cannot parse: $p\" >&2; exit 65; fi\n\
             echo \"$p\" >> {d}/handled\n\
             case \" {still_broken} \" in *\" $p \"*) echo \"still cannot parse: $p\" >&2; exit 65;; esac\n\
             exit 0\n"
        ),
    )
    .unwrap();
    format!("sh {}", script.display())
}

/// A store in `dir` where every line of `input` was published to `agent.tasks` and died
/// (consumed by [`handler`], not yet fixed, with `consume_args` added); returns the
/// store's URL and the handler.
fn all_dead(dir: &Path, input: &str, consume_args: &[&str]) -> (String, String) {
    let store = format!("sqlite://{}", dir.join("r.db").display());
    redrive(&store, &["publish", "agent.tasks"], input);
    let agent = handler(dir, "");
    let mut args = vec!["consume", "agent.tasks", "--exec", &agent, "--until-idle"];
    args.extend_from_slice(consume_args);
    redrive(&store, &args, "");
    (store, agent)
}

fn depth(store: &str) -> usize {
    redrive(store, &["dlq", "list", "--json", "--limit", "1000"], "")
        .lines()
        .count()
}

fn json(out: &str) -> Value {
    serde_json::from_str(out.trim()).unwrap()
}

/// 40 messages that died of a bug, paged once by `serve`. The first "fix" does not
/// work: `--canary 5` sends five, all fail again, the job pauses (exit 3) with the other
/// 35 never moved, so the DLQ never empties, the alert neither resolves nor pages again,
/// and only five die a second time. After the real fix, the same command replays all
/// 40.
#[test]
fn a_canary_replay_stops_at_a_fix_that_did_not_work_and_completes_after_a_real_one() {
    let dir = tempfile::tempdir().unwrap();
    let input: String = (0..40).map(|i| format!("task-{i:02}\n")).collect();
    let (store, agent) = all_dead(dir.path(), &input, &[]);
    assert_eq!(depth(&store), 40);

    // `serve` pages a webhook as soon as the DLQ is not empty, evaluating every 100 ms.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let hook = runtime.block_on(redrive_conformance::http_sink::HttpSink::start());
    let config = dir.path().join("redrive.toml");
    std::fs::write(
        &config,
        format!(
            "[alerts]\nevaluate_every = \"100ms\"\ndefault_rule = false\n\n[[alerts.rules]]\nname = \"dlq-not-empty\"\nwhen = \"dlq_depth > 0\"\nnotify = [\"hook\"]\n\n[notifiers.hook]\nkind = \"webhook\"\nurl = \"{}/hook\"\n",
            hook.url
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _serve = Background::start(
        &store,
        &[
            "--config",
            &config.display().to_string(),
            "serve",
            "--bind",
            &format!("127.0.0.1:{port}"),
        ],
    );
    let events = || -> Vec<String> {
        hook.json_bodies()
            .iter()
            .map(|b| b["event"].as_str().unwrap().to_owned())
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while events().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the first page never came"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _consumer = Background::start(
        &store,
        &[
            "consume",
            "agent.tasks",
            "--exec",
            &agent,
            "--concurrency",
            "8",
            "--poll",
            "20ms",
        ],
    );
    let replay = [
        "dlq",
        "replay",
        "--queue",
        "agent.tasks",
        "--canary",
        "5",
        "--reason",
        "parser fix",
        "--outcome-wait",
        "60s",
        "--json",
    ];
    let (code, out) = redrive_status(&store, &replay);
    let job = json(&out);
    assert_eq!(code, 3, "a paused job exits 3: {job}");
    assert_eq!(job["state"], "paused", "{job}");
    assert_eq!(job["counts"]["failed"], 5, "{job}");
    assert_eq!(job["counts"]["pending"], 35, "{job}");
    assert!(
        job["note"]
            .as_str()
            .unwrap()
            .contains("5 of 5 canaries failed again"),
        "{job}"
    );
    // All 40 are dead: 35 never left, 5 came back, once.
    let dead: Vec<Value> = redrive(&store, &["dlq", "list", "--json", "--limit", "1000"], "")
        .lines()
        .map(json)
        .collect();
    assert_eq!(dead.len(), 40);
    let replayed: Vec<&Value> = dead.iter().filter(|d| d["replays"] == 1).collect();
    assert_eq!(replayed.len(), 5, "only the canaries died again");
    assert!(dead.iter().all(|d| d["replays"].as_u64().unwrap() <= 1));
    // No second round of pages: the DLQ was never empty, so the alert never resolved
    // and fired again (the evaluator looked every 100 ms throughout).
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(
        events(),
        ["alert.triggered"],
        "one page, for the first deaths only"
    );
    // The job shows each canary's new error beside the old one.
    let id = job["id"].as_str().unwrap();
    let shown = json(&redrive(&store, &["dlq", "job", "show", id, "--json"], ""));
    let canaries: Vec<&Value> = shown["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["canary"] == true)
        .collect();
    assert_eq!(canaries.len(), 5);
    for c in &canaries {
        assert_eq!(c["state"], "failed");
        assert!(
            c["detail"].as_str().unwrap().starts_with("cannot parse"),
            "{c}"
        );
        assert!(
            c["was"].as_str().unwrap().starts_with("cannot parse"),
            "{c}"
        );
    }

    // The real fix: the same replay goes through the canaries and on to the end.
    std::fs::write(dir.path().join("fixed"), "").unwrap();
    let (code, out) = redrive_status(&store, &replay);
    let job = json(&out);
    assert_eq!(code, 0, "{job}");
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["counts"]["total"], 40, "{job}");
    assert_eq!(job["counts"]["pending"], 0, "{job}");
    // Everything it moved is handled (the last outcomes may still be on their way).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while depth(&store) > 0 || handled(dir.path()).len() < 40 {
        assert!(
            std::time::Instant::now() < deadline,
            "40 handled and an empty DLQ"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let jobs: Vec<Value> = redrive(&store, &["dlq", "jobs", "--json"], "")
        .lines()
        .map(json)
        .collect();
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[0]["state"], "done");
    assert_eq!(jobs[1]["state"], "paused");
}

fn handled(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("handled"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// 3 keys × 20 messages, all dead; after the fix, message 7 of key b still fails. An
/// ordered replay runs keys a and c through in their original order, and key b up to
/// its 7th message; b's 12 later messages are held, still dead, instead of overtaking
/// it.
#[test]
fn an_ordered_replay_keeps_each_keys_order_and_holds_a_key_behind_a_message_that_fails_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("r.db").display());
    for key in ["a", "b", "c"] {
        let input: String = (0..20).map(|i| format!("{key}-{i:02}\n")).collect();
        redrive(&store, &["publish", "agent.tasks", "--key", key], &input);
    }
    let agent = handler(dir.path(), "b-07");
    redrive(
        &store,
        &["consume", "agent.tasks", "--exec", &agent, "--until-idle"],
        "",
    );
    assert_eq!(depth(&store), 60);

    std::fs::write(dir.path().join("fixed"), "").unwrap();
    let _consumer = Background::start(
        &store,
        &[
            "consume",
            "agent.tasks",
            "--exec",
            &agent,
            "--concurrency",
            "8",
            "--poll",
            "20ms",
        ],
    );
    let (code, out) = redrive_status(
        &store,
        &[
            "dlq",
            "replay",
            "--queue",
            "agent.tasks",
            "--ordered",
            "--outcome-wait",
            "60s",
            "--json",
        ],
    );
    let job = json(&out);
    assert_eq!(code, 0, "{job}");
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["counts"]["ok"], 47, "{job}");
    assert_eq!(job["counts"]["failed"], 1, "{job}");
    assert_eq!(job["counts"]["held"], 12, "{job}");

    let handled = handled(dir.path());
    for key in ["a", "b", "c"] {
        let seen: Vec<&str> = handled
            .iter()
            .map(String::as_str)
            .filter(|p| p.starts_with(key))
            .collect();
        let last = if key == "b" { 7 } else { 19 };
        let expected: Vec<String> = (0..=last).map(|i| format!("{key}-{i:02}")).collect();
        assert_eq!(
            seen, expected,
            "key {key} in its original order, nothing more"
        );
    }
    // b-07 died again; b-08 … b-19 never left the DLQ.
    let dead: Vec<Value> = redrive(&store, &["dlq", "list", "--json", "--limit", "1000"], "")
        .lines()
        .map(json)
        .collect();
    assert_eq!(dead.len(), 13);
    let id = job["id"].as_str().unwrap();
    let shown = json(&redrive(&store, &["dlq", "job", "show", id, "--json"], ""));
    let held = shown["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["state"] == "held")
        .count();
    assert_eq!(held, 12);
}

/// A replay job killed between its steps (its messages marked moved, none published; or
/// published, not yet marked replayed in the store) resumes with every message handled
/// and none left dead: what was published is marked replayed, what may not have been
/// is moved again.
#[cfg(feature = "failpoints")]
#[test]
fn a_job_killed_between_its_steps_resumes_with_nothing_lost_or_left_dead() {
    let runs: Vec<_> = ["job-step-marked", "replay-published"]
        .into_iter()
        .map(|point| std::thread::spawn(move || killed_at(point)))
        .collect();
    for run in runs {
        run.join().unwrap();
    }
}

#[cfg(feature = "failpoints")]
fn killed_at(point: &str) {
    let dir = tempfile::tempdir().unwrap();
    let input: String = (0..200).map(|i| format!("task-{i:03}\n")).collect();
    let (store, agent) = all_dead(dir.path(), &input, &["--concurrency", "8"]);
    std::fs::write(dir.path().join("fixed"), "").unwrap();
    let _consumer = Background::start(
        &store,
        &[
            "consume",
            "agent.tasks",
            "--exec",
            &agent,
            "--concurrency",
            "8",
            "--poll",
            "20ms",
        ],
    );
    // The canaries are the first step; the second is killed.
    let killed = std::process::Command::new(env!("CARGO_BIN_EXE_redrive"))
        .args([
            "--store",
            &store,
            "dlq",
            "replay",
            "--queue",
            "agent.tasks",
            "--canary",
            "5",
            "--outcome-wait",
            "60s",
        ])
        .env("REDRIVE_FAILPOINT", format!("{point}:2"))
        .output()
        .unwrap();
    assert_eq!(
        killed.status.code(),
        None,
        "{point}: killed by the failpoint: {killed:?}"
    );
    let jobs = redrive(&store, &["dlq", "jobs", "--json"], "");
    let id = json(jobs.lines().next().unwrap())["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Its hold runs out 10 s after the kill.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    let job = loop {
        let (code, out) = redrive_status(&store, &["dlq", "job", "resume", &id, "--json"]);
        if code == 0 {
            break json(&out);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{point}: resume never took the job"
        );
        std::thread::sleep(std::time::Duration::from_secs(1));
    };
    assert_eq!(job["state"], "done", "{point}: {job}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut seen = handled(dir.path());
        seen.sort();
        seen.dedup();
        if seen.len() == 200 && depth(&store) == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{point}: {} of 200 handled, {} still dead",
            seen.len(),
            depth(&store)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A plain replay is a job too: listed, and in the timeline of a message that came back
/// dead, with what became of it.
#[test]
fn a_plain_replay_is_a_job_in_each_messages_timeline() {
    let dir = tempfile::tempdir().unwrap();
    let input: String = (0..5).map(|i| format!("task-{i}\n")).collect();
    let (store, agent) = all_dead(dir.path(), &input, &[]);
    let out = redrive(
        &store,
        &[
            "dlq",
            "replay",
            "--queue",
            "agent.tasks",
            "--reason",
            "retry after deploy",
            "--json",
        ],
        "",
    );
    let report = json(&out);
    assert_eq!(
        (report["matched"].as_u64(), report["replayed"].as_u64()),
        (Some(5), Some(5))
    );
    assert_eq!(report["by_queue"]["agent.tasks"], 5);
    // Still broken: they die again, and say which replay brought them back.
    redrive(
        &store,
        &["consume", "agent.tasks", "--exec", &agent, "--until-idle"],
        "",
    );
    let jobs = redrive(&store, &["dlq", "jobs", "--json"], "");
    let job = json(jobs.lines().next().unwrap());
    assert_eq!(
        (job["state"].as_str(), job["counts"]["failed"].as_u64()),
        (Some("done"), Some(5))
    );
    let dead = redrive(&store, &["dlq", "list", "--json"], "");
    let id = json(dead.lines().next().unwrap())["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let shown = json(&redrive(&store, &["dlq", "show", &id, "--json"], ""));
    let timeline = &shown["replay_jobs"][0];
    assert_eq!(timeline["job"], job["id"]);
    assert_eq!(timeline["outcome"], "failed");
    assert_eq!(timeline["reason"], "retry after deploy");
    assert!(
        timeline["detail"]
            .as_str()
            .unwrap()
            .starts_with("cannot parse")
    );
}
