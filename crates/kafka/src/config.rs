//! Where the Kafka cluster is, and the client settings to reach it.

use crate::error::KafkaError;

/// How to reach Kafka, parsed from `kafka://HOST:PORT[,HOST:PORT…][?options]`.
///
/// Options: `group=NAME` (prefix of the consumer groups, default `redrive`),
/// `prefix=P` (prepended to every topic name, default none),
/// `partitions=N` (for main topics redrive creates, default 3), `replication=N`
/// (default: the broker's own default), `ordered=true` (retry in place, see
/// [`KafkaConfig::ordered`]), `topics=auto` (see [`KafkaConfig::auto_topics`]), and
/// any librdkafka client setting, recognised by
/// the dot in its name (`security.protocol=SASL_SSL`, `sasl.mechanism=PLAIN`,
/// `sasl.username=…`, `sasl.password=…`, `ssl.ca.location=…`).
#[derive(Clone)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated.
    pub brokers: String,
    /// Prefix of consumer group names; a queue's group is `<group>.<queue>`.
    pub group: String,
    /// Partition count of a main topic redrive creates.
    pub partitions: i32,
    /// Replication factor of topics redrive creates (-1: the broker's default).
    pub replication: i32,
    /// Prefix of every topic name (default none), so deployments can share a cluster.
    pub prefix: String,
    /// Extra librdkafka settings, passed to every client.
    pub client: Vec<(String, String)>,
    /// Strict per-partition order (so per-key order): a partition hands out one record
    /// at a time, and a failed record is retried in place after its tier's delay,
    /// blocking its partition, instead of going to a retry topic. Off by default: retry
    /// topics keep a partition flowing past a failing record, at the cost of order.
    pub ordered: bool,
    /// `topics=auto`: the broker creates a topic when it is first asked for it
    /// (`auto.create.topics.enable`), with its own default partition count, and redrive
    /// asks for the lane topics' metadata instead of calling CreateTopics. For brokers
    /// without the admin API (librdkafka's mock cluster, some proxies). The default,
    /// `topics=create`, creates them with CreateTopics.
    pub auto_topics: bool,
}

impl std::fmt::Debug for KafkaConfig {
    // Client settings may hold passwords: show their names only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("group", &self.group)
            .field("partitions", &self.partitions)
            .field("ordered", &self.ordered)
            .field("auto_topics", &self.auto_topics)
            .field(
                "client",
                &self.client.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl KafkaConfig {
    /// Parses a `kafka://` URL.
    ///
    /// # Errors
    ///
    /// [`KafkaError::Config`] naming the part that is wrong.
    pub fn new(url: &str) -> Result<Self, KafkaError> {
        let bad = |reason: String| KafkaError::Config(reason);
        let Some(rest) = url.strip_prefix("kafka://") else {
            return Err(bad(format!(
                "expected kafka://HOST:PORT[,HOST:PORT…] (e.g. kafka://127.0.0.1:9092), got {:?}",
                url.split("://").next().unwrap_or(url)
            )));
        };
        let (brokers, query) = rest.split_once('?').unwrap_or((rest, ""));
        let brokers = brokers.trim_end_matches('/');
        if brokers.is_empty()
            || brokers.split(',').any(|b| {
                b.rsplit_once(':')
                    .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            })
        {
            return Err(bad(format!(
                "kafka://{brokers}: every broker must be HOST:PORT (e.g. kafka://k1:9092,k2:9092)"
            )));
        }
        let mut config = Self {
            brokers: brokers.to_owned(),
            group: "redrive".to_owned(),
            partitions: 3,
            replication: -1,
            prefix: String::new(),
            client: Vec::new(),
            ordered: false,
            auto_topics: false,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(bad(format!(
                    "option {pair:?} has no value (expected NAME=VALUE)"
                )));
            };
            let number = |what: &str| {
                value
                    .parse::<i32>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| bad(format!("{what}={value:?}: expected a whole number ≥ 1")))
            };
            match key {
                "group" if !value.is_empty() => config.group = value.to_owned(),
                "prefix"
                    if value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) =>
                {
                    config.prefix = value.to_owned();
                }
                "partitions" => config.partitions = number("partitions")?,
                "replication" => config.replication = number("replication")?,
                "ordered" => {
                    config.ordered = match value {
                        "true" => true,
                        "false" => false,
                        _ => return Err(bad(format!("ordered={value:?}: expected true or false"))),
                    };
                }
                "topics" => {
                    config.auto_topics = match value {
                        "create" => false,
                        "auto" => true,
                        _ => return Err(bad(format!("topics={value:?}: expected create or auto"))),
                    };
                }
                _ if key.contains('.') => config.client.push((key.to_owned(), decode(value))),
                _ => {
                    return Err(bad(format!(
                        "unknown option {key:?}; options are group=, prefix=, partitions=, replication=, \
                         ordered=, topics= and librdkafka settings such as security.protocol="
                    )));
                }
            }
        }
        Ok(config)
    }

    /// The address to show in messages: the brokers, never the settings.
    #[must_use]
    pub fn shown(&self) -> String {
        format!("kafka://{}", self.brokers)
    }

    /// A librdkafka configuration: the brokers, redrive's `defaults`, then the user's
    /// settings (which win).
    #[must_use]
    pub fn client_config(&self, defaults: &[(&str, &str)]) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        // Errors are reported through redrive's own messages; librdkafka's log lines
        // would repeat them.
        c.set("log_level", "3");
        for (k, v) in defaults {
            c.set(*k, *v);
        }
        for (k, v) in &self.client {
            c.set(k, v);
        }
        c
    }

    /// The consumer group of a queue.
    #[must_use]
    pub fn group_of(&self, queue: &str) -> String {
        format!("{}.{}{queue}", self.group, self.prefix)
    }

    /// The topic of a lane name (`agent.tasks.retry.5s`).
    #[must_use]
    pub fn topic(&self, lane_name: &str) -> String {
        format!("{}{lane_name}", self.prefix)
    }
}

/// `%XX` escapes in option values (a password may contain `&` or `=`).
fn decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = value.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_brokers_options_and_client_settings() {
        let c = KafkaConfig::new(
            "kafka://k1:9092,k2:9093?group=agents&partitions=6&security.protocol=SASL_SSL&sasl.password=p%26w",
        )
        .expect("valid");
        assert_eq!(c.brokers, "k1:9092,k2:9093");
        assert_eq!((c.group.as_str(), c.partitions), ("agents", 6));
        assert_eq!(c.group_of("agent.tasks"), "agents.agent.tasks");
        assert!(!c.ordered);
        assert!(
            KafkaConfig::new("kafka://k:1?ordered=true")
                .expect("valid")
                .ordered
        );
        assert_eq!(
            c.client,
            vec![
                ("security.protocol".to_owned(), "SASL_SSL".to_owned()),
                ("sasl.password".to_owned(), "p&w".to_owned()),
            ]
        );
        assert!(
            !format!("{c:?}").contains("p&w"),
            "Debug must not show settings' values"
        );
    }

    #[test]
    fn rejects_what_it_cannot_use() {
        for (url, needle) in [
            ("redis://x:1", "expected kafka://"),
            ("kafka://", "HOST:PORT"),
            ("kafka://host", "HOST:PORT"),
            ("kafka://h:1?partitions=0", "partitions"),
            ("kafka://h:1?colour=blue", "unknown option \"colour\""),
            ("kafka://h:1?group", "no value"),
            ("kafka://h:1?ordered=yes", "expected true or false"),
        ] {
            let e = KafkaConfig::new(url).expect_err(url).to_string();
            assert!(e.contains(needle), "{url}: {e}");
        }
    }
}
