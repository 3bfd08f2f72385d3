//! `redrive.toml`: queues, the store, alert rules, notifiers and retention in one file,
//! with environment variables overriding it and flags overriding both. See
//! `redrive.example.toml` for every setting.
//!
//! Loading validates everything and reports each problem with its line and what is
//! expected, so `redrive config check` can list them all at once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use redrive_core::alert::{Condition, Rule};
use redrive_core::{QueueName, RetryPolicy, parse_duration};
use redrive_server::notify::{Notifier, PAGERDUTY_EVENTS_URL};
use serde::Deserialize;
use toml::Spanned;

/// The file looked for when `--config` is not given.
pub const DEFAULT_FILE: &str = "redrive.toml";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    broker: RawBroker,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    queues: Vec<RawQueue>,
    #[serde(default)]
    alerts: RawAlerts,
    #[serde(default)]
    notifiers: BTreeMap<String, Spanned<RawNotifier>>,
    #[serde(default)]
    retention: RawRetention,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    url: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    url: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    bind: Option<Spanned<String>>,
    public_url: Option<Spanned<String>>,
    token_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    name: Spanned<String>,
    tiers: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    concurrency: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    evaluate_every: Option<Spanned<String>>,
    default_rule: Option<bool>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    when: Spanned<String>,
    queue: Option<Spanned<String>>,
    notify: Option<Spanned<Vec<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotifier {
    kind: String,
    url: Option<String>,
    routing_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    hot: Option<Spanned<String>>,
    warm: Option<Spanned<String>>,
    archive_dir: Option<String>,
    sweep_every: Option<Spanned<String>>,
}

/// A queue's consume settings.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Retry tiers, parsed once when the file is loaded.
    pub tiers: Option<RetryPolicy>,
    /// Handler timeout.
    pub timeout: Option<Duration>,
    /// Concurrency.
    pub concurrency: Option<usize>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from, if a file.
    pub file: Option<PathBuf>,
    /// Store URL.
    pub store: Option<String>,
    /// Broker URL (lanes in a broker instead of the store).
    pub broker: Option<String>,
    /// Server bind.
    pub bind: Option<SocketAddr>,
    /// Base URL for links in notifications.
    pub public_url: Option<String>,
    /// Token file.
    pub token_file: Option<PathBuf>,
    /// Per-queue consume settings.
    pub queues: BTreeMap<String, QueueConfig>,
    /// Alert rules.
    pub rules: Vec<Rule>,
    /// How often rules are evaluated.
    pub evaluate_every: Duration,
    /// Notifiers by name.
    pub notifiers: BTreeMap<String, Notifier>,
    /// Retention.
    pub retention: redrive_retention::Retention,
    /// How often `serve` sweeps.
    pub sweep_every: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            file: None,
            store: None,
            broker: None,
            bind: None,
            public_url: None,
            token_file: None,
            queues: BTreeMap::new(),
            rules: vec![
                Rule::default_rule(Vec::new()),
                Rule::breaker_rule(Vec::new()),
            ],
            evaluate_every: Duration::from_secs(15),
            notifiers: BTreeMap::new(),
            retention: redrive_retention::Retention::default(),
            sweep_every: Duration::from_secs(3600),
        }
    }
}

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong and what is expected.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

fn line_of(text: &str, span: &Range<usize>) -> usize {
    text[..span.start.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

struct Checker<'a> {
    text: &'a str,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn at(&mut self, span: &Range<usize>, message: String) {
        self.problems.push(Problem {
            line: Some(line_of(self.text, span)),
            message,
        });
    }

    fn duration(&mut self, field: &str, value: &Spanned<String>) -> Option<Duration> {
        match parse_duration(value.get_ref()) {
            Ok(d) => Some(d),
            Err(e) => {
                self.at(&value.span(), format!("{field}: {e}"));
                None
            }
        }
    }
}

