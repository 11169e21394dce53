//! Typed configuration: every setting is a flag and an environment variable,
//! documented in `--help`. Invalid values stop the process before anything binds.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};
use service_kit::{kafka::KafkaArgs, secret::Secret, telemetry::LogFormat};

/// The order API: validates orders and publishes an OrderCreated event to Kafka
/// for each one, answering only once the broker has acknowledged it.
#[derive(Debug, Clone, Parser)]
#[command(name = "order-svc", version)]
pub struct Config {
    /// Address of the gRPC server.
    #[arg(long, env = "GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,

    /// Address of the operations HTTP server (/metrics, /healthz, /readyz).
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// Longest wait for the broker to acknowledge an event before CreateOrder
    /// answers UNAVAILABLE (for example "5s", "800ms"); at most 10s.
    #[arg(long, env = "PUBLISH_TIMEOUT", default_value = "5s", value_parser = parse_publish_timeout)]
    pub publish_timeout: Duration,

    /// How long shutdown waits for in-flight calls and the producer flush.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// CloudEvents `ce_source` of published events.
    #[arg(long, env = "CE_SOURCE", default_value = "/order-svc")]
    pub ce_source: String,

    /// How many (user_id, request_id) answers each instance remembers, to
    /// answer retries identically and refuse a reused key with another payload.
    #[arg(long, env = "IDEMPOTENCY_CACHE_SIZE", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub idempotency_cache_size: u64,

    /// Most bytes the remembered answers take, keys included (an answer is
    /// its key, a fingerprint of the payload, the order id and the creation
    /// time, about 200 bytes plus the key; never the order's items). The
    /// least recently used answers are forgotten first.
    #[arg(long, env = "IDEMPOTENCY_CACHE_BYTES", default_value_t = 32 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(64 * 1024..))]
    pub idempotency_cache_bytes: u64,

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

    /// HS256 secret: when set, CreateOrder requires `authorization: Bearer <JWT>`
    /// signed with it.
    #[arg(
        long,
        env = "AUTH_JWT_SECRET",
        hide_env_values = true,
        conflicts_with = "auth_jwt_public_key"
    )]
    pub auth_jwt_secret: Option<Secret>,

    /// Public key (PEM file, RSA or EC P-256): when set, CreateOrder requires
    /// `authorization: Bearer <JWT>` signed RS256 or ES256 by its private key.
    #[arg(long, env = "AUTH_JWT_PUBLIC_KEY")]
    pub auth_jwt_public_key: Option<PathBuf>,

    /// Required `iss` of tokens, when set.
    #[arg(long, env = "AUTH_JWT_ISSUER")]
    pub auth_jwt_issuer: Option<String>,

    /// Required `aud` of tokens, when set.
    #[arg(long, env = "AUTH_JWT_AUDIENCE")]
    pub auth_jwt_audience: Option<String>,

    /// Scope that lets a token create orders for any user (in its `scope`
    /// claim, space-separated, or its `scp` list); other tokens may create
    /// orders only for the user named by their `sub`.
    #[arg(long, env = "AUTH_ADMIN_SCOPE", default_value = "orders:admin")]
    pub auth_admin_scope: String,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Exit 0 if the service on METRICS_ADDR is ready, 1 otherwise (for
    /// container health checks).
    Healthcheck,
}

fn parse_publish_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() || d > Duration::from_secs(10) {
        return Err(format!("{s} is outside 1ms..=10s"));
    }
    Ok(d)
}

impl Config {
    /// The defaults, with `brokers` and `topic` set: a starting point for tests.
    pub fn for_tests(brokers: &str, topic: &str) -> Self {
        let mut config = Config::parse_from(["order-svc"]);
        config.grpc_addr = ([127, 0, 0, 1], 0).into();
        config.metrics_addr = ([127, 0, 0, 1], 0).into();
        config.kafka.brokers = brokers.to_owned();
        config.kafka.topic = topic.to_owned();
        config
    }
}
