//! Kafka client settings shared by both services: the broker list, extra
//! librdkafka properties from `KAFKA_OPTIONS`, and a start-up check that the
//! broker answers and the topic exists, so a wrong address fails fast.

use std::{fmt, str::FromStr, time::Duration};

use rdkafka::{
    ClientConfig,
    client::{Client, ClientContext},
};

/// Property names whose values are secrets: never logged, printed or echoed.
const SECRET_MARKERS: [&str; 4] = ["password", "secret", "key.pem", "sasl.oauthbearer.config"];

/// Any librdkafka properties, from `key=value,key=value`.
///
/// Later entries win over earlier ones and over the services' defaults, so an
/// operator can override anything (`acks`, `linger.ms`, `security.protocol`,
/// `sasl.*`, `ssl.*`). The `Debug` and `Display` forms hide secret values.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaOptions(pub Vec<(String, String)>);

/// A `KAFKA_OPTIONS` entry that is not `key=value`, by its position (the
/// first entry is 1). The entry itself is not repeated: it may be part of a
/// secret (a password with a comma in it splits into two entries).
#[derive(Debug, thiserror::Error)]
#[error("entry {0} is not key=value (entries are separated by commas; values cannot contain commas)")]
pub struct BadOption(usize);

impl FromStr for KafkaOptions {
    type Err = BadOption;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = Vec::new();
        for (i, entry) in s.split(',').map(str::trim).enumerate() {
            if entry.is_empty() {
                continue;
            }
            let (k, v) = entry.split_once('=').ok_or(BadOption(i + 1))?;
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty() {
                return Err(BadOption(i + 1));
            }
            out.push((k.to_owned(), v.to_owned()));
        }
        Ok(KafkaOptions(out))
    }
}

fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_MARKERS.iter().any(|m| key.contains(m))
}

impl fmt::Display for KafkaOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if is_secret(k) {
                write!(f, "{k}=<redacted>")?
            } else {
                write!(f, "{k}={v}")?
            }
        }
        Ok(())
    }
}

impl fmt::Debug for KafkaOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KafkaOptions({self})")
    }
}

/// What a client does, so that one `KAFKA_OPTIONS` can serve both kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Publishes records.
    Producer,
    /// Reads records in a group.
    Consumer,
}

/// Properties only consumers understand (librdkafka's CONFIGURATION.md "C").
const CONSUMER_ONLY: [&str; 14] = [
    "group.",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "fetch.",
    "max.partition.fetch.bytes",
    "auto.offset.reset",
    "enable.auto.",
    "auto.commit.",
    "max.poll.interval.ms",
    "partition.assignment.strategy",
    "queued.",
    "isolation.level",
    "enable.partition.eof",
    "check.crcs",
];

/// Properties only producers understand (librdkafka's CONFIGURATION.md "P").
const PRODUCER_ONLY: [&str; 14] = [
    "acks",
    "request.required.acks",
    "linger.ms",
    "queue.buffering.",
    "batch.",
    "enable.idempotence",
    "enable.gapless.guarantee",
    "compression.",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "transactional.id",
    "transaction.timeout.ms",
    "partitioner",
    "sticky.partitioning.linger.ms",
];

fn belongs_to(key: &str, role: Role) -> bool {
    let other = match role {
        Role::Producer => &CONSUMER_ONLY,
        Role::Consumer => &PRODUCER_ONLY,
    };
    !other.iter().any(|p| {
        if p.ends_with('.') {
            key.starts_with(p)
        } else {
            key == *p
        }
    })
}

/// Builds a client configuration: `bootstrap.servers`, then the service's own
/// `defaults`, then the operator's `options` (which win), leaving out options
/// that only the other role understands (librdkafka would warn about them).
pub fn client_config<K, V>(
    brokers: &str,
    role: Role,
    defaults: impl IntoIterator<Item = (K, V)>,
    options: &KafkaOptions,
) -> ClientConfig
where
    K: AsRef<str>,
    V: AsRef<str>,
{
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (k, v) in defaults {
        config.set(k.as_ref(), v.as_ref());
    }
    for (k, v) in options.0.iter().filter(|(k, _)| belongs_to(k, role)) {
        config.set(k, v);
    }
    config
}

