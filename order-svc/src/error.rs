//! The one error type of order-svc, and the one place it becomes a gRPC status.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::domain::FieldViolation;

/// Everything that can go wrong in order-svc.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request broke validation rules; each violation names its field.
    #[error("invalid order: {}", describe(.0))]
    InvalidOrder(Vec<FieldViolation>),
    /// The idempotency key was used before with a different payload.
    #[error("request_id {0:?} was already used by this user for a different order")]
    IdempotencyConflict(String),
    /// The broker did not acknowledge an event in time, or refused it.
    #[error("the event was not published: {0}")]
    Publish(#[from] crate::publisher::PublishError),
    /// The store did not answer or failed a statement; nothing of the call
    /// was committed unless it says so (retry with the same request_id).
    #[error("the order store is unavailable: {0}")]
    Store(#[from] sqlx::Error),
    /// The embedded store is closing and takes no more orders: nothing of
    /// the call was committed.
    #[error("the order store did not commit the order: {0}")]
    StoreCommit(String),
    /// The store could not be reached at start-up.
    #[error("cannot open the order store (DATABASE_URL): {0}")]
    StoreConnect(String),
    /// The store's schema is newer than this binary knows.
    #[error(
        "the order store has schema version {found}, newer than the {known} this order-svc knows: \
         run a newer order-svc (a database is never migrated backwards)"
    )]
    StoreTooNew {
        /// The version found in the database.
        found: i64,
        /// The newest version this binary has.
        known: i64,
    },
    /// A migration failed.
    #[error("cannot migrate the order store: {0}")]
    Migrate(String),
    /// The store holds something this binary cannot read.
    #[error("the order store holds unreadable data: {0}")]
    Corrupt(String),
    /// No such order (or not one the caller may read).
    #[error("order {0:?} not found")]
    NotFound(String),
    /// A read request's field is invalid.
    #[error("invalid {field}: {description}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        description: String,
    },
    /// No valid bearer token.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The token may not create this order.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// Too many calls in flight.
    #[error("too many CreateOrder calls in flight ({0}); retry with backoff")]
    Overloaded(usize),
    /// Configuration that cannot work (found at start-up).
    #[error("configuration: {0}")]
    Config(String),
    /// Kafka could not be set up at start-up.
    #[error(transparent)]
    KafkaCheck(#[from] service_kit::kafka::CheckError),
    /// The broker answered at start-up but refused the configuration
    /// (authentication, TLS).
    #[error(
        "Kafka at {brokers} refuses this configuration: {reason} (check KAFKA_SECURITY_PROTOCOL, the SASL and TLS settings)"
    )]
    KafkaRefused {
        /// The configured broker list.
        brokers: String,
        /// What librdkafka reported.
        reason: String,
    },
    /// A Kafka client could not be created.
    #[error("cannot create the Kafka producer: {0}")]
    KafkaClient(#[from] rdkafka::error::KafkaError),
    /// A listener could not be bound or a server failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::InvalidOrder(violations) => {
                let mut details = ErrorDetails::new();
                for v in &violations {
                    details.add_bad_request_violation(v.field.clone(), v.description.clone());
                }
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            Error::IdempotencyConflict(_) => {
                let mut details = ErrorDetails::new();
                details.add_bad_request_violation("request_id", "already used for a different order");
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            Error::Publish(e) => match e.kind() {
                crate::publisher::PublishErrorKind::Overloaded => Status::resource_exhausted(message),
                crate::publisher::PublishErrorKind::Unavailable => Status::unavailable(message),
                crate::publisher::PublishErrorKind::Rejected => Status::internal(message),
            },
            Error::InvalidField { field, description } => {
                let mut details = ErrorDetails::new();
                details.add_bad_request_violation(field, description);
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            Error::NotFound(_) => Status::not_found(message),
            Error::Store(_) | Error::StoreCommit(_) => Status::unavailable(message),
            Error::Overloaded(_) => Status::resource_exhausted(message),
            Error::Unauthenticated(_) => Status::unauthenticated(message),
            Error::PermissionDenied(_) => Status::permission_denied(message),
            Error::Config(_)
            | Error::StoreConnect(_)
            | Error::StoreTooNew { .. }
            | Error::Migrate(_)
            | Error::Corrupt(_)
            | Error::KafkaCheck(_)
            | Error::KafkaRefused { .. }
            | Error::KafkaClient(_)
            | Error::Io { .. }
            | Error::Transport(_) => Status::internal(message),
        }
    }
}