/// Parses and validates configuration text, with notifier URLs and keys overridden by
/// `REDRIVE_NOTIFIER_<NAME>_URL` / `_ROUTING_KEY` from the environment.
///
/// # Errors
///
/// Every problem found, each with its line when known.
pub fn parse(text: &str, file: Option<&Path>) -> Result<Config, Vec<Problem>> {
    parse_with_env(text, file, &|name| std::env::var(name).ok())
}

/// [`parse`], with the environment as a lookup (tests pass their own).
fn parse_with_env(
    text: &str,
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, Vec<Problem>> {
    let raw: Raw = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, &s));
        vec![Problem {
            line,
            message: e.message().trim().to_owned(),
        }]
    })?;
    let mut c = Checker {
        text,
        problems: Vec::new(),
    };
    let mut config = Config {
        file: file.map(Path::to_owned),
        ..Config::default()
    };

    check_places(&mut c, &raw, &mut config, file);
    check_queues(&mut c, &raw, &mut config);
    check_notifiers(&mut c, &raw, &mut config, env);
    check_alerts(&mut c, &raw, &mut config);
    check_retention(&mut c, &raw, &mut config, file);
    if c.problems.is_empty() {
        Ok(config)
    } else {
        Err(c.problems)
    }
}

/// The store, the broker and the server section.
fn check_places(c: &mut Checker<'_>, raw: &Raw, config: &mut Config, file: Option<&Path>) {
    if let Some(url) = &raw.store.url {
        match crate::store::check_url(url.get_ref()) {
            Ok(()) => config.store = Some(url.get_ref().clone()),
            Err(e) => c.at(&url.span(), format!("store.url: {e}")),
        }
    }
    if let Some(url) = &raw.broker.url {
        match check_broker(url.get_ref()) {
            Ok(()) => config.broker = Some(url.get_ref().clone()),
            Err(e) => c.at(&url.span(), format!("broker.url: {e}")),
        }
    }
    if let Some(bind) = &raw.server.bind {
        match bind.get_ref().parse::<SocketAddr>() {
            Ok(addr) => config.bind = Some(addr),
            Err(_) => c.at(
                &bind.span(),
                format!(
                    "server.bind: {:?} is not an address; expected IP:PORT such as 127.0.0.1:8080",
                    bind.get_ref()
                ),
            ),
        }
    }
    if let Some(url) = &raw.server.public_url {
        if url.get_ref().starts_with("http://") || url.get_ref().starts_with("https://") {
            config.public_url = Some(url.get_ref().clone());
        } else {
            c.at(&url.span(), "server.public_url: expected an http:// or https:// URL (used for links in notifications)".into());
        }
    }
    config.token_file = raw.server.token_file.as_deref().map(|f| beside(file, f));
}

/// The `[[queues]]` tables.
fn check_queues(c: &mut Checker<'_>, raw: &Raw, config: &mut Config) {
    for q in &raw.queues {
        let name = q.name.get_ref();
        if let Err(e) = QueueName::new(name) {
            c.at(&q.name.span(), format!("queues.name: {e}"));
        }
        let tiers = q
            .tiers
            .as_ref()
            .and_then(|t| match RetryPolicy::parse(t.get_ref()) {
                Ok(policy) => Some(policy),
                Err(e) => {
                    c.at(&t.span(), format!("queues.tiers: {e}"));
                    None
                }
            });
        let timeout = q
            .timeout
            .as_ref()
            .and_then(|t| c.duration("queues.timeout", t));
        let concurrency = match &q.concurrency {
            Some(n)
                if *n.get_ref() < 1 || *n.get_ref() > redrive_runner::MAX_CONCURRENCY as i64 =>
            {
                c.at(&n.span(), format!("queues.concurrency: {} is not allowed; expected a whole number from 1 to {}", n.get_ref(), redrive_runner::MAX_CONCURRENCY));
                None
            }
            Some(n) => usize::try_from(*n.get_ref()).ok(),
            None => None,
        };
        if config.queues.contains_key(name) {
            c.at(
                &q.name.span(),
                format!("queues.name: {name:?} is configured twice"),
            );
        }
        config.queues.insert(
            name.clone(),
            QueueConfig {
                tiers,
                timeout,
                concurrency,
            },
        );
    }
}

