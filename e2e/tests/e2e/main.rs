//! End-to-end tests: the real `order-svc` and `notify-svc` binaries against a
//! real Apache Kafka broker (Tansu with `TEST_BROKER=tansu`), shared by the
//! tests that isolate themselves with unique topics and groups, and one of
//! their own for tests that stop or kill it; driven the way a user drives
//! them: a generated gRPC client, the services' output, the records on the
//! topic, a webhook receiver.
//!
//! Build the binaries first: `cargo build --workspace --bins && cargo test -p e2e`.
//! `TEST_LOG=1` echoes the services' output.

mod configuration;
mod dlq;
mod durability;
mod faults;
mod flow;
mod group_faults;
mod hardening;
mod helpers;
mod idempotency;
mod log_sink;
mod memory;
mod outage;
mod security;
mod shutdown;
mod telemetry;
