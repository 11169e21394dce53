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
    /// The broker did not acknowledge the event in time, or refused it.
    #[error("the order was not accepted: {0}")]
    Publish(#[from] crate::publisher::PublishError),
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
                crate::publisher::Kind::Overloaded => Status::resource_exhausted(message),
                crate::publisher::Kind::Unavailable => Status::unavailable(message),
                crate::publisher::Kind::Rejected => Status::internal(message),
            },
            Error::Overloaded(_) => Status::resource_exhausted(message),
            Error::Unauthenticated(_) => Status::unauthenticated(message),
            Error::PermissionDenied(_) => Status::permission_denied(message),
            Error::Config(_)
            | Error::KafkaCheck(_)
            | Error::KafkaClient(_)
            | Error::Io { .. }
            | Error::Transport(_) => Status::internal(message),
        }
    }
}
