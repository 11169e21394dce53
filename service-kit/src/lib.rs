//! Plumbing that both services share and that is no part of the contract:
//! telemetry and W3C trace context ([`telemetry`]), the shutdown signal
//! ([`shutdown`]), Kafka client settings ([`kafka`]) and the operations HTTP
//! server with its probe ([`ops`]), the settings every service shares
//! ([`service`]) and redacted secrets ([`secret`]). Nothing here knows about
//! orders.

pub mod kafka;
pub mod ops;
pub mod secret;
pub mod service;
pub mod shutdown;
pub mod telemetry;
