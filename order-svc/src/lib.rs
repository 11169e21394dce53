//! order-svc as a library: the binary is a thin shell over [`startup::Application`],
//! and the tests drive the same `Application` in-process.

pub mod api;
pub mod auth;
pub mod broker_check;
pub mod config;
pub mod domain;
pub mod error;
pub mod idempotency;
pub mod metrics;
pub mod outbox;
pub mod pagination;
pub mod producer;
pub mod publisher;
pub mod startup;
pub mod store;