/// The `[notifiers.NAME]` tables, URLs and keys overridden from `env_var`.
fn check_notifiers(
    c: &mut Checker<'_>,
    raw: &Raw,
    config: &mut Config,
    env_var: &dyn Fn(&str) -> Option<String>,
) {
    for (name, n) in &raw.notifiers {
        let span = n.span();
        let n = n.get_ref();
        let url_ok = |u: &str| u.starts_with("http://") || u.starts_with("https://");
        let env = format!(
            "REDRIVE_NOTIFIER_{}",
            name.to_ascii_uppercase()
                .replace(|ch: char| !ch.is_ascii_alphanumeric(), "_")
        );
        let url = env_var(&format!("{env}_URL")).or_else(|| n.url.clone());
        let notifier = match n.kind.as_str() {
            "slack" | "webhook" => match url {
                Some(u) if url_ok(&u) => Some(if n.kind == "slack" {
                    Notifier::Slack { url: u }
                } else {
                    Notifier::Webhook { url: u }
                }),
                Some(_) => {
                    c.at(
                        &span,
                        format!("notifiers.{name}.url: expected an http:// or https:// URL"),
                    );
                    None
                }
                None => {
                    c.at(
                        &span,
                        format!(
                            "notifiers.{name}: a {} notifier needs `url` (or {env}_URL)",
                            n.kind
                        ),
                    );
                    None
                }
            },
            "pagerduty" => {
                let key = env_var(&format!("{env}_ROUTING_KEY")).or_else(|| n.routing_key.clone());
                match key {
                    Some(routing_key) if !routing_key.trim().is_empty() => {
                        let url = url.unwrap_or_else(|| PAGERDUTY_EVENTS_URL.to_owned());
                        if url_ok(&url) {
                            Some(Notifier::PagerDuty { routing_key, url })
                        } else {
                            c.at(
                                &span,
                                format!(
                                    "notifiers.{name}.url: expected an http:// or https:// URL"
                                ),
                            );
                            None
                        }
                    }
                    _ => {
                        c.at(&span, format!("notifiers.{name}: a pagerduty notifier needs `routing_key` (or {env}_ROUTING_KEY)"));
                        None
                    }
                }
            }
            other => {
                c.at(&span, format!("notifiers.{name}.kind: unknown kind {other:?}; expected slack, pagerduty or webhook"));
                None
            }
        };
        if let Some(notifier) = notifier {
            config.notifiers.insert(name.clone(), notifier);
        }
    }
}

