//! Typed configuration: every setting is a flag and an environment variable,
//! documented in `--help`. Invalid values stop the process before anything binds.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use service_kit::{
    kafka::KafkaArgs,
    secret::{Quiet, Secret},
    service::ServiceArgs,
};

/// The order API: validates orders, commits each with its OrderCreated event to
/// the order store, publishes the events to Kafka (a transactional outbox), and
/// reads orders back.
#[derive(Debug, Clone, Parser)]
#[command(name = "order-svc", version, mut_arg("metrics_addr", |a| a.default_value("0.0.0.0:9090")))]
pub struct Config {
    /// Address of the gRPC server.
    #[arg(long, env = "GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// The topic of the OrderCreated events.
    #[arg(long, env = "ORDERS_TOPIC", default_value = "orders")]
    pub orders_topic: String,

    /// The order store: `sqlite://<path>` (one file, created when missing,
    /// for one instance) or `postgres://user:password@host/db` (for several
    /// instances). Schema migrations are applied at start.
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://orders.db", hide_env_values = true, value_parser = Quiet::<Secret>::new())]
    pub database_url: Secret,

    /// Most connections to the order store (SQLite: one writer and at most 8 readers).
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub database_max_connections: u32,

    /// How long a (user_id, request_id) key names its order: a retry within
    /// it gets the first call's order back, another payload is refused.
    #[arg(long, env = "IDEMPOTENCY_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub idempotency_retention: Duration,

    /// How long outbox rows stay in the store after the broker acknowledged
    /// them (for inspection), before they are deleted.
    #[arg(long, env = "OUTBOX_RETENTION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub outbox_retention: Duration,

    /// Longest one attempt to publish an event may take (librdkafka's
    /// message.timeout.ms) before the event is tried again from the outbox
    /// (for example "5s", "800ms"); at most 10s. CreateOrder does not wait
    /// for it: its answer follows the store's commit.
    #[arg(long, env = "PUBLISH_TIMEOUT", default_value = "5s", value_parser = parse_publish_timeout)]
    pub publish_timeout: Duration,

    /// CloudEvents `ce_source` of published events.
    #[arg(long, env = "CE_SOURCE", default_value = "/order-svc")]
    pub ce_source: String,

    /// Most CreateOrder calls handled at once; more are refused with
    /// RESOURCE_EXHAUSTED instead of queueing without bound.
    #[arg(long, env = "MAX_CONCURRENT_CALLS", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_concurrent_calls: u64,

    /// Largest gRPC request message accepted, in bytes; larger ones get
    /// OUT_OF_RANGE.
    #[arg(long, env = "GRPC_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u64).range(1024..=16 * 1024 * 1024))]
    pub grpc_max_message_bytes: u64,

    /// Longest a gRPC call may take on the server before it is cancelled
    /// (a shorter grpc-timeout from the client wins).
    #[arg(long, env = "GRPC_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub grpc_request_timeout: Duration,

    /// TLS certificate chain (PEM) of the gRPC server; with GRPC_TLS_KEY,
    /// the server speaks only TLS.
    #[arg(long, env = "GRPC_TLS_CERT", requires = "grpc_tls_key")]
    pub grpc_tls_cert: Option<PathBuf>,

    /// TLS private key (PEM) of the gRPC server.
    #[arg(long, env = "GRPC_TLS_KEY", requires = "grpc_tls_cert")]
    pub grpc_tls_key: Option<PathBuf>,

    /// CA certificate (PEM): when set, clients must present a certificate
    /// signed by it (mutual TLS). Needs GRPC_TLS_CERT and GRPC_TLS_KEY.
    #[arg(long, env = "GRPC_TLS_CLIENT_CA", requires = "grpc_tls_cert")]
    pub grpc_tls_client_ca: Option<PathBuf>,

    /// HS256 secret: when set, every OrderService call requires `authorization: Bearer <JWT>`
    /// signed with it.
    #[arg(
        long,
        env = "AUTH_JWT_SECRET",
        hide_env_values = true,
        conflicts_with = "auth_jwt_public_key"
    )]
    pub auth_jwt_secret: Option<Secret>,

    /// Public key (PEM file, RSA or EC P-256): when set, every OrderService call requires
    /// `authorization: Bearer <JWT>` signed RS256 or ES256 by its private key.
    #[arg(long, env = "AUTH_JWT_PUBLIC_KEY")]
    pub auth_jwt_public_key: Option<PathBuf>,

    /// Required `iss` of tokens, when set.
    #[arg(long, env = "AUTH_JWT_ISSUER")]
    pub auth_jwt_issuer: Option<String>,

    /// Required `aud` of tokens, when set.
    #[arg(long, env = "AUTH_JWT_AUDIENCE")]
    pub auth_jwt_audience: Option<String>,

    /// Scope that lets a token create and read orders of any user (in its
    /// `scope` claim, space-separated, or its `scp` list); other tokens may
    /// create and read orders only of the user named by their `sub`.
    #[arg(long, env = "AUTH_ADMIN_SCOPE", default_value = "orders:admin")]
    pub auth_admin_scope: String,

    #[command(flatten)]
    pub service: ServiceArgs,
}

fn parse_publish_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() || d > Duration::from_secs(10) {
        return Err(format!("{s} is outside 1ms..=10s"));
    }
    Ok(d)
}

impl Config {
    /// The defaults, with `brokers` and `topic` set and a fresh SQLite file
    /// in the temporary directory: a starting point for tests.
    pub fn for_tests(brokers: &str, topic: &str) -> Self {
        let mut config = Config::parse_from(["order-svc"]);
        let file = std::env::temp_dir().join(format!("order-svc-test-{}.db", uuid::Uuid::now_v7()));
        config.database_url = format!("sqlite://{}", file.display())
            .parse()
            .unwrap_or_else(|e: std::convert::Infallible| match e {});
        config.grpc_addr = ([127, 0, 0, 1], 0).into();
        config.service.metrics_addr = ([127, 0, 0, 1], 0).into();
        config.kafka.brokers = brokers.to_owned();
        config.orders_topic = topic.to_owned();
        config
    }
}