/// Why the broker check at start-up failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The broker did not answer a metadata request in time.
    #[error("cannot reach Kafka at {brokers} within {timeout:?}: {source}")]
    Unreachable {
        /// The configured broker list.
        brokers: String,
        /// How long we waited.
        timeout: Duration,
        /// What the client said.
        source: rdkafka::error::KafkaError,
    },
    /// The broker answered but does not have the topic.
    #[error("topic {topic:?} does not exist on {brokers} (create it first: see the README)")]
    MissingTopic {
        /// The configured broker list.
        brokers: String,
        /// The topic that is missing.
        topic: String,
    },
}

/// Asks the broker for `topic`'s metadata; returns its partition count.
///
/// Blocking: call from `spawn_blocking` or a start-up path.
pub fn check_topic<C: ClientContext>(
    client: &Client<C>,
    brokers: &str,
    topic: &str,
    timeout: Duration,
) -> Result<usize, CheckError> {
    let metadata = client
        .fetch_metadata(Some(topic), timeout)
        .map_err(|source| CheckError::Unreachable {
            brokers: brokers.to_owned(),
            timeout,
            source,
        })?;
    match metadata.topics().iter().find(|t| t.name() == topic) {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(t.partitions().len()),
        _ => Err(CheckError::MissingTopic {
            brokers: brokers.to_owned(),
            topic: topic.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entries_and_later_ones_win() {
        let opts: KafkaOptions = "linger.ms=5, acks=all,,linger.ms=1".parse().unwrap();
        assert_eq!(opts.0.len(), 3);
        let config = client_config("b:9092", Role::Producer, [("linger.ms", "0")], &opts);
        assert_eq!(config.get("linger.ms"), Some("1"));
        assert_eq!(config.get("bootstrap.servers"), Some("b:9092"));
    }

    #[test]
    fn options_of_the_other_role_are_left_out() {
        let opts: KafkaOptions = "session.timeout.ms=6000,fetch.wait.max.ms=10,linger.ms=2,security.protocol=ssl"
            .parse()
            .unwrap();
        let producer = client_config("b", Role::Producer, [("acks", "all")], &opts);
        assert_eq!(producer.get("session.timeout.ms"), None);
        assert_eq!(producer.get("fetch.wait.max.ms"), None);
        assert_eq!(producer.get("linger.ms"), Some("2"));
        assert_eq!(producer.get("security.protocol"), Some("ssl"));
        let consumer = client_config("b", Role::Consumer, [("group.id", "g")], &opts);
        assert_eq!(consumer.get("session.timeout.ms"), Some("6000"));
        assert_eq!(consumer.get("linger.ms"), None);
        assert_eq!(consumer.get("security.protocol"), Some("ssl"));
    }

    #[test]
    fn rejects_entries_without_equals_and_hides_secrets() {
        let err = "linger.ms".parse::<KafkaOptions>().unwrap_err();
        assert!(err.to_string().contains("entry 1 "), "{err}");
        let err = "sasl.password=hunter2,oops".parse::<KafkaOptions>().unwrap_err();
        assert!(err.to_string().contains("entry 2 "), "{err}");
        assert!(
            !err.to_string().contains("hunter2") && !err.to_string().contains("oops"),
            "{err}"
        );
        let err = "acks=all,, =x".parse::<KafkaOptions>().unwrap_err();
        assert!(err.to_string().contains("entry 3 "), "{err}");
        let opts: KafkaOptions = "sasl.username=u,sasl.password=hunter2,ssl.key.password=k"
            .parse()
            .unwrap();
        let shown = format!("{opts} {opts:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("=k"), "{shown}");
        assert!(shown.contains("sasl.username=u"), "{shown}");
    }
}

/// How every client of this workspace reaches the brokers, with the same
/// flags and variables: addresses, extra properties, security. Which topics
/// a client uses is its own setting.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(
        long = "kafka-brokers",
        value_name = "KAFKA_BROKERS",
        env = "KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    pub brokers: String,

    /// Extra librdkafka properties, "key=value,key=value"; they override the
    /// service's defaults (for example linger.ms, fetch.wait.max.ms, ssl.*).
    /// Properties only producers or only consumers understand go to those
    /// clients only.
    #[arg(
        long = "kafka-options",
        value_name = "KAFKA_OPTIONS",
        env = "KAFKA_OPTIONS",
        default_value = "",
        hide_default_value = true,
        hide_env_values = true,
        value_parser = crate::secret::Quiet::<KafkaOptions>::new()
    )]
    pub options: KafkaOptions,

    /// How long start-up waits for the broker to answer and the topics to exist.
    #[arg(
        long = "kafka-startup-timeout",
        value_name = "KAFKA_STARTUP_TIMEOUT",
        env = "KAFKA_STARTUP_TIMEOUT",
        default_value = "15s",
        value_parser = humantime::parse_duration
    )]
    pub startup_timeout: Duration,

    #[command(flatten)]
    pub security: KafkaSecurity,
}