/// The `[alerts]` section and its rules (the default rule unless told otherwise).
fn check_alerts(c: &mut Checker<'_>, raw: &Raw, config: &mut Config) {
    if let Some(every) = &raw.alerts.evaluate_every
        && let Some(d) = c.duration("alerts.evaluate_every", every)
    {
        config.evaluate_every = d;
    }
    let all_notifiers: Vec<String> = raw.notifiers.keys().cloned().collect();
    let mut rules = Vec::new();
    if raw
        .alerts
        .default_rule
        .unwrap_or(raw.alerts.rules.is_empty())
    {
        rules.push(Rule::default_rule(all_notifiers.clone()));
        rules.push(Rule::breaker_rule(all_notifiers.clone()));
    }
    for r in &raw.alerts.rules {
        let condition = match Condition::parse(r.when.get_ref()) {
            Ok(cond) => Some(cond),
            Err(e) => {
                c.at(&r.when.span(), format!("alerts.rules.when: {e}"));
                None
            }
        };
        if r.name.get_ref().trim().is_empty()
            || rules.iter().any(|x: &Rule| x.name == *r.name.get_ref())
        {
            c.at(&r.name.span(), format!("alerts.rules.name: {:?} is empty or used twice; rule names must be unique (they key the pages)", r.name.get_ref()));
        }
        if let Some(q) = &r.queue
            && let Err(e) = QueueName::new(q.get_ref())
        {
            c.at(&q.span(), format!("alerts.rules.queue: {e}"));
        }
        let notify: Vec<String> = r
            .notify
            .as_ref()
            .map(|n| n.get_ref().clone())
            .unwrap_or_default();
        let notify_span = r
            .notify
            .as_ref()
            .map_or_else(|| r.name.span(), Spanned::span);
        for n in &notify {
            if !raw.notifiers.contains_key(n) {
                c.at(
                    &notify_span,
                    format!(
                        "alerts.rules.notify: no notifier named {n:?}; configured: {}",
                        if all_notifiers.is_empty() {
                            "none".to_owned()
                        } else {
                            all_notifiers.join(", ")
                        }
                    ),
                );
            }
        }
        if let Some(condition) = condition {
            rules.push(Rule {
                name: r.name.get_ref().clone(),
                condition,
                queue: r.queue.as_ref().map(|q| q.get_ref().clone()),
                notify,
            });
        }
    }
    config.rules = rules;
}

/// The `[retention]` section.
fn check_retention(c: &mut Checker<'_>, raw: &Raw, config: &mut Config, file: Option<&Path>) {
    let hot = raw
        .retention
        .hot
        .as_ref()
        .and_then(|h| c.duration("retention.hot", h));
    let warm = raw
        .retention
        .warm
        .as_ref()
        .and_then(|w| c.duration("retention.warm", w));
    if let Some(h) = hot {
        config.retention.hot = h;
    }
    if let Some(w) = warm {
        config.retention.warm = w;
    }
    if config.retention.warm <= config.retention.hot {
        let span = raw
            .retention
            .warm
            .as_ref()
            .or(raw.retention.hot.as_ref())
            .map(Spanned::span)
            .unwrap_or(0..0);
        c.at(&span, "retention.warm: must be longer than retention.hot (both are ages: hot until `hot`, warm until `warm`, archived after)".into());
    }
    if let Some(dir) = &raw.retention.archive_dir {
        config.retention.archive_dir = beside(file, dir);
    }
    if let Some(every) = &raw.retention.sweep_every
        && let Some(d) = c.duration("retention.sweep_every", every)
    {
        config.sweep_every = d;
    }
}

/// A path named in the config file: a relative one is relative to the file's directory
/// (as a reader of the file expects), not to wherever redrive happens to run.
fn beside(file: Option<&Path>, named: &str) -> PathBuf {
    let named = PathBuf::from(named);
    match file.and_then(Path::parent) {
        Some(dir) if named.is_relative() => dir.join(named),
        _ => named,
    }
}

/// Loads the configuration: `path` if given (it must exist), else `redrive.toml` in the
/// current directory if present, else defaults. Environment variables override it.
///
/// # Errors
///
/// The file cannot be read, or has problems (each with its line).
pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
    let chosen = match path {
        Some(p) => Some(p.to_owned()),
        None => Some(PathBuf::from(DEFAULT_FILE)).filter(|p| p.exists()),
    };
    let mut config = match &chosen {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("cannot read the config file {}: {e}", p.display()))?;
            parse(&text, Some(p)).map_err(|problems| {
                let list: Vec<String> = problems
                    .iter()
                    .map(|x| format!("  {}: {x}", p.display()))
                    .collect();
                anyhow::anyhow!(
                    "the config file {} has {} problem(s):\n{}",
                    p.display(),
                    problems.len(),
                    list.join("\n")
                )
            })?
        }
        None => Config::default(),
    };
    if let Ok(dir) = std::env::var("REDRIVE_ARCHIVE_DIR") {
        config.retention.archive_dir = PathBuf::from(dir);
    }
    if let Ok(url) = std::env::var("REDRIVE_PUBLIC_URL") {
        config.public_url = Some(url);
    }
    Ok(config)
}

