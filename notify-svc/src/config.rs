//! Typed configuration: every setting is a flag and an environment variable,
//! documented in `--help`. Invalid values stop the process before anything binds.

use std::time::Duration;

use clap::Parser;
use service_kit::{kafka::KafkaArgs, service::ServiceArgs};

/// Consumes OrderCreated events and sends a notification for each one,
/// at least once, with retries and a dead-letter topic.
#[derive(Debug, Clone, Parser)]
#[command(name = "notify-svc", version, mut_arg("metrics_addr", |a| a.default_value("0.0.0.0:9091")))]
pub struct Config {
    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// The topic of the OrderCreated events.
    #[arg(long, env = "ORDERS_TOPIC", default_value = "orders")]
    pub orders_topic: String,

    /// Consumer group; instances in one group share the topic's partitions.
    #[arg(long, env = "KAFKA_GROUP_ID", default_value = "notification-group")]
    pub kafka_group_id: String,

    /// Topic for records that cannot be handled (undecodable, unknown type,
    /// permanently refused or out of retries).
    #[arg(long, env = "DLQ_TOPIC", default_value = "orders.dlq")]
    pub dlq_topic: String,

    /// Also write Spring for Apache Kafka's dead-letter headers
    /// (kafka_dlt-original-topic, -partition, -offset, kafka_dlt-exception-fqcn,
    /// -message) beside our dlq.* ones, in Spring's encodings, so
    /// Spring-based tooling reads our dead letters (true or false).
    #[arg(
        long,
        env = "DLQ_SPRING_HEADERS",
        default_value = "false",
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub dlq_spring_headers: bool,

    /// Send notifications as JSON POSTs to this URL instead of logging them.
    /// Never shown in help or errors: webhook URLs often carry a token.
    #[arg(
        long,
        env = "NOTIFY_WEBHOOK_URL",
        hide_env_values = true,
        value_parser = service_kit::secret::Quiet::<reqwest::Url>::new()
    )]
    pub notify_webhook_url: Option<reqwest::Url>,

    /// Timeout of one webhook request.
    #[arg(long, env = "NOTIFY_WEBHOOK_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub notify_webhook_timeout: Duration,

    /// Attempts per notification (the first included) before it goes to the
    /// dead-letter topic.
    #[arg(long, env = "RETRY_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub retry_max_attempts: u32,

    /// Upper bound of the first retry's delay (full jitter: the delay is
    /// random between 0 and the bound, which doubles per attempt).
    #[arg(long, env = "RETRY_INITIAL_DELAY", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub retry_initial_delay: Duration,

    /// Largest retry delay bound.
    #[arg(long, env = "RETRY_MAX_DELAY", default_value = "10s", value_parser = humantime::parse_duration)]
    pub retry_max_delay: Duration,

    /// How many recent event ids are remembered to drop duplicate deliveries.
    /// Each takes the same ~100 bytes however long the id (ids that are not
    /// UUIDs are kept as a 16-byte digest): about 10 MiB at the default.
    #[arg(long, env = "DEDUP_CACHE_SIZE", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub dedup_cache_size: u64,

    /// Largest record value decoded; larger ones go to the dead-letter topic.
    #[arg(long, env = "MAX_RECORD_BYTES", default_value_t = 256 * 1024, value_parser = clap::value_parser!(u64).range(1024..=16 * 1024 * 1024))]
    pub max_record_bytes: u64,

    /// Records that may wait per partition for that partition's worker.
    /// Once this many (or PARTITION_BUFFER_BYTES) wait, further records of
    /// that partition stay in the client, which stops fetching the partition
    /// at its prefetch size, until the worker catches up; the other
    /// partitions go on.
    #[arg(long, env = "PARTITION_BUFFER", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub partition_buffer: u64,

    /// Most bytes (values, keys, headers) of the records waiting per
    /// partition: a slow partition's records stay in the client once its
    /// waiting records reach this or PARTITION_BUFFER, whichever comes first. A single record larger than
    /// this waits alone.
    #[arg(long, env = "PARTITION_BUFFER_BYTES", default_value_t = 16 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(64 * 1024..))]
    pub partition_buffer_bytes: u64,

    #[command(flatten)]
    pub service: ServiceArgs,
}

impl Config {
    /// The defaults, with `brokers`, `topic` and `group` set: a starting
    /// point for tests.
    pub fn for_tests(brokers: &str, topic: &str, group: &str) -> Self {
        let mut config = Config::parse_from(["notify-svc"]);
        config.service.metrics_addr = ([127, 0, 0, 1], 0).into();
        config.kafka.brokers = brokers.to_owned();
        config.orders_topic = topic.to_owned();
        config.kafka_group_id = group.to_owned();
        config.dlq_topic = format!("{topic}.dlq");
        config
    }
}