impl KafkaArgs {
    /// A client configuration for `role`: these brokers, the service's
    /// `defaults`, `KAFKA_OPTIONS`, then the security settings.
    pub fn client_config<K, V>(&self, role: Role, defaults: impl IntoIterator<Item = (K, V)>) -> ClientConfig
    where
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut config = client_config(&self.brokers, role, defaults, &self.options);
        self.security.apply(&mut config);
        config
    }
}

/// How the services authenticate to the brokers and encrypt the connection.
/// Each setting is a flag and an environment variable; the password is never
/// printed. (Anything else librdkafka supports goes in `KAFKA_OPTIONS`.)
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KafkaSecurity {
    /// librdkafka `security.protocol`: plaintext, ssl, sasl_plaintext or sasl_ssl.
    #[arg(long, env = "KAFKA_SECURITY_PROTOCOL", value_parser = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"])]
    pub kafka_security_protocol: Option<String>,
    /// SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    #[arg(long, env = "KAFKA_SASL_MECHANISM", value_parser = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])]
    pub kafka_sasl_mechanism: Option<String>,
    /// SASL user name.
    #[arg(long, env = "KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,
    /// SASL password (never logged or echoed).
    #[arg(long, env = "KAFKA_SASL_PASSWORD", hide_env_values = true)]
    pub kafka_sasl_password: Option<crate::secret::Secret>,
    /// CA certificate file (PEM) that signed the brokers' certificates.
    #[arg(long, env = "KAFKA_SSL_CA_LOCATION")]
    pub kafka_ssl_ca_location: Option<std::path::PathBuf>,
}

impl KafkaSecurity {
    /// Checks that the settings fit together.
    pub fn validate(&self) -> Result<(), String> {
        let sasl = matches!(
            self.kafka_security_protocol.as_deref(),
            Some("sasl_plaintext" | "sasl_ssl")
        );
        if sasl
            && (self.kafka_sasl_mechanism.is_none()
                || self.kafka_sasl_username.is_none()
                || self.kafka_sasl_password.is_none())
        {
            return Err(
                "KAFKA_SECURITY_PROTOCOL=sasl_* needs KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME and \
                        KAFKA_SASL_PASSWORD"
                    .into(),
            );
        }
        if !sasl && (self.kafka_sasl_mechanism.is_some() || self.kafka_sasl_username.is_some()) {
            return Err("KAFKA_SASL_* settings need KAFKA_SECURITY_PROTOCOL=sasl_plaintext or sasl_ssl".into());
        }
        if let Some(ca) = &self.kafka_ssl_ca_location
            && !ca.is_file()
        {
            return Err(format!("KAFKA_SSL_CA_LOCATION {} is not a readable file", ca.display()));
        }
        Ok(())
    }

    /// Sets the security properties on `config`. Call it last: a property
    /// set here and in `KAFKA_OPTIONS` takes the value set here.
    pub fn apply(&self, config: &mut ClientConfig) {
        if let Some(p) = &self.kafka_security_protocol {
            config.set("security.protocol", p);
        }
        if let Some(m) = &self.kafka_sasl_mechanism {
            config.set("sasl.mechanism", m);
        }
        if let Some(u) = &self.kafka_sasl_username {
            config.set("sasl.username", u);
        }
        if let Some(p) = &self.kafka_sasl_password {
            config.set("sasl.password", p.expose());
        }
        if let Some(ca) = &self.kafka_ssl_ca_location {
            config.set("ssl.ca.location", ca.to_string_lossy());
        }
    }
}