/// Checks a broker URL with the parser of its backend.
fn check_broker(url: &str) -> Result<(), String> {
    crate::backend::Broker::parse(url)
        .map(drop)
        .map_err(|e| format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_file_is_valid() {
        let text = include_str!("../../../redrive.example.toml");
        let config = parse(text, None).unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(
            config.rules.len(),
            4,
            "the two built-in rules and two listed"
        );
        assert_eq!(config.notifiers.len(), 3);
        assert_eq!(config.retention.hot, Duration::from_secs(7 * 86_400));
        assert_eq!(config.queues["agent.tasks"].concurrency, Some(8));
    }

    /// Regression: `retention run` wrote a relative `archive_dir` relative to the working
    /// directory, not to the config file that named it.
    #[test]
    fn relative_paths_are_relative_to_the_config_file() {
        let text = "[retention]\narchive_dir = \"archive\"\n[server]\ntoken_file = \"tokens\"\n";
        let config = parse(text, Some(Path::new("/etc/redrive/redrive.toml"))).unwrap();
        assert_eq!(
            config.retention.archive_dir,
            Path::new("/etc/redrive/archive")
        );
        assert_eq!(
            config.token_file.as_deref(),
            Some(Path::new("/etc/redrive/tokens"))
        );
        let text = "[retention]\narchive_dir = \"/var/lib/redrive/archive\"\n";
        let config = parse(text, Some(Path::new("/etc/redrive/redrive.toml"))).unwrap();
        assert_eq!(
            config.retention.archive_dir,
            Path::new("/var/lib/redrive/archive")
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let text = r#"
[store]
url = "mysql://x"

[[queues]]
name = "bad name"
tiers = "5s,fast"
concurrency = 0

[[alerts.rules]]
name = "r1"
when = "dlq_depth >= 3"
notify = ["pager"]

[notifiers.slack]
kind = "slack"

[retention]
hot = "30d"
warm = "7d"
"#;
        let problems = parse(text, None).unwrap_err();
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        let expect = [
            ("line 3: store.url", "sqlite://PATH or postgres://"),
            ("line 6: queues.name", "invalid queue name"),
            ("line 7: queues.tiers", "tier 2"),
            ("line 8: queues.concurrency", "from 1 to 10000"),
            (
                "line 12: alerts.rules.when",
                "expected `dlq_depth > N for DUR`",
            ),
            (
                "line 13: alerts.rules.notify",
                "no notifier named \"pager\"",
            ),
            ("notifiers.slack: a slack notifier needs `url`", ""),
            ("line 20: retention.warm", "longer than retention.hot"),
        ];
        for (start, contains) in expect {
            assert!(
                shown
                    .iter()
                    .any(|s| s.contains(start) && s.contains(contains)),
                "missing {start:?} … {contains:?} in {shown:#?}"
            );
        }
    }

    #[test]
    fn syntax_and_unknown_keys_name_the_line() {
        let problems = parse("[store]\nurl = \"sqlite://x.db\"\nurll = 3\n", None).unwrap_err();
        assert_eq!(problems[0].line, Some(3));
        assert!(
            problems[0].message.contains("unknown field `urll`"),
            "{}",
            problems[0].message
        );
        let problems = parse("[retention\nhot = \"7d\"\n", None).unwrap_err();
        assert_eq!(problems[0].line, Some(1));
    }

    #[test]
    fn every_supported_broker_is_accepted() {
        for url in [
            "redis://127.0.0.1:6379",
            "nats://127.0.0.1:4222?namespace=a",
            "kafka://k1:9092,k2:9092?partitions=6",
        ] {
            let ok = parse(&format!("[broker]\nurl = \"{url}\"\n"), None).unwrap();
            assert_eq!(ok.broker.as_deref(), Some(url));
        }
    }

    #[test]
    fn the_broker_is_checked() {
        let ok = parse(
            "[broker]\nurl = \"redis://127.0.0.1:6379?namespace=a\"\n",
            None,
        )
        .unwrap();
        assert_eq!(
            ok.broker.as_deref(),
            Some("redis://127.0.0.1:6379?namespace=a")
        );
        let problems = parse("\n[broker]\nurl = \"amqp://127.0.0.1:5672\"\n", None).unwrap_err();
        assert_eq!(problems[0].line, Some(3));
        assert!(
            problems[0].message.contains("broker.url"),
            "{}",
            problems[0].message
        );
    }

    #[test]
    fn no_rules_means_the_built_in_rules_to_every_notifier() {
        let config = parse(
            "[notifiers.pd]\nkind = \"pagerduty\"\nrouting_key = \"k\"\n",
            None,
        )
        .unwrap();
        assert_eq!(config.rules.len(), 2);
        assert_eq!(
            config.rules[0].condition.to_string(),
            "dlq_depth > 0 for 5m"
        );
        assert_eq!(config.rules[0].notify, ["pd"]);
        assert_eq!(config.rules[1].condition.to_string(), "breaker_open");
        assert_eq!(config.rules[1].notify, ["pd"]);
    }

    #[test]
    fn the_environment_overrides_notifier_secrets_and_fills_missing_ones() {
        let text = "[notifiers.on-call]\nkind = \"pagerduty\"\nrouting_key = \"from-file\"\n\
                    [notifiers.chat]\nkind = \"slack\"\n";
        let env = |name: &str| match name {
            "REDRIVE_NOTIFIER_ON_CALL_ROUTING_KEY" => Some("from-env".to_owned()),
            "REDRIVE_NOTIFIER_CHAT_URL" => Some("https://hooks.example/x".to_owned()),
            _ => None,
        };
        let config = parse_with_env(text, None, &env).unwrap();
        match &config.notifiers["on-call"] {
            Notifier::PagerDuty { routing_key, .. } => assert_eq!(routing_key, "from-env"),
            other => panic!("{other:?}"),
        }
        match &config.notifiers["chat"] {
            Notifier::Slack { url } => assert_eq!(url, "https://hooks.example/x"),
            other => panic!("{other:?}"),
        }
        // Without the environment, the Slack notifier has no URL: a problem naming the
        // variable that would give it one.
        let problems = parse_with_env(text, None, &|_| None).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.message.contains("REDRIVE_NOTIFIER_CHAT_URL")),
            "{problems:?}"
        );
    }
}

/// The config parser under fire: any text, and any value in any known key, is parsed
/// or refused with its problems, never a panic.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::parse;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_text_parses_or_lists_its_problems(text in "\\PC{0,200}") {
            let _ = parse(&text, None);
        }

        #[test]
        fn any_value_of_a_known_key_parses_or_lists_its_problems(
            section in prop_oneof![Just("store"), Just("broker"), Just("server"), Just("alerts"), Just("retention")],
            key in prop_oneof![Just("url"), Just("bind"), Just("public_url"), Just("evaluate_every"),
                Just("hot"), Just("warm"), Just("archive_dir"), Just("sweep_every"), Just("default_rule")],
            value in prop_oneof!["\\PC{0,30}".prop_map(|v| format!("{v:?}")), any::<i64>().prop_map(|n| n.to_string()), Just("true".to_owned())],
            queue in "\\PC{0,20}",
            tiers in "\\PC{0,20}",
            concurrency in any::<i64>(),
        ) {
            let text = format!(
                "[{section}]\n{key} = {value}\n\n[[queues]]\nname = {queue:?}\ntiers = {tiers:?}\nconcurrency = {concurrency}\n"
            );
            let _ = parse(&text, None);
        }
    }
}
