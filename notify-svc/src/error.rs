//! The one error type of notify-svc's start-up and run.

/// What stops notify-svc from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Configuration that cannot work.
    #[error("configuration: {0}")]
    Config(String),
    /// The broker or a topic is not there.
    #[error(transparent)]
    KafkaCheck(#[from] service_kit::kafka::CheckError),
    /// A Kafka client could not be created or subscribed.
    #[error("Kafka client: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The webhook client could not be built.
    #[error("webhook client: {0}")]
    Http(#[from] reqwest::Error),
    /// A listener could not be bound or a server failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The I/O error.
        source: std::io::Error,
    },
}
